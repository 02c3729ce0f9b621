# Shared by the bench scripts (sourced, never run): tool checks, the binaries under test, a
# work directory whose processes are stopped by PID on exit, and CPU readings.

# Exits 2 naming the first of these commands that is missing.
require_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install $*)" >&2; exit 2; }
  done
}

# Sets `ngx_stream_module` to the stream module nginx must load (empty when it is built in);
# exits 2 when nginx has no stream module (Debian: libnginx-mod-stream).
find_nginx_stream() {
  ngx_stream_module=
  if nginx -V 2>&1 | tr ' ' '\n' | grep -q -- '--with-stream=dynamic'; then
    ngx_stream_module=$(find /usr/lib/nginx/modules -name 'ngx_stream_module.so' 2>/dev/null | head -1)
    [ -n "$ngx_stream_module" ] || { echo "nginx has no stream module (apt-get install libnginx-mod-stream)" >&2; exit 2; }
  fi
}

# One three-way run: each round, for each of WORKLOADS, `configs_for WORKLOAD` (defined by the
# script) then `measure TARGET WORKLOAD` (likewise; prints "value rate") for ringproxy, HAProxy
# and NGINX, their order rotated each round. Rows "round workload target value rate" go to
# `$work/results.txt` (set as `results`) and to stderr.
run_three_way() {
  results="$work/results.txt"
  : >"$results"
  local targets=(rp hap ngx) round workload offset target value rate
  for round in $(seq "$ROUNDS"); do
    for workload in $WORKLOADS; do
      configs_for "$workload"
      for offset in 0 1 2; do
        target=${targets[$(((offset + round) % 3))]}
        read -r value rate < <(measure "$target" "$workload")
        echo "$round $workload $target $value $rate" | tee -a "$results" >&2
      done
    done
  done
}

# Sets `bin` (argument 1, or the release build, built first) and `ringload` beside it.
pick_binaries() {
  if [ $# -ge 1 ] && [ -n "$1" ]; then
    bin=$1
  else
    cargo build --release --manifest-path "$root/Cargo.toml" -p ringproxy -p ringload >/dev/null
    bin=$root/target/release/ringproxy
  fi
  ringload=$(dirname "$bin")/ringload
  [ -x "$ringload" ] || { echo "no ringload beside $bin" >&2; exit 2; }
}

# A fresh `work` directory; every PID added to `pids` is stopped on exit, then it is removed.
start_work() { # name
  work=$(mktemp -d "/tmp/ringproxy-$1.XXXXXX")
  pids=()
  trap stop_work EXIT
}

stop_work() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# utime + stime of a process (or task), in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Starts `bin` on a config and waits (up to 5 s) for its "listener ready" line; prints the pid.
start_proxy() { # config
  "$bin" run --config "$1" >/dev/null 2>"$work/proxy.err" &
  local pid=$!
  for _ in $(seq 100); do
    grep -q "listener ready" "$work/proxy.err" 2>/dev/null && break
    sleep 0.05
  done
  echo "$pid"
}

# Stops a process this script started, by PID, and reaps it.
stop_pid() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# CPU ticks of a process and its children (nginx's worker).
tree_ticks() {
  local total child
  total=$(cpu_ticks "$1")
  for child in $(cat "/proc/$1/task/"*/children 2>/dev/null); do
    total=$((total + $(cpu_ticks "$child")))
  done
  echo "$total"
}
