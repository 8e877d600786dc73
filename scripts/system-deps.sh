#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real: Chromium (the dashboard's
# browser tests), PostgreSQL (the second storage backend) and openssl (a test's private CA). Idempotent and quick when both
# are present. Without root (and without passwordless sudo) it says what to install and goes
# on: those tests then skip with a reason, except under CI=true, where they fail.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
# The https collector test makes its private CA and certificate with the openssl command.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "system-deps: missing Debian packages: ${missing[*]}" >&2
  echo "system-deps: install them with: sudo apt-get install -y ${missing[*]}" >&2
  echo "system-deps: until then the browser/PostgreSQL/https tests are skipped" >&2
  exit 0
fi

echo "system-deps: installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
