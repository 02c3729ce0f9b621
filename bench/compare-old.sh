#!/usr/bin/env bash
# Before/after in one run: the current build against a previous release binary, beside HAProxy
# and NGINX, through ../shared/baseline. The baseline harness knows two ringproxy targets; here
# rp-tcp-1s runs the current build and rp-tcp-2s runs OLD_BIN with ONE shard (its generated
# config is rewritten to shards = 1), so both builds see the same rounds, rotated with the
# other targets.
#
#   OLD_BIN=/tmp/ringproxy-old DUR=10 REPS=5 bench/compare-old.sh
#
# Read rp-tcp-1s as "new" and rp-tcp-2s as "old" in the summary. Loopback only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
: "${OLD_BIN:?set OLD_BIN to the previous release binary}"
cargo build --release --manifest-path "$root/Cargo.toml" >/dev/null
wrapper=$(mktemp /tmp/ringproxy-compare.XXXXXX)
trap 'rm -f "$wrapper"' EXIT
cat >"$wrapper" <<WRAP
#!/usr/bin/env bash
# run --config FILE: a config with two shards is the old binary's target, run on one shard.
config=""
for arg in "\$@"; do [ "\${previous:-}" = --config ] && config=\$arg; previous=\$arg; done
if [ -n "\$config" ] && grep -q '^shards = 2' "\$config"; then
  sed -i 's/^shards = 2/shards = 1/' "\$config"
  exec "$OLD_BIN" "\$@"
fi
exec "$root/target/release/ringproxy" "\$@"
WRAP
chmod +x "$wrapper"
export RINGPROXY_BIN=$wrapper
export DUR=${DUR:-10} REPS=${REPS:-5}
export HTTP_TARGETS=${HTTP_TARGETS-"rp-tcp-1s rp-tcp-2s hap-tcp-1t ngx-stream-1w"}
export IPERF_TARGETS=${IPERF_TARGETS-"rp-tcp-1s rp-tcp-2s hap-tcp-1t ngx-stream-1w"}
echo "new: $(git -C "$root" rev-parse --short HEAD) $("$root/target/release/ringproxy" --version); old: $OLD_BIN $("$OLD_BIN" --version)"
"${BASELINE_DIR:-$root/../shared/baseline}/run_baseline.sh"
