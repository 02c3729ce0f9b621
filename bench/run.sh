#!/usr/bin/env bash
# Side-by-side benchmark: ringproxy beside HAProxy, NGINX and the direct path, same box, same
# backend, same load, one run (../shared/baseline does the measuring). Loopback only; every load
# is bounded by the harness.
#
#   bench/run.sh            # L4 targets: keep-alive c64/c256, connection per request, iperf3 -P1/-P4
#   bench/run.sh idle       # + user-space bytes per idle proxied connection at 9,000 (HAProxy, ringproxy)
#   DUR=3 REPS=1 bench/run.sh   # smoke
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
baseline=${BASELINE_DIR:-$root/../shared/baseline}
[ -x "$baseline/run_baseline.sh" ] || { echo "no baseline harness at $baseline" >&2; exit 2; }
for tool in haproxy nginx wrk iperf3 curl jq; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y haproxy nginx libnginx-mod-stream wrk iperf3 curl jq" >&2; exit 2; }
done

cargo build --release --manifest-path "$root/Cargo.toml"
export RINGPROXY_BIN=$root/target/release/ringproxy
export DUR=${DUR:-10} REPS=${REPS:-3}
export HTTP_TARGETS=${HTTP_TARGETS-"direct rp-tcp-1s rp-tcp-2s hap-tcp-1t hap-tcp-2t ngx-stream-1w ngx-stream-2w"}
export IPERF_TARGETS=${IPERF_TARGETS-"direct rp-tcp-1s rp-tcp-2s hap-tcp-1t hap-tcp-2t hap-tcp-1t-splice ngx-stream-1w ngx-stream-2w"}
work=${BASELINE_WORK:-${TMPDIR:-/tmp}/ringproxy-baseline}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "kernel: $(uname -r)"
  echo "commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "ringproxy: $("$RINGPROXY_BIN" --version)"
  echo "command: DUR=$DUR REPS=$REPS HTTP_TARGETS='$HTTP_TARGETS' IPERF_TARGETS='$IPERF_TARGETS' run_baseline.sh"
} | tee /tmp/ringproxy-bench-setup.txt

"$baseline/run_baseline.sh"
latest=$(readlink -f "$work/results/latest" 2>/dev/null || true)
[ -n "$latest" ] && cp /tmp/ringproxy-bench-setup.txt "$latest/ringproxy-setup.txt"

if [ "${1:-}" = idle ]; then
  for mode in ringproxy haproxy; do "$baseline/run_idle_mem.sh" "$mode" 9000; done
  python3 "$baseline/idle_summary.py" "$work/results"
fi
