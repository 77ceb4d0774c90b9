"""LZF decompression (liblzf's format, as PCL writes ``binary_compressed`` PCD files).

Pure Python, a loop over LZF tokens, not over points: it runs once per file read, and it keeps a
compiled dependency out of the scan readers.
"""

from __future__ import annotations


def lzf_decompress(data: bytes, expected_size: int) -> bytes:
    """Decompress an LZF stream (liblzf format, as PCL writes it) of known output size.

    A control byte ``c < 32`` is followed by ``c + 1`` literal bytes; otherwise ``c >> 5`` is the
    back-reference length - 2 (7 means an extra length byte follows), and the low 5 bits with the
    next byte give the distance - 1 back into the output. Raises ``ValueError`` on a stream that
    is truncated, refers before the start, or does not produce exactly ``expected_size`` bytes.
    """
    src = bytes(data)
    n = len(src)
    out = bytearray()
    i = 0
    while i < n:
        ctrl = src[i]
        i += 1
        if ctrl < 32:  # literal run
            length = ctrl + 1
            if i + length > n:
                raise ValueError(f"LZF literal run of {length} bytes at offset {i - 1} runs past the end")
            out += src[i : i + length]
            i += length
        else:  # back reference
            length = ctrl >> 5
            if length == 7:
                if i >= n:
                    raise ValueError("LZF stream truncated inside a back reference")
                length += src[i]
                i += 1
            if i >= n:
                raise ValueError("LZF stream truncated inside a back reference")
            dist = ((ctrl & 0x1F) << 8) + src[i] + 1
            i += 1
            length += 2
            start = len(out) - dist
            if start < 0:
                raise ValueError(f"LZF back reference {dist} bytes before the start of the output")
            if dist >= length:
                out += out[start : start + length]
            else:  # overlapping copy = periodic repetition of the last `dist` bytes
                chunk = bytes(out[start:])
                reps, rem = divmod(length, dist)
                out += chunk * reps + chunk[:rem]
        if len(out) > expected_size:
            raise ValueError(f"LZF stream decompresses to more than the expected {expected_size} bytes")
    if len(out) != expected_size:
        raise ValueError(f"LZF stream decompresses to {len(out)} bytes, expected {expected_size}")
    return bytes(out)
