#!/usr/bin/env bash
# What admission control costs, measured in one run on this box:
#   1. new connection per request (ringload rr --new-connection-per-request, 64 connections,
#      echo server ringload serve): proxy CPU us per connection with an ACL, per-source limits
#      and a listener rate configured but never hit, against the same build without them,
#      alternating in every round; ratio = median of the per-round ratios;
#   2. a flood of new connections (wrk, Connection: close, 64 connections, from 127.0.0.1) far
#      over a per-source limit of 1,000 connections per second: proxy CPU us per refused
#      connection, ringproxy (`reject = "reset"`) against HAProxy (`tcp-request connection
#      reject if { sc0_conn_rate gt 1000 }` with a stick table), side by side, one shard / one
#      thread each, alternating.
#
#   bench/admission.sh [BIN]          # default: target/release/ringproxy (built first)
#   ROUNDS=7 DUR=5 bench/admission.sh
#
# Needs haproxy, wrk, curl, jq, python3. Loopback only; every load is bounded by DUR and every
# process started here is stopped by PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
require_tools haproxy wrk curl jq python3
pick_binaries "${1:-}"
ROUNDS=${ROUNDS:-7}
DUR=${DUR:-5}
start_work admission
# Below the ephemeral port range (10000-65535 here), so no TIME_WAIT connection holds them.
echo_port=9301 http_port=9380 proxy_port=9321 admin_port=9399 hap_port=9322
clk=$(getconf CLK_TCK)

"$ringload" serve --mode echo --threads 1 --listen "127.0.0.1:$echo_port" --duration 1h >/dev/null 2>&1 & pids+=($!)
"$ringload" serve --mode http --threads 1 --listen "127.0.0.1:$http_port" --duration 1h >/dev/null 2>&1 & pids+=($!)
sleep 0.5

write_config() { # $1 file, $2 backend port, $3 listener extra
  cat >"$1" <<CONF
[runtime]
shards = 1
drain_timeout = "1s"
[admin]
bind = "127.0.0.1:$admin_port"
[[pool]]
name = "app"
servers = [ { addr = "127.0.0.1:$2" } ]
[[listener]]
name = "front"
bind = "127.0.0.1:$proxy_port"
pool = "app"
$3
CONF
}
write_config "$work/plain.toml" "$echo_port" ""
write_config "$work/admission.toml" "$echo_port" '[listener.limits]
connections_per_second = 10000000
burst = 10000000
[listener.per_source]
connections_per_second = 10000000
burst = 10000000
max_connections = 1000000
[listener.acl]
allow = ["10.0.0.0/8", "127.0.0.0/8", "::1/128"]
deny = ["127.0.0.66/32", "192.0.2.0/24"]'
write_config "$work/flood.toml" "$http_port" 'reject = "reset"
[listener.per_source]
connections_per_second = 1000
burst = 1000'
cat >"$work/haproxy.cfg" <<CONF
global
  maxconn 8000
  nbthread 1
  stats socket $work/haproxy.sock mode 600 level admin
defaults
  mode tcp
  timeout connect 1s
  timeout client 10s
  timeout server 10s
frontend front
  bind 127.0.0.1:$hap_port
  stick-table type ip size 100k expire 60s store conn_rate(1s)
  tcp-request connection track-sc0 src
  tcp-request connection reject if { sc0_conn_rate gt 1000 }
  default_backend app
backend app
  server s1 127.0.0.1:$http_port
CONF


# 1. CPU per connection: plain vs admission configured but not hit.
per_connection() { # $1 config
  local pid t0 t1 out reqs
  pid=$(start_proxy "$1")
  timeout 10 "$ringload" rr --target "127.0.0.1:$proxy_port" --new-connection-per-request \
    --connections 64 --threads 1 --duration 1s >/dev/null 2>&1 || true
  t0=$(cpu_ticks "$pid")
  out=$(timeout $((DUR + 10)) "$ringload" rr --target "127.0.0.1:$proxy_port" --new-connection-per-request \
    --connections 64 --threads 1 --duration "${DUR}s" --json "$work/rr.json" 2>&1 || true)
  t1=$(cpu_ticks "$pid")
  reqs=$(jq -r '.requests' "$work/rr.json" 2>/dev/null || echo 0)
  local errors
  errors=$(jq -r '.errors_total' "$work/rr.json" 2>/dev/null || echo 0)
  stop_pid "$pid"
  [ "${errors:-0}" = 0 ] || echo "warning: $errors errors" >&2
  awk -v t="$((t1 - t0))" -v c="$clk" -v r="${reqs:-0}" \
    'BEGIN { if (r > 0) printf "%.2f", t * 1e6 / c / r; else print "nan" }'
}

