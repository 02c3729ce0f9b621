#!/usr/bin/env bash
# How fast one shard cuts idle sessions once the drain deadline passes. Per round: a sink server
# (ringload serve --mode sink), ringproxy with one shard and drain_timeout = "1s" in front of it,
# SESSIONS idle proxied sessions opened by ringload hold, then SIGTERM. The rate is SESSIONS over
# the time from the proxy's "drain timeout: cutting remaining sessions" log line to its
# "shard stopped" line; also reported: signal to exit. With OLD_BIN (a previous release binary)
# both builds run in the same rounds, alternating.
#
#   bench/cut.sh                                  # 8000 sessions, 3 rounds
#   OLD_BIN=/tmp/old/ringproxy ROUNDS=5 bench/cut.sh
#
# Loopback only; every process started here is stopped by its PID. One process holds two
# descriptors per session, so SESSIONS stays under RLIMIT_NOFILE / 2.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sessions=${SESSIONS:-8000}
rounds=${ROUNDS:-3}
cargo build --release -p ringproxy -p ringload --manifest-path "$root/Cargo.toml" >/dev/null
new_bin=$root/target/release/ringproxy
ringload=$root/target/release/ringload
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
start_work cut
ulimit -n "$(ulimit -Hn)"

wait_for_line() { # file pattern seconds
  for _ in $(seq $(( $3 * 10 ))); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

one_round() { # label binary
  local label=$1 bin=$2
  "$ringload" serve --mode sink --listen 127.0.0.1:0 --threads 1 --duration 10m >"$work/sink.out" 2>&1 &
  local sink=$!
  pids+=("$sink")
  wait_for_line "$work/sink.out" '^listening' 10
  local sink_addr
  sink_addr=$(awk '/^listening/ {print $2; exit}' "$work/sink.out")
  cat >"$work/proxy.toml" <<EOF
[runtime]
shards = 1
drain_timeout = "1s"
[[listener]]
name = "front"
bind = "127.0.0.1:0"
pool = "sink"
[[pool]]
name = "sink"
servers = [ { addr = "$sink_addr" } ]
EOF
  RUST_LOG=info "$bin" --log-format json run --config "$work/proxy.toml" 2>"$work/proxy.log" &
  local proxy=$!
  pids+=("$proxy")
  wait_for_line "$work/proxy.log" 'listener ready' 10
  local proxy_addr
  proxy_addr=$(grep 'listener ready' "$work/proxy.log" | head -1 | sed 's/.*"addr":"\([^"]*\)".*/\1/')
  "$ringload" hold --target "$proxy_addr" --connections "$sessions" --rate 20000 --hold 5m \
    >"$work/hold.out" 2>&1 &
  local hold=$!
  pids+=("$hold")
  # Established end to end: the proxy holds two descriptors per session.
  for _ in $(seq 600); do
    local fds
    fds=$(ls "/proc/$proxy/fd" 2>/dev/null | wc -l)
    [ "$fds" -ge $(( 2 * sessions )) ] && break
    sleep 0.1
  done
  sleep 0.5
  local signalled exited
  signalled=$(date +%s.%N)
  kill -TERM "$proxy"
  wait "$proxy" || true
  exited=$(date +%s.%N)
  kill "$hold" "$sink" 2>/dev/null || true
  wait "$hold" "$sink" 2>/dev/null || true
  python3 - "$work/proxy.log" "$label" "$sessions" "$signalled" "$exited" <<'PY'
import json, sys
from datetime import datetime
log, label, sessions, signalled, exited = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
stamps = {}
for line in open(log):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    message = entry.get("fields", {}).get("message", "")
    for key in ("cutting remaining sessions", "shard stopped", "exiting anyway"):
        if key in message and key not in stamps:
            stamps[key] = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
cut = stamps.get("drain timeout: cutting remaining sessions", stamps.get("cutting remaining sessions"))
stopped = stamps.get("shard stopped")
gave_up = "exiting anyway" in stamps
if cut is None or stopped is None:
    print(f"{label} no cut/stop lines in the log")
else:
    seconds = max(stopped - cut, 1e-6)
    print(f"{label} sessions {sessions} cut_seconds {seconds:.3f} rate_per_s {sessions / seconds:.0f} "
          f"signal_to_exit_s {exited - signalled:.2f} gave_up {gave_up}")
PY
  pids=()
}

echo "date $(date -u +%FT%TZ) kernel $(uname -r) commit $(git -C "$root" rev-parse --short HEAD) sessions $sessions"
for round in $(seq "$rounds"); do
  one_round "round$round new" "$new_bin"
  if [ -n "${OLD_BIN:-}" ]; then one_round "round$round old" "$OLD_BIN"; fi
done
