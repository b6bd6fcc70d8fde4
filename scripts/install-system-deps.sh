#!/bin/sh
# Install the Debian packages the integration tests start for real: Mosquitto and etcd.
# Idempotent; needs root (or passwordless sudo) only when something is missing.
set -eu
missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing="$missing etcd-server"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "fairbus: missing Debian packages:$missing (not root: install them yourself;" \
       "tests that need them skip locally and fail under CI=true)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "fairbus: missing$missing and no apt-get here; install them with your package manager" >&2
  exit 0
fi
echo "fairbus: installing$missing with apt-get"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
