#!/usr/bin/env bash
# The test command: installs what the tests need beyond the Rust toolchain (iproute2's `ss`,
# which the connection-option tests read socket timers with), then runs every test.
#   bash tests/run.sh            # from the repository root or anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ss >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2
  else
    echo "tests need ss (Debian package iproute2); install it and run again" >&2
    exit 2
  fi
fi
exec cargo test "$@"
