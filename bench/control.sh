#!/usr/bin/env bash
# What the control plane costs, measured in one run on this box:
#   1. proxy CPU per keep-alive request (wrk -c64) with health checks at 1 s, the admin API and a
#      real Prometheus scraping /metrics every second, against the same build with no admin and no
#      checks, alternating rounds (paired ratios, as bench/ab.sh);
#   2. the control thread's CPU while health-checking 1,000 servers every second (% of one core);
#   3. /metrics render time with those 1,000 servers (median of 20 requests);
#   4. applying a reload of a config with 1,000 pools (the duration /reload reports, median of 10).
#
#   bench/control.sh [BIN]          # default: target/release/ringproxy (built first)
#   ROUNDS=7 DUR=5 bench/control.sh
#
# Needs nginx, wrk, curl, jq, prometheus (Debian packages). Loopback only; every load is bounded
# and every process started here is stopped by PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
require_tools nginx wrk curl jq prometheus python3
pick_binaries "${1:-}"
ROUNDS=${ROUNDS:-7}
DUR=${DUR:-5}
start_work control
clk=$(getconf CLK_TCK)
# Below the ephemeral port range (10000-65535 here): no TIME_WAIT connection of an earlier
# load can hold them.
backend=9080 front=9121 admin=9900 prom=9990

cat >"$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 8192; }
http {
  access_log off;
  server { listen 127.0.0.1:$backend reuseport backlog=4096; keepalive_requests 10000000;
           location / { return 200 "ok\n"; } }
}
EOF
nginx -c "$work/nginx.conf" -p "$work" 2>/dev/null & pids+=($!)

plain_config() {
  cat <<EOF
[runtime]
shards = 1
drain_timeout = "1s"
[[listener]]
name = "front"
bind = "127.0.0.1:$front"
pool = "app"
[[pool]]
name = "app"
servers = [ { addr = "127.0.0.1:$backend" } ]
EOF
}
control_config() {
  plain_config
  cat <<EOF
[pool.health]
kind = "http"
interval = "1s"
timeout = "500ms"
path = "/"
start = "up"
[admin]
bind = "127.0.0.1:$admin"
EOF
}
plain_config >"$work/plain.toml"
control_config >"$work/control.toml"
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: ringproxy
    static_configs:
      - targets: ['127.0.0.1:$admin']
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom" --log.level=error >/dev/null 2>&1 & pids+=($!)
sleep 1

measure() {
  local config=$1 pid t0 t1 out reqs
  "$bin" run --config "$config" 2>"$work/proxy.err" & pid=$!
  for _ in $(seq 50); do grep -q "listener ready" "$work/proxy.err" 2>/dev/null && break; sleep 0.05; done
  timeout 10 wrk -t1 -c64 -d1s "http://127.0.0.1:$front/" >/dev/null 2>&1 || true
  t0=$(cpu_ticks "$pid")
  out=$(timeout $((DUR + 10)) wrk -t1 -c64 -d"${DUR}s" "http://127.0.0.1:$front/" 2>&1 || true)
  t1=$(cpu_ticks "$pid")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  awk -v t="$((t1 - t0))" -v c="$clk" -v r="${reqs:-0}" 'BEGIN { if (r > 0) printf "%.2f", t * 1e6 / c / r; else print "nan" }'
}

echo "== 1. keep-alive CPU per request: plain vs health checks + admin + 1 s Prometheus scrape"
: >"$work/rounds.txt"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 0 ]; then order="plain control"; else order="control plain"; fi
  for which in $order; do
    value=$(measure "$work/$which.toml")
    echo "$round $which $value" | tee -a "$work/rounds.txt"
  done
done
python3 - "$work/rounds.txt" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
data = {}
for round_, which, value in rows:
    if value != "nan":
        data.setdefault(which, {})[round_] = float(value)
for which in ("plain", "control"):
    values = list(data.get(which, {}).values())
    print(f"{which:8} median {statistics.median(values):.2f} us/req (min {min(values):.2f}, max {max(values):.2f})")
paired = [data["control"][r] / data["plain"][r] for r in data["control"] if r in data["plain"]]
print(f"control/plain per-round ratios {sorted(round(p, 3) for p in paired)}; median {statistics.median(paired):.3f}")
EOF

echo "== 2-3. 1,000 checked servers: control-thread CPU and /metrics render time"
addresses=()
for host in $(seq 2 251); do
  for port in 9001 9002 9003 9004; do addresses+=("127.0.0.$host:$port"); done
