#!/usr/bin/env bash
# What routing costs, measured in one run on this box, one shard, the same build:
#   1. proxy CPU us per new connection (ringload rr --http --new-connection-per-request, 64
#      connections, HTTP server ringload serve --mode http) through a listener with 8 routes
#      (seven that do not match the client: postgres, redis, mongodb, ssh, an SNI, an ALPN, a
#      source network; the eighth matches its HTTP request by path) against the same listener
#      without routes, alternating in every round; ratio = median of per-round ratios;
#   2. proxy CPU us per request on keep-alive connections (ringload rr --http), same two;
#   3. user memory per idle proxied connection (VmRSS growth of the proxy over SESSIONS idle
#      sessions held by ringload hold), sniffed (routes; the silent clients are routed as
#      unknown at sniff_timeout = "1s") against unsniffed.
#
#   bench/routing.sh [BIN]          # default: target/release/ringproxy (built first)
#   ROUNDS=7 DUR=5 SESSIONS=8000 bench/routing.sh
#
# Loopback only; every load is bounded by DUR or its count and every process started here is
# stopped by PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
require_tools jq python3
pick_binaries "${1:-}"
ROUNDS=${ROUNDS:-7}
DUR=${DUR:-5}
SESSIONS=${SESSIONS:-8000}
start_work routing
ulimit -n "$(ulimit -Hn)"
http_port=9480 sink_port=9481 proxy_port=9421 dead_port=9499
clk=$(getconf CLK_TCK)

"$ringload" serve --mode http --threads 1 --listen "127.0.0.1:$http_port" --duration 1h >/dev/null 2>&1 & pids+=($!)
"$ringload" serve --mode sink --threads 1 --listen "127.0.0.1:$sink_port" --duration 1h >/dev/null 2>&1 & pids+=($!)
sleep 0.5

write_config() { # $1 file, $2 backend port, $3 listener extra
  cat >"$1" <<CONF
[runtime]
shards = 1
drain_timeout = "1s"
[[pool]]
name = "app"
servers = [ { addr = "127.0.0.1:$2" } ]
[[pool]]
name = "other"
servers = [ { addr = "127.0.0.1:$dead_port" } ]
[[listener]]
name = "front"
bind = "127.0.0.1:$proxy_port"
pool = "app"
$3
CONF
}
routes='routes = [
  { protocol = "postgres", pool = "other" },
  { protocol = "redis", pool = "other" },
  { protocol = "mongodb", pool = "other" },
  { protocol = "ssh", pool = "other" },
  { sni = "*.example.com", pool = "other" },
  { alpn = "h2", pool = "other" },
  { source = "10.0.0.0/8", pool = "other" },
  { protocol = "http", path_prefix = "/", pool = "app" },
]
sniff_timeout = "1s"'
write_config "$work/plain.toml" "$http_port" ""
write_config "$work/routed.toml" "$http_port" "$routes"
write_config "$work/plain-idle.toml" "$sink_port" ""
write_config "$work/routed-idle.toml" "$sink_port" "$routes"


cpu_per_request() { # $1 config, then ringload rr options
  local config=$1 pid t0 t1 reqs errors
  shift
  pid=$(start_proxy "$config")
  timeout 10 "$ringload" rr --target "127.0.0.1:$proxy_port" --http --connections 64 --threads 1 \
    --duration 1s "$@" >/dev/null 2>&1 || true
  t0=$(cpu_ticks "$pid")
  timeout $((DUR + 10)) "$ringload" rr --target "127.0.0.1:$proxy_port" --http --connections 64 \
    --threads 1 --duration "${DUR}s" --json "$work/rr.json" "$@" >/dev/null 2>&1 || true
  t1=$(cpu_ticks "$pid")
  reqs=$(jq -r '.requests' "$work/rr.json" 2>/dev/null || echo 0)
  errors=$(jq -r '.errors_total' "$work/rr.json" 2>/dev/null || echo 0)
  stop_pid "$pid"
  [ "${errors:-0}" = 0 ] || echo "warning: $errors errors" >&2
  awk -v t="$((t1 - t0))" -v c="$clk" -v r="${reqs:-0}" \
    'BEGIN { if (r > 0) printf "%.2f", t * 1e6 / c / r; else print "nan" }'
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

bytes_per_idle_session() { # $1 config
  local pid before held hold
  pid=$(start_proxy "$1")
  sleep 0.3
  before=$(rss_kib "$pid")
  "$ringload" hold --target "127.0.0.1:$proxy_port" --connections "$SESSIONS" --rate 20000 \
    --hold 20s >/dev/null 2>&1 &
  hold=$!
  # Every session connected to its server (two descriptors each) and past sniff_timeout.
  for _ in $(seq 150); do
    [ "$(ls "/proc/$pid/fd" | wc -l)" -ge $((2 * SESSIONS)) ] && break
    sleep 0.1
  done
  sleep 2
  held=$(rss_kib "$pid")
  kill "$hold" 2>/dev/null || true
  wait "$hold" 2>/dev/null || true
  stop_pid "$pid"
  awk -v a="$before" -v b="$held" -v n="$SESSIONS" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }'
}

results="$work/results.txt"
: >"$results"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="plain routed"; else order="routed plain"; fi
  for config in $order; do
    echo "$round newconn $config $(cpu_per_request "$work/$config.toml" --new-connection-per-request)" | tee -a "$results" >&2
    echo "$round keepalive $config $(cpu_per_request "$work/$config.toml")" | tee -a "$results" >&2
  done
done
for round in 1 2 3; do
  for config in plain routed; do
    echo "$round idlemem $config $(bytes_per_idle_session "$work/$config-idle.toml")" | tee -a "$results" >&2
  done
done

echo
echo "date $(date -u +%FT%TZ), kernel $(uname -r), commit $(git -C "$root" rev-parse --short HEAD), $ROUNDS rounds of ${DUR}s, $SESSIONS idle sessions, $bin ($("$bin" --version))"
python3 - "$results" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
def table(kind, unit, difference=False):
    per = {}
    for row in rows:
        if row[1] == kind and row[3] != "nan":
            per.setdefault(row[2], {})[row[0]] = float(row[3])
    b, o = per.get("plain", {}), per.get("routed", {})
    fmt = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-"
    if difference:
        diffs = [o[r] - b[r] for r in o if r in b]
        last = f"routed-plain: {statistics.median(diffs):+.0f} B (rounds {min(diffs):+.0f} to {max(diffs):+.0f})" if diffs else "-"
    else:
        ratios = [o[r] / b[r] for r in o if r in b]
        last = f"routed/plain: {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})" if ratios else "-"
    print(f"| {unit} | {fmt(list(b.values()))} | {fmt(list(o.values()))} | {last} |")
print("| figure | no routes, median (min-max) | 8 routes, median (min-max) | comparison |")
print("|---|---|---|---|")
table("newconn", "proxy CPU us per new connection")
table("keepalive", "proxy CPU us per keep-alive request")
table("idlemem", "user memory per idle session (bytes)", difference=True)
PY
