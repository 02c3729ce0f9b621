#!/usr/bin/env bash
# TLS termination, ringproxy against HAProxy (OpenSSL, one thread) and NGINX stream (OpenSSL,
# one worker), all terminating the same certificate in front of the same nginx backend, in one
# run: each round measures every proxy in turn (order rotated), and the medians are reported.
#
#   ROUNDS=5 DUR=5 bench/tls.sh [RINGPROXY_BIN]
#   WORKLOADS="hs-ecdsa hs-rsa ka64 bulk idle5000" (default: all)
#
# Workloads: hs-ecdsa / hs-rsa = wrk -t1 -c32 with `Connection: close`, a full handshake per
# request (session tickets and caches off in all three), ECDSA P-256 or RSA-2048 certificate;
# ka64 = wrk -t1 -c64 keep-alive over TLS; bulk = curl downloading 1 GiB over one TLS
# connection; idle5000 = 5,000 TLS connections held idle after their handshake
# (bench/tls_idle.py): bytes of proxy user memory per connection. Figures: proxy CPU us per request or per MiB (utime+stime of the proxy, from
# /proc/PID/stat), requests/s, Gbit/s. Loopback only; every process is stopped by PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
require_tools nginx haproxy wrk curl openssl python3
pick_binaries "${1:-}"
ROUNDS=${ROUNDS:-5}
DUR=${DUR:-5}
WORKLOADS=${WORKLOADS:-"hs-ecdsa hs-rsa ka64 bulk idle5000"}
start_work tls
backend=9380 rp=9381 hap=9382 ngx=9383
clk=$(getconf CLK_TCK)

# Certificates: ECDSA P-256 and RSA-2048 for bench.example.com, self-signed.
for kind in ecdsa rsa; do
  case $kind in
    ecdsa) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
    rsa) newkey=(-newkey rsa:2048) ;;
  esac
  openssl req -x509 "${newkey[@]}" -nodes -days 2 -subj /CN=bench.example.com \
    -addext subjectAltName=DNS:bench.example.com -keyout "$work/$kind.key" -out "$work/$kind.pem" 2>/dev/null
  cat "$work/$kind.pem" "$work/$kind.key" >"$work/$kind.combined.pem"
done
# 1 GiB of zeros for the bulk download (sparse: no disk).
truncate -s 1G "$work/big"
# nginx's worker (not root) reads it.
chmod 755 "$work"
chmod 644 "$work/big"

find_nginx_stream
cat >"$work/backend.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 8192; }
http {
  access_log off;
  server { listen 127.0.0.1:$backend reuseport backlog=4096; keepalive_requests 10000000; root $work;
           location = / { return 200 "ok\n"; } }
}
EOF
nginx -c "$work/backend.conf" -p "$work" 2>/dev/null & pids+=($!)

# Per certificate kind, the three proxies' configs.
write_configs() { # kind
  local kind=$1
  cat >"$work/rp.toml" <<EOF
[runtime]
shards = 1
drain_timeout = "1s"
[[listener]]
name = "tls"
bind = "127.0.0.1:$rp"
pool = "web"
[listener.tls]
certificates = [ { cert = "$work/$kind.pem", key = "$work/$kind.key" } ]
session_tickets = false
[[pool]]
name = "web"
servers = [ { addr = "127.0.0.1:$backend" } ]
EOF
  cat >"$work/hap.cfg" <<EOF
global
  nbthread 1
  maxconn 9000
  tune.ssl.cachesize 0
  ssl-default-bind-options no-tls-tickets
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend tls
  bind 127.0.0.1:$hap ssl crt $work/$kind.combined.pem
  default_backend web
backend web
  server s1 127.0.0.1:$backend
EOF
  cat >"$work/ngx.conf" <<EOF
${ngx_stream_module:+load_module $ngx_stream_module;}
worker_processes 1;
daemon off;
pid $work/ngx.pid;
error_log $work/ngx.err;
events { worker_connections 20000; }
stream {
  server {
    listen 127.0.0.1:$ngx ssl reuseport backlog=4096;
    # nginx 1.22 offers TLS 1.3 only when asked (its built-in default stops at 1.2).
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $work/$kind.pem;
    ssl_certificate_key $work/$kind.key;
    ssl_session_cache off;
    ssl_session_tickets off;
    proxy_pass 127.0.0.1:$backend;
  }
}
EOF
}