# 2. CPU per refused connection in a flood.
flood() { # $1 ringproxy|haproxy
  local pid port t0 t1 before after
  if [ "$1" = ringproxy ]; then
    pid=$(start_proxy "$work/flood.toml"); port=$proxy_port
    refused() { curl -s "http://127.0.0.1:$admin_port/status" | jq '.listeners[0].rejected_by_reason.source_rate'; }
  else
    haproxy -db -f "$work/haproxy.cfg" >/dev/null 2>&1 & pid=$!
    sleep 0.5; port=$hap_port
    refused() {
      python3 - "$work/haproxy.sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"show stat\n")
data = b""
while chunk := s.recv(65536): data += chunk
lines = data.decode().splitlines(); header = lines[0].lstrip("# ").split(",")
for line in lines[1:]:
    row = dict(zip(header, line.split(",")))
    if row.get("pxname") == "front" and row.get("svname") == "FRONTEND": print(row.get("dcon") or 0)
PY
    }
  fi
  timeout 10 wrk -t1 -c64 -d1s -H "Connection: close" "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
  sleep 1.2
  before=$(refused); t0=$(cpu_ticks "$pid")
  timeout $((DUR + 10)) wrk -t1 -c64 -d"${DUR}s" -H "Connection: close" "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
  t1=$(cpu_ticks "$pid")
  sleep 1.2
  after=$(refused)
  stop_pid "$pid"
  awk -v t="$((t1 - t0))" -v c="$clk" -v n="$((after - before))" \
    'BEGIN { if (n > 0) printf "%.2f %d\n", t * 1e6 / c / n, n; else print "nan 0" }'
}

results="$work/results.txt"
: >"$results"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="plain admission"; else order="admission plain"; fi
  for config in $order; do
    value=$(per_connection "$work/$config.toml")
    echo "$round percon $config $value" | tee -a "$results" >&2
  done
  if [ $((round % 2)) = 1 ]; then order="ringproxy haproxy"; else order="haproxy ringproxy"; fi
  for proxy in $order; do
    read -r value count < <(flood "$proxy")
    echo "$round flood $proxy $value $count" | tee -a "$results" >&2
  done
done

echo
echo "date $(date -u +%FT%TZ), kernel $(uname -r), $ROUNDS rounds of ${DUR}s, $bin ($("$bin" --version)), $(haproxy -v | head -1)"
python3 - "$results" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
def table(kind, base, other, unit):
    per = {}
    for row in rows:
        if row[1] == kind and row[3] != "nan":
            per.setdefault(row[2], {})[row[0]] = float(row[3])
    b, o = per.get(base, {}), per.get(other, {})
    ratios = [o[r] / b[r] for r in o if r in b]
    fmt = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-"
    print(f"| {unit} | {base}: {fmt(list(b.values()))} | {other}: {fmt(list(o.values()))} | {other}/{base}: "
          + (f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})" if ratios else "-") + " |")
print("| figure | base median (min-max) | other median (min-max) | ratio, median of per-round ratios |")
print("|---|---|---|---|")
table("percon", "plain", "admission", "proxy CPU us per new connection")
table("flood", "haproxy", "ringproxy", "proxy CPU us per refused connection")
counts = {}
for row in rows:
    if row[1] == "flood":
        counts.setdefault(row[2], []).append(int(row[4]))
for proxy, values in counts.items():
    print(f"refused per round ({proxy}): median {statistics.median(values):.0f} over {len(values)} rounds")
PY