done
listen=$(IFS=,; echo "${addresses[*]:0:1000}")
"$ringload" serve --mode http --listen "$listen" --threads 1 --duration 10m >/dev/null 2>&1 & pids+=($!)
sleep 1
{
  echo '[runtime]'; echo 'shards = 1'
  echo '[admin]'; echo "bind = \"127.0.0.1:$admin\""
  echo '[[listener]]'; echo 'name = "front"'; echo "bind = \"127.0.0.1:$front\""; echo 'pool = "many"'
  echo '[[pool]]'; echo 'name = "many"'; echo 'servers = ['
  for addr in "${addresses[@]:0:1000}"; do echo "  { addr = \"$addr\" },"; done
  echo ']'
  echo '[pool.health]'; echo 'kind = "http"'; echo 'interval = "1s"'; echo 'timeout = "500ms"'; echo 'path = "/"'
} >"$work/many.toml"
"$bin" run --config "$work/many.toml" 2>"$work/many.err" & proxy=$!
pids+=($proxy)
sleep 5
control_tid=$(grep -l '^control$' /proc/$proxy/task/*/comm | head -1 | xargs dirname | xargs basename)
up=$(curl -s "127.0.0.1:$admin/status" | jq '[.pools[0].servers[] | select(.state == "up")] | length')
[ "$up" = 1000 ] || echo "WARNING: only $up of 1000 servers are up: these figures are not comparable" >&2
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$proxy/task/$control_tid/stat")
sleep 30
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$proxy/task/$control_tid/stat")
awk -v u="$((u1 - u0))" -v s="$((s1 - s0))" -v c="$clk" -v up="$up" \
  'BEGIN { printf "control thread: %.2f%% of one core over 30 s checking 1000 servers every 1 s (%d up); user %.2f%%, system %.2f%% (on loopback the system part includes both ends of each handshake)\n", (u + s) / c / 30 * 100, up, u / c / 30 * 100, s / c / 30 * 100 }'
for _ in $(seq 20); do curl -s -o /dev/null -w '%{time_total}\n' "127.0.0.1:$admin/metrics"; done | sort -n \
  | awk '{ v[NR] = $1 } END { printf "/metrics with 1000 servers: median %.1f ms, max %.1f ms (%d requests)\n", v[int((NR + 1) / 2)] * 1000, v[NR] * 1000, NR }'
kill -TERM "$proxy"; wait "$proxy" 2>/dev/null || true
if command -v haproxy >/dev/null; then
  # The same 1,000 HTTP checks every second by HAProxy (one thread, no traffic), for scale.
  {
    echo 'global'; echo '  nbthread 1'; echo '  maxconn 2000'
    echo 'defaults'; echo '  mode tcp'; echo '  timeout connect 500ms'; echo '  timeout client 10s'
    echo '  timeout server 10s'; echo '  timeout check 500ms'
    # HAProxy will not start without a listener; this one gets no traffic.
    echo 'frontend idle'; echo "  bind 127.0.0.1:$front"; echo '  default_backend many'
    echo 'backend many'; echo '  option httpchk GET /'; echo '  default-server check inter 1s'
    index=0
    for addr in "${addresses[@]:0:1000}"; do echo "  server s$index $addr"; index=$((index + 1)); done
  } >"$work/haproxy-many.cfg"
  haproxy -db -f "$work/haproxy-many.cfg" >/dev/null 2>&1 & hap=$!
  pids+=($hap)
  sleep 5
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$hap/stat")
  sleep 30
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$hap/stat")
  awk -v u="$((u1 - u0))" -v s="$((s1 - s0))" -v c="$clk" \
    'BEGIN { printf "haproxy, same 1000 http checks every 1 s: %.2f%% of one core (user %.2f%%, system %.2f%%)\n", (u + s) / c / 30 * 100, u / c / 30 * 100, s / c / 30 * 100 }'
  kill -TERM "$hap"; wait "$hap" 2>/dev/null || true
fi

echo "== 4. reload of a config with 1,000 pools"
write_pools() {
  local weight=$1
  echo '[runtime]'; echo 'shards = 2'
  echo '[admin]'; echo "bind = \"127.0.0.1:$admin\""
  echo '[[listener]]'; echo 'name = "front"'; echo "bind = \"127.0.0.1:$front\""; echo 'pool = "pool0"'
  for i in $(seq 0 999); do
    echo '[[pool]]'; echo "name = \"pool$i\""
    echo "servers = [ { addr = \"127.0.0.1:$backend\", weight = $(( (i + weight) % 9 + 1 )) } ]"
  done
}
write_pools 0 >"$work/pools.toml"
RINGPROXY_ADMIN_TOKEN=bench "$bin" run --config "$work/pools.toml" 2>"$work/pools.err" & proxy=$!
pids+=($proxy)
sleep 2
for step in $(seq 1 10); do
  write_pools "$step" >"$work/pools.toml"
  curl -s -X POST -H "Authorization: Bearer bench" "127.0.0.1:$admin/reload" | jq -r '.duration_ms'
done | sort -n | awk '{ v[NR] = $1 } END { printf "reload with 1000 pools: median %.1f ms, max %.1f ms (%d reloads)\n", v[int((NR + 1) / 2)], v[NR], NR }'
kill -TERM "$proxy"; wait "$proxy" 2>/dev/null || true
echo "date $(date -u +%FT%TZ), kernel $(uname -r), $("$bin" --version)"
