#!/usr/bin/env bash
# Watch scale, on loopback only: N concurrent watches through the proxy while short GETs keep
# coming. Reports the GETs' p50/p99 with and without the watches, and the RSS per open watch of
# the proxy alone: the demo writes the PKI, manifests and config, then is stopped; the sample
# backend (`sample-apiserver`) and the proxy (`serve --config`) run as two processes from them.
#
#   cargo build --release --bins && benches/watch-scale.sh
#   knobs: WATCHES=1000 WATCH_SECONDS=60 GET_SECONDS=5 BIN=target/release/kube-aggregation-proxy
#          SAMPLE=target/release/sample-apiserver
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
SAMPLE=${SAMPLE:-$ROOT/target/release/sample-apiserver}
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
WORK=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
SAMPLE_PORT=$(free_port)
WATCHERS="" PROXY="" BACKEND=""
cleanup() { kill $WATCHERS $PROXY $BACKEND 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
# The demo only writes the files here; it is stopped once its kubeconfig exists.
"$BIN" demo --dir "$WORK" --port "$PORT" >"$WORK/demo.log" 2>&1 &
DEMO=$!
for _ in $(seq 300); do [ -f "$WORK/kubeconfig" ] && break; sleep 0.1; done
kill "$DEMO"; wait "$DEMO" 2>/dev/null || true
"$SAMPLE" --secure-port "$SAMPLE_PORT" --tls-cert-file "$WORK/pki/sample-serving.crt" \
    --tls-private-key-file "$WORK/pki/sample-serving.key" \
    --requestheader-client-ca-file "$WORK/pki/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client >"$WORK/sample.log" 2>&1 &
BACKEND=$!
sed -i "s|\(kube-system/sample-apiserver:443: \).*|\1127.0.0.1:$SAMPLE_PORT|" "$WORK/proxy.yaml"
"$BIN" serve --config "$WORK/proxy.yaml" >"$WORK/proxy.log" 2>&1 &
PROXY=$!
TOKEN=$(cut -d, -f1 "$WORK/tokens.csv")
for _ in $(seq 300); do
    curl -sk -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
        "https://127.0.0.1:$PORT/readyz" 2>/dev/null | grep -q 200 && break
    sleep 0.1
done
URL=https://127.0.0.1:$PORT/apis/echo.example.com/v1/namespaces/default/things
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
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
RSS_IDLE=$(rss $PROXY)
BACKEND_IDLE=$(rss $BACKEND)
echo "RSS idle: proxy $RSS_IDLE KiB, backend $BACKEND_IDLE KiB"
echo "short GETs, no watches: $(gets)"
h2load -c 10 -m 100 -n "$WATCHES" -H "Authorization: Bearer $TOKEN" \
    "$URL?watch=true&timeoutSeconds=$WATCH_SECONDS" >"$WORK/watches.log" 2>&1 &
WATCHERS=$!
sleep 5
RSS_WATCHING=$(rss $PROXY)
BACKEND_WATCHING=$(rss $BACKEND)
OPEN=$(ss -Htn state established "( sport = :$SAMPLE_PORT )" | wc -l)
echo "backend connections from the proxy: $OPEN"
echo "RSS with $WATCHES watches open: proxy $RSS_WATCHING KiB ($(( (RSS_WATCHING - RSS_IDLE) * 1024 / WATCHES )) bytes per watch), backend $BACKEND_WATCHING KiB ($(( (BACKEND_WATCHING - BACKEND_IDLE) * 1024 / WATCHES )) bytes per watch)"
echo "short GETs, $WATCHES watches open: $(gets)"
