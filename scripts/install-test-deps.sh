#!/usr/bin/env bash
# Installs what the test suites need when it is missing: PostgreSQL 15 server
# binaries (the tests start their own server on loopback), redis-server,
# libfaketime, Prometheus with promtool and Alertmanager with amtool (the
# alert and dashboard tests run their own on loopback), and for the console's
# browser test Debian's chromium, node with npm, and playwright-core (npm ci
# in tests/browser, from its lock file; no browser download).
# Safe to run repeatedly; does nothing when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

# playwright-core for tests/browser, once node is there.
browser_test_modules() {
  if [ ! -d tests/browser/node_modules/playwright-core ]; then
    echo "installing playwright-core for the browser test (npm ci in tests/browser)"
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null
  fi
}

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
# prometheus (with promtool) and prometheus-alertmanager (Debian names the
# server prometheus-alertmanager; amtool comes with it): the
# alert rules are unit-tested with promtool, and the incident drills run a real
# Prometheus and Alertmanager against the real app.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  missing+=(prometheus)
fi
if ! command -v prometheus-alertmanager >/dev/null 2>&1 || ! command -v amtool >/dev/null 2>&1; then
  missing+=(prometheus-alertmanager)
fi
if ! command -v runuser >/dev/null 2>&1; then
  missing+=(util-linux)
fi
# The console's browser test: headless Chromium driven from node.
if [ ! -x /usr/bin/chromium ]; then
  missing+=(chromium)
fi
if ! command -v node >/dev/null 2>&1; then
  missing+=(nodejs)
fi
if ! command -v npm >/dev/null 2>&1; then
  missing+=(npm)
fi

if [ ${#missing[@]} -eq 0 ]; then
  browser_test_modules
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "missing test dependencies: ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
  exit 1
fi

echo "installing test dependencies: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The tests start their own servers; the packages' system services are not
# needed, so they are not started by this installation (a policy-rc.d that
# already exists is left as it is).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
browser_test_modules
