#!/usr/bin/env python3
"""Holds N idle TLS connections (handshake done, nothing sent after it) to a proxy and reports
the growth of the proxy's anonymous resident memory (user space, as ../shared/baseline's
run_idle_mem.sh reads it) per connection.

    tls_idle.py PORT PID N

The proxy's backend must keep the proxied connections open (nginx does, for its keepalive
timeout). Loopback only; the connections are closed when the script ends.
"""
import socket
import ssl
import sys
import time


def rss_anon_kib(pid):
    # The proxy and its children (an nginx master's worker holds the connections).
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
    return total


def main():
    port, pid, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    held = []
    # Warm up the allocator with a few, then measure from there.
    for _ in range(50):
        held.append(context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                        server_hostname="bench.example.com"))
    time.sleep(0.5)
    before = rss_anon_kib(pid)
    started = time.time()
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", port))
        held.append(context.wrap_socket(raw, server_hostname="bench.example.com"))
    took = time.time() - started
    time.sleep(1.0)
    after = rss_anon_kib(pid)
    per = (after - before) * 1024 / count
    print(f"{count} TLS connections in {took:.1f} s; proxy RssAnon {before} KiB -> {after} KiB; "
          f"{per:.0f} B per connection")
    for sock in held:
        sock.close()


if __name__ == "__main__":
    main()
