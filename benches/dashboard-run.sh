#!/usr/bin/env bash
# The dashboard picture in the README, from a real run: the standalone demo (proxy + sample
# extension server) under a mixed h2load load for about a minute, /metrics scraped every
# second, then drawn by benches/dashboard.py.
#
# What the load does, so every panel has something real to show:
#   - GETs and LISTs of both APIServices (echo.example.com/v1, metrics.k8s.io/v1beta1);
#   - 404s for a group nobody serves, and unauthenticated 401s (the proxy's own answers);
#   - in the middle, an APIService whose service does not exist is added (503s, and an
#     availability flip) and later removed (its series go).
#
# Usage: benches/dashboard-run.sh [OUT.png]   (default manifests/dashboards/dashboard.png)
# Needs: a release build (cargo build --release), h2load (Debian's nghttp2-client), python3
# with matplotlib. Bounded: every load step has a fixed duration; the demo is stopped at exit.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_PNG=${1:-manifests/dashboards/dashboard.png}
BIN=${PROXY_BIN:-target/release/kube-aggregation-proxy}
WORK=$(mktemp -d)
DEMO_PID=
cleanup() {
    [ -n "$DEMO_PID" ] && kill "$DEMO_PID" 2>/dev/null && wait "$DEMO_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" demo --dir "$WORK/demo" >"$WORK/demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 100); do
    grep -q "demo is ready" "$WORK/demo.log" 2>/dev/null && break
    sleep 0.1
done
grep -q "demo is ready" "$WORK/demo.log" || { cat "$WORK/demo.log"; exit 1; }
ADDR=$(sed -n 's|^  proxy: *https://||p' "$WORK/demo.log")
TOKEN=$(sed -n "s|.*Authorization: Bearer \([^']*\)'.*|\1|p" "$WORK/demo.log")
CA="$WORK/demo/pki/serving-ca.crt"
echo "demo on $ADDR"

python3 benches/dashboard.py scrape --url "https://$ADDR/metrics" --cacert "$CA" --token "$TOKEN" \
    --interval 1 --duration 70 --out "$WORK/scrapes" &
SCRAPER=$!

# h2load: -D seconds, -c clients, -m streams per client; its output is only a summary.
load() {
    local seconds=$1 clients=$2 auth=$3
    shift 3
    h2load -D "$seconds" -c "$clients" -m 4 ${auth:+-H "authorization: Bearer $TOKEN"} "$@" >/dev/null
}
url() { echo "https://$ADDR$1"; }
ECHO=$(url /apis/echo.example.com/v1/namespaces/default/echoes/one)
ECHO_LIST=$(url /apis/echo.example.com/v1/namespaces/default/echoes)
NODES=$(url /apis/metrics.k8s.io/v1beta1/nodes)
UNKNOWN=$(url /apis/nobody.example.com/v1/things)

sleep 3
pids=()
load 15 8 yes "$ECHO" "$ECHO_LIST" "$NODES" & pids+=($!)
load 15 1 yes "$UNKNOWN" & pids+=($!)
load 15 1 "" "$ECHO" & pids+=($!)
wait "${pids[@]}" || true

cat >"$WORK/demo/apiservices/v1.broken.example.com.yaml" <<'EOF'
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1.broken.example.com
spec:
  group: broken.example.com
  version: v1
  groupPriorityMinimum: 100
  versionPriority: 10
  insecureSkipTLSVerify: true
  service:
    namespace: kube-system
    name: not-deployed
    port: 443
EOF
pids=()
load 20 8 yes "$ECHO" "$NODES" & pids+=($!)
load 20 2 yes "$(url /apis/broken.example.com/v1/things)" & pids+=($!)
wait "${pids[@]}" || true
rm "$WORK/demo/apiservices/v1.broken.example.com.yaml"
load 15 16 yes "$ECHO" "$ECHO_LIST" "$NODES"
wait "$SCRAPER"

mkdir -p "$(dirname "$OUT_PNG")"
python3 benches/dashboard.py render --scrapes "$WORK/scrapes" \
    --dashboard manifests/dashboards/kube-aggregation-proxy.json --out "$OUT_PNG"
echo "wrote $OUT_PNG"
