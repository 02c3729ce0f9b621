#!/usr/bin/env bash
# A/B of ringproxy builds in one run: the same workloads through each binary, alternating within
# every round, so a slow phase of this shared box hits every build alike. Reports, per workload,
# each build's median and the median of the per-round ratios against the first build (the
# steadiest figure on 2 cores: paired rounds cancel most of the drift between rounds).
#
#   bench/ab.sh OLD_BIN NEW_BIN [MORE_BINS...]
#   ROUNDS=7 DUR=5 WORKLOADS="ka64 ka256 close64 iperf1 iperf4" bench/ab.sh /tmp/old target/release/ringproxy
#
# Workloads: kaN = wrk -t1 -cN keep-alive, closeN = new connection per request, latN = wrk
# -t1 -cN keep-alive for its p99 latency, iperfP = iperf3 -P P. Figures: proxy CPU us per
# request (utime+stime from /proc/PID/stat) for ka and close, p99 in ms for lat, and Gbit/s for
# iperf3. Backends: nginx (1 worker, `return 200`) and iperf3 -s, both on loopback.
# Every load is bounded by DUR; every process started here is stopped by PID.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 BASE_BIN OTHER_BIN [MORE_BINS...]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
require_tools nginx wrk iperf3 jq
ROUNDS=${ROUNDS:-7}
DUR=${DUR:-5}
WORKLOADS=${WORKLOADS:-"ka64 ka256 close64 iperf1 iperf4"}
bins=("$@")
start_work ab
# Below the ephemeral port range (10000-65535 here): no TIME_WAIT connection holds them.
http_port=9180 iperf_port=9201 proxy_http=9181 proxy_bulk=9221
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 8192; }
http {
  access_log off;
  server { listen 127.0.0.1:$http_port reuseport backlog=4096; keepalive_requests 10000000;
           location / { return 200 "ok\n"; } }
}
EOF
cat >"$work/proxy.toml" <<EOF
[runtime]
shards = 1
drain_timeout = "1s"
[[listener]]
name = "front"
bind = "127.0.0.1:$proxy_http"
pool = "app"
[[listener]]
name = "bulk"
bind = "127.0.0.1:$proxy_bulk"
pool = "iperf"
[[pool]]
name = "app"
servers = [ { addr = "127.0.0.1:$http_port" } ]
[[pool]]
name = "iperf"
servers = [ { addr = "127.0.0.1:$iperf_port" } ]
EOF
nginx -c "$work/nginx.conf" -p "$work" 2>/dev/null & pids+=($!)
iperf3 -s -B 127.0.0.1 -p "$iperf_port" >/dev/null 2>&1 & pids+=($!)
sleep 0.5
clk=$(getconf CLK_TCK)

# One measurement: prints the figure for workload $2 through binary $1.
measure() {
  local bin=$1 workload=$2 pid value t0 t1 out reqs
  "$bin" run --config "$work/proxy.toml" 2>"$work/proxy.err" &
  pid=$!
  for _ in $(seq 50); do
    grep -q "listener ready" "$work/proxy.err" 2>/dev/null && break
    sleep 0.05
  done
  case $workload in
    ka*|close*)
      local conns=${workload#ka}; conns=${conns#close}
      local extra=()
      [[ $workload == close* ]] && extra=(-H "Connection: close")
      timeout 10 wrk -t1 -c"$conns" -d1s "${extra[@]}" "http://127.0.0.1:$proxy_http/" >/dev/null 2>&1 || true
      t0=$(cpu_ticks "$pid")
      out=$(timeout $((DUR + 10)) wrk -t1 -c"$conns" -d"${DUR}s" "${extra[@]}" "http://127.0.0.1:$proxy_http/" 2>&1 || true)
      t1=$(cpu_ticks "$pid")
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      value=$(awk -v t="$((t1 - t0))" -v c="$clk" -v r="${reqs:-0}" \
        'BEGIN { if (r > 0) printf "%.2f", t * 1e6 / c / r; else print "nan" }')
      ;;
    lat*)
      timeout 10 wrk -t1 -c"${workload#lat}" -d1s "http://127.0.0.1:$proxy_http/" >/dev/null 2>&1 || true
      out=$(timeout $((DUR + 10)) wrk -t1 -c"${workload#lat}" -d"${DUR}s" --latency "http://127.0.0.1:$proxy_http/" 2>&1 || true)
      value=$(awk '$1 == "99%" {
          v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v)
          if (unit == "us") v /= 1000; else if (unit == "s") v *= 1000
          printf "%.3f", v; found = 1 }
        END { if (!found) print "nan" }' <<<"$out")
      ;;
    iperf*)
      value=$(timeout $((DUR + 10)) iperf3 -c 127.0.0.1 -p "$proxy_bulk" -P "${workload#iperf}" -t "$DUR" -J 2>/dev/null \
        | jq -r '.end.sum_received.bits_per_second / 1e9 | . * 100 | round / 100' || echo nan)
      ;;
  esac
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "$value"
}

results="$work/results.txt"
: >"$results"
for round in $(seq "$ROUNDS"); do
  for workload in $WORKLOADS; do
    # Rotate the order each round so no build always runs first.
    count=${#bins[@]}
    for offset in $(seq 0 $((count - 1))); do
      index=$(((offset + round) % count))
      value=$(measure "${bins[$index]}" "$workload")
      echo "$round $workload $index $value" | tee -a "$results" >&2
    done
  done
done

echo
echo "date $(date -u +%FT%TZ), kernel $(uname -r), $ROUNDS rounds of ${DUR}s; builds:"
for index in "${!bins[@]}"; do echo "  [$index] ${bins[$index]} ($("${bins[$index]}" --version 2>/dev/null))"; done
echo "figures: proxy CPU us/request (ka*, close*), p99 ms (lat*) or Gbit/s (iperf*); ratio = median of per-round ratios to [0]"
python3 - "$results" "${#bins[@]}" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
builds = int(sys.argv[2])
data = {}
for round_, workload, index, value in rows:
    if value == "nan":
        continue
    data.setdefault(workload, {}).setdefault(int(index), {})[round_] = float(value)
header = "| workload | " + " | ".join(f"[{i}] median (min-max)" for i in range(builds)) + " | " + \
    " | ".join(f"[{i}]/[0]" for i in range(1, builds)) + " |"
print(header)
print("|" + "---|" * (1 + builds + builds - 1))
for workload, per_build in data.items():
    cells = []
    for i in range(builds):
        values = list(per_build.get(i, {}).values())
        cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})" if values else "-")
    ratios = []
    for i in range(1, builds):
        paired = [per_build[i][r] / per_build[0][r] for r in per_build.get(i, {}) if r in per_build.get(0, {})]
        ratios.append(f"{statistics.median(paired):.3f}" if paired else "-")
    print(f"| {workload} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
EOF
