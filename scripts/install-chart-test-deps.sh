#!/usr/bin/env bash
# Installs what the chart and docs tests (tests/, pytest) need when it is
# missing: python3 with venv support and lua5.4 (Debian packages, as root),
# then a virtualenv (.venv-test, or $VENV) with the pinned requirements-test.txt.
# Safe to run repeatedly: the virtualenv is rebuilt only when the requirements
# change.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VENV:-.venv-test}"
requirements=requirements-test.txt

missing=()
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if ! command -v lua5.4 >/dev/null 2>&1; then
  missing+=(lua5.4)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing chart test dependencies: ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
    exit 1
  fi
  echo "installing chart test dependencies: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "creating $venv from $requirements"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$requirements"
echo "$want" > "$stamp"
