"""CurveZMQ on the client side: the keys a sensor or a verdict subscriber presents to the daemon.

The daemon admits a client by its public key (an allow-list directory, see docs/security.md);
the client must know the daemon's public key. Key files are the ZeroMQ certificate files that
``inspectd keys`` (``zmq.auth.create_certificates``) writes: ``NAME.key`` (public) and
``NAME.key_secret`` (public + secret, mode 0600).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the server's public key, all Z85-encoded bytes."""

    public: bytes
    secret: bytes
    server_public: bytes


def load_client_keys(client_key: str | Path, server_key: str | Path) -> ClientKeys:
    """Read a client's secret key file and the server's public key (its ``.key`` or ``.key_secret`` file)."""
    public, secret = zmq.auth.load_certificate(str(client_key))
    if not secret:
        raise ValueError(f"{client_key} holds no secret key (give the NAME.key_secret file)")
    server_public, _ = zmq.auth.load_certificate(str(server_key))
    return ClientKeys(public=public, secret=secret, server_public=server_public)


def apply_client_keys(socket: zmq.Socket, keys: ClientKeys | None) -> None:
    """Make ``socket`` a CURVE client of the daemon (before ``connect``); ``None`` leaves it plain."""
    if keys is None:
        return
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.server_public