# Starts proxy $1 (rp, hap, ngx); prints "pid port".
start_target() {
  case $1 in
    rp)
      "$bin" run --config "$work/rp.toml" >/dev/null 2>"$work/rp.err" &
      echo "$! $rp" ;;
    hap)
      haproxy -db -f "$work/hap.cfg" >/dev/null 2>"$work/hap.err" &
      echo "$! $hap" ;;
    ngx)
      nginx -c "$work/ngx.conf" -p "$work" >/dev/null 2>"$work/ngx.err" &
      echo "$! $ngx" ;;
  esac
}


# One measurement: prints "value rate" for workload $2 through target $1.
measure() {
  local target=$1 workload=$2 pid port t0 t1 out reqs
  read -r pid port < <(start_target "$target")
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  local url="https://bench.example.com:$port/"
  local resolve="bench.example.com:$port:127.0.0.1"
  case $workload in
    hs-*|ka64)
      local conns=32 extra=(-H "Connection: close")
      [[ $workload == ka64 ]] && conns=64 extra=()
      # wrk resolves the name itself: use the address, SNI absent (every proxy has one cert).
      url="https://127.0.0.1:$port/"
      timeout 10 wrk -t1 -c"$conns" -d1s "${extra[@]}" "$url" >/dev/null 2>&1 || true
      t0=$(tree_ticks "$pid")
      out=$(timeout $((DUR + 10)) wrk -t1 -c"$conns" -d"${DUR}s" "${extra[@]}" "$url" 2>&1 || true)
      t1=$(tree_ticks "$pid")
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      awk -v t="$((t1 - t0))" -v c="$clk" -v r="${reqs:-0}" -v d="$DUR" \
        'BEGIN { if (r > 0) printf "%.2f %.0f\n", t * 1e6 / c / r, r / d; else print "nan nan" }'
      ;;
    idle*)
      # Bytes of proxy user memory (RssAnon growth) per idle TLS connection, and the seconds
      # the client took to open them.
      out=$(timeout 120 python3 "$root/bench/tls_idle.py" "$port" "$pid" "${workload#idle}" || true)
      awk '/per connection/ { for (i = 1; i <= NF; i++) { if ($i == "B") b = $(i-1); if ($i == "in") s = $(i+1) } }
           END { if (b != "") print b, s; else print "nan nan" }' <<<"$out"
      ;;
    bulk)
      t0=$(tree_ticks "$pid")
      out=$(timeout 60 curl -sk --fail --http1.1 --resolve "$resolve" -o /dev/null \
        -w '%{size_download} %{time_total}' "${url}big" || echo "0 1")
      t1=$(tree_ticks "$pid")
      read -r size seconds <<<"$out"
      awk -v t="$((t1 - t0))" -v c="$clk" -v b="$size" -v s="$seconds" \
        'BEGIN { if (b > 0) printf "%.2f %.2f\n", t * 1e6 / c / (b / 1048576), b * 8 / s / 1e9; else print "nan nan" }'
      ;;
  esac
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

configs_for() { # workload
  case $1 in
    hs-rsa) write_configs rsa ;;
    *) write_configs ecdsa ;;
  esac
}
run_three_way

echo
echo "date $(date -u +%FT%TZ), kernel $(uname -r), $ROUNDS rounds of ${DUR}s; ringproxy $("$bin" --version), $(haproxy -v | head -1), $(nginx -v 2>&1)"
echo "figures: proxy CPU us per request (hs-*, ka64) or per MiB (bulk), or bytes per idle connection (idle*); rate = requests/s, Gbit/s or seconds to open (idle*); medians (min-max), ratios = median of per-round ratios"
python3 "$root/bench/three_way.py" "$results"
