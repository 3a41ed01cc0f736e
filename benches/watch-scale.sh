#!/usr/bin/env bash
# Watch scale, on loopback only: N concurrent watches through the proxy (the demo: proxy and
# sample backend in one process) while short GETs keep coming. Reports the GETs' p50/p99 with
# and without the watches, and the process's RSS per open watch.
#
#   cargo build --release && benches/watch-scale.sh
#   knobs: WATCHES=1000 WATCH_SECONDS=60 GET_SECONDS=5 BIN=target/release/kube-aggregation-proxy
#
# The watches are h2load streams on 10 HTTP/2 connections (100 streams each, the proxy's
# limit per connection), each an echo watch of WATCH_SECONDS (one event a second); the short
# GETs are h2load at concurrency 4 for GET_SECONDS. Everything it starts is stopped on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WATCHES=${WATCHES:-1000}
WATCH_SECONDS=${WATCH_SECONDS:-60}
GET_SECONDS=${GET_SECONDS:-5}
BIN=${BIN:-$ROOT/target/release/kube-aggregation-proxy}
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" demo --dir "$WORK" --port "$PORT" >"$WORK/demo.log" 2>&1 &
DEMO=$!
WATCHERS=""
cleanup() { kill $WATCHERS $DEMO 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 100); do [ -f "$WORK/kubeconfig" ] && break; sleep 0.1; done
sleep 1
TOKEN=$(cut -d, -f1 "$WORK/tokens.csv")
URL=https://127.0.0.1:$PORT/apis/echo.example.com/v1/namespaces/default/things
rss() { awk '/VmRSS/ {print $2}' "/proc/$DEMO/status"; }
# p50 and p99 of h2load's per-request log (microseconds in the third column).
gets() {
    rm -f "$WORK/gets.log"
    h2load -c 4 -m 1 -D "$GET_SECONDS" -H "Authorization: Bearer $TOKEN" --log-file="$WORK/gets.log" "$URL/x" \
        | grep -E "^requests:|^status codes:" | tr '\n' ' '
    python3 - "$WORK/gets.log" <<'EOF'
import sys
import os
if not os.path.exists(sys.argv[1]):
    print("no request completed"); sys.exit(0)
us = sorted(int(line.split()[2]) for line in open(sys.argv[1]) if line.strip())
if not us:
    print("no request completed"); sys.exit(0)
pick = lambda q: us[min(len(us) - 1, int(q * len(us)))] / 1000
print(f"p50 {pick(0.50):.3f} ms, p99 {pick(0.99):.3f} ms, max {us[-1] / 1000:.3f} ms")
EOF
}
RSS_IDLE=$(rss)
echo "RSS idle: $RSS_IDLE KiB"
echo "short GETs, no watches: $(gets)"
h2load -c 10 -m 100 -n "$WATCHES" -H "Authorization: Bearer $TOKEN" \
    "$URL?watch=true&timeoutSeconds=$WATCH_SECONDS" >"$WORK/watches.log" 2>&1 &
WATCHERS=$!
sleep 5
RSS_WATCHING=$(rss)
echo "RSS with $WATCHES watches open: $RSS_WATCHING KiB ($(( (RSS_WATCHING - RSS_IDLE) / WATCHES )) KiB per watch)"
echo "short GETs, $WATCHES watches open: $(gets)"
