#!/usr/bin/env bash
# The test command: installs what the tests need beyond the Rust toolchain, then runs every
# test. From Debian's packages: iproute2 (`ss`, which the connection-option tests read socket
# timers with), prometheus (the real Prometheus server and `promtool` the metrics tests
# scrape and check with), and the real clients the routing tests send through the proxy:
# curl, openssl, psql (postgresql-client) and redis-cli (redis-tools); HAProxy and nginx, which
# the PROXY protocol tests put in front of and behind the proxy; and the real servers of the
# one-port test: PostgreSQL, Redis, MariaDB, nginx's RTMP module, with ffmpeg as RTMP client;
# and Debian's python3-grpcio, whose client and server make a real gRPC call through TLS
# termination.
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
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_rtmp_module.so ] || missing+=(libnginx-mod-rtmp)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
{ command -v mariadbd >/dev/null 2>&1 && command -v mariadb >/dev/null 2>&1; } || missing+=(mariadb-server mariadb-client)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
{ [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import grpc' >/dev/null 2>&1; } || missing+=(python3-grpcio)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # Packages such as nginx start their service on install; the tests start their own
    # instances on free loopback ports, so a fresh machine is asked not to (policy-rc.d,
    # removed again unless it was already there).
    policy=/usr/sbin/policy-rc.d
    added_policy=
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
    fi
    status=0
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" || status=$?
    [ -n "$added_policy" ] && rm -f "$policy"
    [ "$status" = 0 ] || exit "$status"
  else
    echo "tests need Debian packages: ${missing[*]}; install them and run again" >&2
    exit 2
  fi
fi
exec cargo test "$@"
