#!/usr/bin/env bash
# Minutes of new connections at full speed through a 2-shard ringproxy (ringload rr
# --new-connection-per-request against ringload serve echo): the proxy's RSS, open descriptors
# and each shard's timer wheel (entries allocated, from /metrics) sampled every 10 s must stay
# flat: the wheel follows live sessions, not the connections made. At exit each shard reports
# its wheel once more (timers armed, nodes allocated).
#
#   bench/churn.sh                    # 180 s
#   SECONDS_TOTAL=600 bench/churn.sh
# Loopback only; every process started here is stopped by its PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
total=${SECONDS_TOTAL:-180}
cargo build --release -p ringproxy -p ringload --manifest-path "$root/Cargo.toml" >/dev/null
bin=$root/target/release/ringproxy
ringload=$root/target/release/ringload
work=$(mktemp -d /tmp/ringproxy-churn.XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
"$ringload" serve --mode echo --listen 127.0.0.1:0 --threads 1 --duration 1h >"$work/echo.out" 2>&1 &
pids+=($!)
for _ in $(seq 50); do grep -q '^listening' "$work/echo.out" && break; sleep 0.1; done
echo_addr=$(awk '/^listening/ {print $2; exit}' "$work/echo.out")
cat >"$work/proxy.toml" <<CONF
[runtime]
shards = 2
[admin]
bind = "127.0.0.1:0"
[[listener]]
name = "front"
bind = "127.0.0.1:0"
pool = "echo"
[[pool]]
name = "echo"
source_addresses = ["127.0.0.2-127.0.0.40"]
servers = [ { addr = "$echo_addr" } ]
CONF
RUST_LOG=info "$bin" --log-format json run --config "$work/proxy.toml" 2>"$work/proxy.log" &
proxy=$!
pids+=($proxy)
for _ in $(seq 50); do grep -q 'listener ready' "$work/proxy.log" && break; sleep 0.1; done
addr=$(grep 'listener ready' "$work/proxy.log" | head -1 | sed 's/.*"addr":"\([^"]*\)".*/\1/')
for _ in $(seq 50); do grep -q 'admin API ready' "$work/proxy.log" && break; sleep 0.1; done
admin=$(grep 'admin API ready' "$work/proxy.log" | head -1 | sed 's/.*"addr":"\([^"]*\)".*/\1/')
# Each shard's timer wheel entries, "shard=nodes" pairs.
wheel() {
  curl -s --max-time 2 "http://$admin/metrics" |
    awk '/^ringproxy_shard_timer_nodes/ { match($0, /shard="[0-9]+"/); printf "%s=%s ", substr($0, RSTART + 7, RLENGTH - 8), $2 }'
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$proxy/status"; }
echo "date $(date -u +%FT%TZ) commit $(git -C "$root" rev-parse --short HEAD) seconds $total"
"$ringload" rr --target "$addr" --new-connection-per-request --connections 32 --threads 1 \
  --duration "${total}s" >"$work/rr.out" 2>&1 &
load=$!
pids+=($load)
elapsed=0
while kill -0 "$load" 2>/dev/null; do
  echo "t=${elapsed}s proxy_rss_kib=$(rss) fds=$(ls /proc/$proxy/fd | wc -l) timer_nodes $(wheel)"
  sleep 10
  elapsed=$((elapsed + 10))
done
grep -E '^requests|errors' "$work/rr.out" || true
kill -TERM "$proxy"
wait "$proxy" || true
grep '"shard stopped"' "$work/proxy.log" | python3 -c '
import json, sys
for line in sys.stdin:
    f = json.loads(line)["fields"]
    print("shard %s: accepted %s timers_armed %s timer_nodes %s" % (f["shard"], f["accepted"], f["timers_armed"], f["timer_nodes"]))'
