#!/usr/bin/env bash
# TLS toward servers, ringproxy ([pool.tls]) against HAProxy (`server ... ssl verify required`,
# OpenSSL, one thread) and NGINX stream (`proxy_ssl on`, OpenSSL, one worker): plain HTTP in,
# verified TLS 1.3 out to the same nginx HTTPS backend (ECDSA P-256 certificate from a test CA),
# in one run: each round measures every proxy in turn (order rotated), and the medians are
# reported.
#
#   ROUNDS=5 DUR=5 bench/tls_origin.sh [RINGPROXY_BIN]
#   WORKLOADS="close close-reuse ka64 bulk" (default: all)
#
# Workloads: close = wrk -t1 -c32 with `Connection: close`: a new server connection and a full
# TLS handshake toward the server per request (HAProxy `no-ssl-reuse`, NGINX
# `proxy_ssl_session_reuse off`, ringproxy `session_reuse = false`); close-reuse = the same
# with every proxy's default session reuse on (resumed handshakes toward the server); ka64 = wrk -t1 -c64 keep-alive (one server
# handshake per client connection); bulk = curl downloading 1 GiB over one connection.
# Figures: proxy CPU us per request or per MiB (utime+stime from /proc/PID/stat), requests/s,
# Gbit/s. Loopback only; every process is stopped by PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
require_tools nginx haproxy wrk curl openssl python3
pick_binaries "${1:-}"
ROUNDS=${ROUNDS:-5}
DUR=${DUR:-5}
WORKLOADS=${WORKLOADS:-"close close-reuse ka64 bulk"}
start_work tls-origin
backend=9390 rp=9391 hap=9392 ngx=9393
clk=$(getconf CLK_TCK)

# A test CA and an ECDSA P-256 leaf for backend.internal signed by it.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=backend.internal \
  -keyout "$work/backend.key" -out "$work/backend.csr" 2>/dev/null
printf 'subjectAltName=DNS:backend.internal\nbasicConstraints=CA:FALSE\n' >"$work/leaf.ext"
openssl x509 -req -in "$work/backend.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/leaf.ext" -out "$work/backend.pem" 2>/dev/null
truncate -s 1G "$work/big"
chmod 755 "$work"
chmod 644 "$work/big" "$work/backend.key"

find_nginx_stream
cat >"$work/backend.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 8192; }
http {
  access_log off;
  # nginx 1.22 offers TLS 1.3 only when asked (its built-in default stops at 1.2).
  ssl_protocols TLSv1.2 TLSv1.3;
  server { listen 127.0.0.1:$backend ssl reuseport backlog=4096; keepalive_requests 10000000;
           ssl_certificate $work/backend.pem; ssl_certificate_key $work/backend.key;
           root $work;
           location = / { return 200 "ok\n"; } }
}
EOF
nginx -c "$work/backend.conf" -p "$work" 2>/dev/null & pids+=($!)

write_configs() { # reuse: "yes" lets the proxies resume toward the backend
  local reuse=$1 hap_reuse=" no-ssl-reuse" ngx_reuse=off rp_reuse=false
  if [[ $reuse == yes ]]; then hap_reuse="" ngx_reuse=on rp_reuse=true; fi
  cat >"$work/rp.toml" <<EOF
[runtime]
shards = 1
drain_timeout = "1s"
[[listener]]
name = "web"
bind = "127.0.0.1:$rp"
pool = "web"
[[pool]]
name = "web"
servers = [ { addr = "127.0.0.1:$backend" } ]
[pool.tls]
ca = "$work/ca.pem"
server_name = "backend.internal"
session_reuse = $rp_reuse
EOF
  cat >"$work/hap.cfg" <<EOF
global
  nbthread 1
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend web
  bind 127.0.0.1:$hap
  default_backend web
backend web
  server s1 127.0.0.1:$backend ssl verify required ca-file $work/ca.pem sni str(backend.internal) verifyhost backend.internal$hap_reuse
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
    listen 127.0.0.1:$ngx reuseport backlog=4096;
    proxy_pass 127.0.0.1:$backend;
    proxy_ssl on;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate $work/ca.pem;
    proxy_ssl_name backend.internal;
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse $ngx_reuse;
  }
}
EOF
}

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


measure() {
  local target=$1 workload=$2 pid port t0 t1 out reqs
  read -r pid port < <(start_target "$target")
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  local url="http://127.0.0.1:$port/"
  case $workload in
    close*|ka64)
      local conns=32 extra=(-H "Connection: close")
      [[ $workload == ka64 ]] && conns=64 extra=()
      timeout 10 wrk -t1 -c"$conns" -d1s "${extra[@]}" "$url" >/dev/null 2>&1 || true
      t0=$(tree_ticks "$pid")
      out=$(timeout $((DUR + 10)) wrk -t1 -c"$conns" -d"${DUR}s" "${extra[@]}" "$url" 2>&1 || true)
      t1=$(tree_ticks "$pid")
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$target $workload: $(grep 'Non-2xx\|Socket errors' <<<"$out")" >&2; fi
      awk -v t="$((t1 - t0))" -v c="$clk" -v r="${reqs:-0}" -v d="$DUR" \
        'BEGIN { if (r > 0) printf "%.2f %.0f\n", t * 1e6 / c / r, r / d; else print "nan nan" }'
      ;;
    bulk)
      t0=$(tree_ticks "$pid")
      out=$(timeout 60 curl -s --fail --http1.1 -o /dev/null \
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
    close-reuse) write_configs yes ;;
    *) write_configs no ;;
  esac
}
run_three_way

echo
echo "date $(date -u +%FT%TZ), kernel $(uname -r), $ROUNDS rounds of ${DUR}s; ringproxy $("$bin" --version), $(haproxy -v | head -1), $(nginx -v 2>&1)"
echo "figures: proxy CPU us per request (close*, ka64) or per MiB (bulk); rate = requests/s or Gbit/s; medians (min-max), ratios = median of per-round ratios"
python3 "$root/bench/three_way.py" "$results"
