#!/usr/bin/env bash
# ringload rr --http against wrk, same nginx backend (the baseline's config), same run, loopback.
#   bench/ringload-vs-wrk.sh            # 5 rounds of 5 s each, alternating
#   ROUNDS=3 SECONDS_EACH=3 bench/ringload-vs-wrk.sh
# Needs: nginx, wrk (apt-get install -y nginx wrk). Starts its own nginx on 127.0.0.1:18390 from
# ../shared/baseline's backend config and stops it (by PID) at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
baseline=${BASELINE_DIR:-$root/../shared/baseline}
rounds=${ROUNDS:-5}
each=${SECONDS_EACH:-5}
port=18390
work=$(mktemp -d /tmp/ringload-vs-wrk.XXXXXX)
mkdir -p "$work/run" "$work/logs"
cargo build --release -p ringload --manifest-path "$root/Cargo.toml" >/dev/null
ringload=$root/target/release/ringload

# The baseline's backend: generate its config, then move it to our port and prefix.
BASELINE_WORK=$work/baseline bash "$baseline/gen_configs.sh" >/dev/null 2>&1 || true
conf=$(ls "$work"/baseline/conf/backend-nginx.conf 2>/dev/null || true)
[ -n "$conf" ] || { echo "cannot generate the baseline backend config" >&2; exit 2; }
sed -e "s#$work/baseline#$work#g; s#127.0.0.1:18080#127.0.0.1:$port#" "$conf" > "$work/backend.conf"
nginx -p "$work/run" -c "$work/backend.conf" &
nginx_pid=$!
trap 'kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done

# CPU seconds (user+system) of a finished command, via /usr/bin/time.
measure() { /usr/bin/time -f "cpu %U %S" "$@" 2>&1; }
echo "round tool req/s cpu_s us_per_req"
for round in $(seq "$rounds"); do
  out=$(measure wrk -t1 -c64 -d"${each}s" "http://127.0.0.1:$port/")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  cpu=$(echo "$out" | awk '/^cpu/ {print $2 + $3}')
  echo "$round wrk $rps $cpu $(awk -v c="$cpu" -v r="$rps" -v s="$each" 'BEGIN {printf "%.2f", c * 1e6 / (r * s)}')"
  out=$(measure "$ringload" rr --target "127.0.0.1:$port" --http --connections 64 --threads 1 --duration "${each}s")
  rps=$(echo "$out" | awk '/^requests/ {print $(NF-4)}')
  cpu=$(echo "$out" | awk '/^cpu/ {print $2 + $3}')
  echo "$round ringload $rps $cpu $(awk -v c="$cpu" -v r="$rps" -v s="$each" 'BEGIN {printf "%.2f", c * 1e6 / (r * s)}')"
done | tee "$work/rounds.txt"
echo
echo "median req/s and client CPU us/req:"
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
for tool in wrk ringload; do
  rps=$(awk -v t="$tool" '$2 == t {print $3}' "$work/rounds.txt" | median)
  cpu=$(awk -v t="$tool" '$2 == t {print $5}' "$work/rounds.txt" | median)
  printf "%-9s %10.0f req/s  %6.2f us/req client CPU (medians of %s rounds)\n" "$tool" "$rps" "$cpu" "$rounds"
done
