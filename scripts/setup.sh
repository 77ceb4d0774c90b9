#!/usr/bin/env bash
# Creates the virtual environment and installs inspectd with its test tools.
# System libraries: open3d needs libusb-1.0-0 and libgomp1; the Prometheus integration
# test uses Debian's `prometheus`, the review station's browser test Debian's `chromium`.
# As root they are installed with apt-get; otherwise this script says what is missing and
# goes on (those tests then skip, naming it).
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

missing=()
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
have_lib libusb-1.0.so.0 || missing+=(libusb-1.0-0)
have_lib libgomp.so.1 || missing+=(libgomp1)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: install them with: sudo apt-get install ${missing[*]}" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev,onnx,eval]"
# A scorer from outside this package, found through the inspectd.scorers entry points (tests/test_external_scorer.py).
"$VENV/bin/python" -m pip install -q --no-deps -e tests/plugins/inspectd_example_scorer
touch "$VENV/.installed"
echo "setup: ready ($VENV)"
