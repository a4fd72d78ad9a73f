#!/usr/bin/env bash
# Installs what the test suites need when it is missing: PostgreSQL 15 server
# binaries (the tests start their own server on loopback), redis-server and
# libfaketime.
# Safe to run repeatedly; does nothing when everything is present.
set -euo pipefail

missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${VM_TEST_PG_BINDIR:-}" ]; then
  missing+=(postgresql-15)
fi
if ! command -v redis-server >/dev/null 2>&1; then
  missing+=(redis-server)
fi
# libfaketime: the clock-skew tests run workers with their clock moved.
if ! compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null && [ ! -e /usr/lib/faketime/libfaketime.so.1 ]; then
  missing+=(faketime)
fi
if ! command -v runuser >/dev/null 2>&1; then
  missing+=(util-linux)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "missing test dependencies: ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
  exit 1
fi

echo "installing test dependencies: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
