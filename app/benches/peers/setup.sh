#!/usr/bin/env bash
# Installs what `make bench` runs beside vm-webapp, when missing: wrk (Debian),
# a virtualenv with pgqueuer 1.6.0 (asyncpg), FastAPI and uvicorn (PyPI), and
# pgqueuer's own benchmark script from its sdist. Safe to run repeatedly.
set -euo pipefail
VENV=${BENCH_VENV:-.venv-bench}
TOOLS=${BENCH_TOOLS:-var/bench}
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "wrk is missing: apt-get install wrk (or run as root)" >&2
    exit 1
  fi
  echo "installing wrk"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; }
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV (pgqueuer, FastAPI, uvicorn)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "pgqueuer[asyncpg]==1.6.0" tqdm "fastapi>=0.115" "uvicorn>=0.30" uvloop
fi
if [ ! -f "$TOOLS/pgqueuer-1.6.0/tools/benchmark.py" ]; then
  mkdir -p "$TOOLS"
  "$VENV/bin/pip" download -q pgqueuer==1.6.0 --no-binary :all: --no-deps -d "$TOOLS"
  tar -xzf "$TOOLS/pgqueuer-1.6.0.tar.gz" -C "$TOOLS"
fi
