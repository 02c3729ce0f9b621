#!/usr/bin/env bash
# The test command: installs what the tests need beyond the Rust toolchain, then runs every
# test. From Debian's packages: iproute2 (`ss`, which the connection-option tests read socket
# timers with), prometheus (the real Prometheus server and `promtool` the metrics tests
# scrape and check with), and the real clients the routing tests send through the proxy:
# curl, openssl, psql (postgresql-client) and redis-cli (redis-tools).
#   bash tests/run.sh            # from the repository root or anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "tests need Debian packages: ${missing[*]}; install them and run again" >&2
    exit 2
  fi
fi
exec cargo test "$@"
