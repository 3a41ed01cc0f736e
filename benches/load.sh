#!/usr/bin/env bash
# The side-by-side load benchmark (issue 6), on loopback only:
#
#   direct      h2load -> backend                          (the limit)
#   proxy       h2load -> kube-aggregation-proxy -> backend (token auth, identity headers)
#   nginx       h2load -> nginx (plain TLS reverse proxy) -> backend
#   haproxy     h2load -> HAProxy (TLS both legs, backend verified, h2 to it) -> backend
#   proxy-alt   the proxy again, with PROXY_ALT_SETTINGS (YAML lines added to its config, e.g.
#               "runtime: work-stealing") and/or another build, PROXY_ALT_BIN: two configurations
#               or two builds (before and after) measured interleaved in one run
#
# and, on the testbed (src/testbed, started with `kube-aggregation-proxy demo --cluster`: etcd,
# kube-apiserver with RBAC, and this proxy in cluster mode in front, with a static admin token):
#
#   kube             h2load -> kube-apiserver's aggregator -> backend
#   cluster-proxy    h2load -> the proxy in cluster mode (TokenReview) -> backend
#   delegate-direct  h2load -> kube-apiserver: GET /api/v1/namespaces/default (a core resource)
#   delegate-proxy   h2load -> the proxy in cluster mode -> kube-apiserver, the same GET
#
# for HTTP/1.1 and HTTP/2 at concurrency 1, 16 and 64, interleaved, with a bearer token on
# every request; then APIService churn under load, and the proxy with 10,000 APIServices.
# The backend is benches/backend.rs (constant small JSON over TLS). Results, raw h2load
# output and the latency plot go to $OUT (default target/load-bench/<time>): report.md and
# latency.png. Every process started here is stopped on exit.
#
# Usage: benches/load.sh            (about 7 minutes on 2 cores, plus the build)
# Knobs (environment): DURATION=5 (seconds per measurement), WARMUP=1, ROUNDS=1,
#   CONCURRENCY="1 16 64", PROTOCOLS="h1 h2",
#   SETUPS="direct proxy nginx haproxy kube cluster-proxy delegate-direct delegate-proxy",
#   H2_STREAMS=16 (streams per HTTP/2 connection), CHURN_SECONDS=30, CHURN_RATE=100
#   (changes/s), CHURN_RPS=2000, SCALE_APISERVICES=10000,
#   DEMO_ARGS (more `demo --cluster` flags for the testbed, e.g. "--runtime per-core"),
#   OUT=dir, KEEP=1 (keep the work dir), PROXY_BIN and BACKEND_BIN (prebuilt binaries: skip
#   the build). The testbed setups build the Kubernetes binaries on first use (Go and the
#   module proxy; about 20 minutes, cached under ~/.cache/kube-aggregation-proxy).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-1}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
PROTOCOLS=${PROTOCOLS:-"h1 h2"}
SETUPS=${SETUPS:-"direct proxy nginx haproxy kube cluster-proxy delegate-direct delegate-proxy"}
# The setups that run on the testbed.
TESTBED_SETUPS="kube cluster-proxy delegate-direct delegate-proxy"
# HTTP/2 streams per h2load connection (16: a few multiplexing clients, as client-go does).
H2_STREAMS=${H2_STREAMS:-16}
CHURN_SECONDS=${CHURN_SECONDS:-30}
CHURN_RATE=${CHURN_RATE:-100}
CHURN_RPS=${CHURN_RPS:-2000}
SCALE_APISERVICES=${SCALE_APISERVICES:-10000}
OUT=${OUT:-$ROOT/target/load-bench/$(date +%Y%m%d-%H%M%S)}
# The script works in its own directory: a relative OUT is relative to where it was started.
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
TOKEN=bench-token-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
RESOURCE_PATH=/apis/bench.example.com/v1/namespaces/default/things/thing-1
CORE_PATH=/api/v1/namespaces/default

log() { printf '[load.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools: h2load (nghttp2-client), nginx, haproxy, python3 with matplotlib; installed when
# missing.
need_apt=()
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
if [[ " $SETUPS " == *" haproxy "* ]]; then
    command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian's postinst may start the packaged services; stop them so they hold no port.
    for svc in nginx haproxy; do
        if [[ " ${need_apt[*]} " == *" $svc "* ]] && command -v service >/dev/null; then
            service "$svc" stop >/dev/null 2>&1 || true
        fi
    done
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
command -v python3 >/dev/null || die "python3 is required"
python3 -c 'import matplotlib' 2>/dev/null || {
    log "installing matplotlib with pip"
    python3 -m pip install -q matplotlib
}
command -v openssl >/dev/null || die "openssl is required"
command -v curl >/dev/null || die "curl is required"

# ---------------------------------------------------------------------------------------------
# Build: the proxy and the bench backend, release profile.
if [ -n "${PROXY_BIN:-}" ] && [ -n "${BACKEND_BIN:-}" ]; then
    log "using prebuilt $PROXY_BIN and $BACKEND_BIN"
    BACKEND=$BACKEND_BIN
    PROXY=$PROXY_BIN
else
log "building release binaries"
# One cargo invocation, release profile: the proxy binary and the backend (a bench target).
BACKEND=$(cd "$ROOT" && cargo build --release --locked --bin kube-aggregation-proxy --bench backend \
    --message-format=json-render-diagnostics | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "backend" and m.get("executable"):
        print(m["executable"])')
PROXY="$ROOT/target/release/kube-aggregation-proxy"
fi
[ -x "$BACKEND" ] || die "backend binary not built"
[ -x "$PROXY" ] || die "proxy binary not built"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: every process started is stopped on exit, by pid.
WORK=$(mktemp -d /tmp/kap-load-XXXXXX)
mkdir -p "$OUT/raw" "$WORK/bin"
# Copies, so a concurrent build in the shared target dir cannot swap binaries mid-run.
cp "$BACKEND" "$WORK/bin/backend"
cp "$PROXY" "$WORK/bin/kube-aggregation-proxy"
BACKEND=$WORK/bin/backend
PROXY=$WORK/bin/kube-aggregation-proxy
declare -a PIDS=()
cleanup() {
    local pid
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[$i]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else log "work dir kept: $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s under a deadline.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${seconds}s waiting for $what"
        sleep 0.2
    done
}

cpu_ticks() { # utime + stime of the pids given, in clock ticks
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
    done
    echo $total
}
status_kb() { # sum of a /proc/<pid>/status field (VmHWM, VmRSS) over the pids given, in kB
    local field=$1 total=0 pid
    shift
    for pid in "$@"; do total=$((total + $(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status"))); done
    echo $total
}
reset_peak() { local pid; for pid in "$@"; do echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; done; }
with_children() { echo "$1" $(ps -o pid= --ppid "$1"); }

# ---------------------------------------------------------------------------------------------
# PKI: one CA; serving certificates for the backend (its in-cluster name too), the proxy and
# nginx; a front-proxy client certificate. (The testbed makes its own.)
log "work dir $WORK"
cd "$WORK"
ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1" 2>/dev/null; }
ec_key ca.key
openssl req -x509 -new -key ca.key -out ca.crt -days 2 -subj /CN=load-bench-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
issue() { # NAME CN SANS EKU
    ec_key "$1.key"
    openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n%s\n' "$4" \
        "${3:+subjectAltName=$3}" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out "$1.crt" \
        -extfile "$1.ext" 2>/dev/null
}
issue backend bench-backend "DNS:bench-backend.bench.svc,DNS:decoy.bench.svc,DNS:localhost,IP:127.0.0.1" serverAuth
issue serving localhost "DNS:localhost,IP:127.0.0.1" serverAuth
issue proxy-client front-proxy-client "" clientAuth
CA_B64=$(base64 -w0 ca.crt)
printf '%s,bench,1000,"system:masters"\n' "$TOKEN" >tokens.csv

# ---------------------------------------------------------------------------------------------
# The backend, and a decoy that answers 300 to everything (what churned APIServices point at).
BACKEND_PORT=$(free_port)
DECOY_PORT=$(free_port)
"$BACKEND" --listen "127.0.0.1:$BACKEND_PORT" --tls-cert-file backend.crt --tls-private-key-file backend.key \
    >backend.log 2>&1 &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
"$BACKEND" --listen "127.0.0.1:$DECOY_PORT" --tls-cert-file backend.crt --tls-private-key-file backend.key \
    --status 300 >decoy.log 2>&1 &
PIDS+=($!)

apiservice_yaml() { # NAME GROUP VERSION SERVICE GPM VP
    printf -- '---\napiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: %s\nspec:\n  group: %s\n  version: %s\n  groupPriorityMinimum: %s\n  versionPriority: %s\n  service:\n    namespace: bench\n    name: %s\n    port: 443\n  caBundle: %s\n' \
        "$1" "$2" "$3" "$5" "$6" "$4" "$CA_B64"
}

# proxy_config DIR PORT: a `serve` config for a proxy reading DIR.
proxy_config() {
    cat <<EOF
source: files
apiservices-dir: $1
services:
  bench/bench-backend:443: 127.0.0.1:$BACKEND_PORT
  bench/decoy:443: 127.0.0.1:$DECOY_PORT
bind-address: 127.0.0.1
secure-port: $2
tls-cert-file: $WORK/serving.crt
tls-private-key-file: $WORK/serving.key
token-auth-file: $WORK/tokens.csv
proxy-client-cert-file: $WORK/proxy-client.crt
proxy-client-key-file: $WORK/proxy-client.key
EOF
}

start_proxy() { # NAME DIR PORT [EXTRA YAML] [BINARY] -> sets STARTED_PID
    { proxy_config "$2" "$3"; printf '%s\n' "${4:-}"; } >"$1.yaml"
    RUST_LOG=warn "${5:-$PROXY}" serve --config "$1.yaml" >"$1.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

curl_ok() { # URL [CA] [TOKEN]: a 200 with the token (the bench CA and token by default)
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert "${2:-$WORK/ca.crt}" \
        -H "Authorization: Bearer ${3:-$TOKEN}" "$1")" = 200 ]
}

mkdir -p apiservices
apiservice_yaml v1.bench.example.com bench.example.com v1 bench-backend 1000 15 >apiservices/bench.yaml
PROXY_PORT=$(free_port)
start_proxy proxy "$WORK/apiservices" "$PROXY_PORT"
PROXY_PID=$STARTED_PID
PROXY_ALT_PID=
PROXY_ALT_PORT=
if [[ " $SETUPS " == *" proxy-alt "* ]]; then
    PROXY_ALT_PORT=$(free_port)
    alt_bin=$PROXY
    if [ -n "${PROXY_ALT_BIN:-}" ]; then
        cp "$PROXY_ALT_BIN" "$WORK/bin/kube-aggregation-proxy-alt"
        alt_bin=$WORK/bin/kube-aggregation-proxy-alt
    fi
    start_proxy proxy-alt "$WORK/apiservices" "$PROXY_ALT_PORT" "${PROXY_ALT_SETTINGS:-}" "$alt_bin"
    PROXY_ALT_PID=$STARTED_PID
fi

# ---------------------------------------------------------------------------------------------
# nginx: a plain TLS reverse proxy for the same path, verifying the backend like the others;
# one worker per core (as the proxy has one tokio worker per core), upstream keep-alive.
NGINX_PORT=$(free_port)
mkdir -p nginx/tmp
cat >nginx/nginx.conf <<EOF
worker_processes auto;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT ssl http2;
        ssl_certificate $WORK/serving.crt;
        ssl_certificate_key $WORK/serving.key;
        http2_max_concurrent_streams 1000;
        keepalive_requests 1000000;
        location /apis/bench.example.com/ {
            proxy_pass https://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_server_name on;
            proxy_ssl_name bench-backend.bench.svc;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $WORK/ca.crt;
            proxy_ssl_session_reuse on;
        }
    }
}
EOF
"$NGINX" -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" >nginx/stdout.log 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")

# ---------------------------------------------------------------------------------------------
# HAProxy, the fastest peer: two threads (one per core, as the proxy's workers), TLS on both
# legs, the backend's certificate verified against the CA for its service name, HTTP/2 to the
# backend (as the proxy speaks it), connections reused by every client (`http-reuse always`).
HAPROXY_PORT=$(free_port)
HAPROXY_PID=
if [[ " $SETUPS " == *" haproxy "* ]]; then
    mkdir -p haproxy
    cat serving.crt serving.key >haproxy/serving.pem
    cat >haproxy/haproxy.cfg <<EOF
global
    nbthread 2
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend bench
    bind 127.0.0.1:$HAPROXY_PORT ssl crt $WORK/haproxy/serving.pem alpn h2,http/1.1
    # HTTP/2 responses carry no reason phrase, and HAProxy's HTTP/1.1 status line is then
    # "200 " with none: h2load's HTTP/1.1 parser records no status for it and counts a failure.
    http-response set-status 200 reason OK if { status 200 }
    default_backend bench
backend bench
    server backend 127.0.0.1:$BACKEND_PORT ssl verify required ca-file $WORK/ca.crt sni str(bench-backend.bench.svc) verifyhost bench-backend.bench.svc alpn h2
EOF
    "$HAPROXY" -db -f haproxy/haproxy.cfg >haproxy/stdout.log 2>&1 &
    HAPROXY_PID=$!
    PIDS+=("$HAPROXY_PID")
fi

# ---------------------------------------------------------------------------------------------
# The testbed: `demo --cluster` (src/testbed) runs etcd, kube-apiserver and this proxy in
# cluster mode, and writes kubeconfigs, CAs and an admin token (system:masters) to its dir.
# The bench backend is registered there as kube-aggregator expects: an ExternalName Service
# to localhost and an APIService with the bench CA.
KUBE_PID=
ETCD_PID=
DEMO_PID=
testbed_wanted=
for setup in $TESTBED_SETUPS; do [[ " $SETUPS " == *" $setup "* ]] && testbed_wanted=1; done
if [ -n "$testbed_wanted" ]; then
    log "starting the testbed (demo --cluster; the first run builds the Kubernetes binaries)"
    CLUSTER_DIR=$WORK/cluster
    # shellcheck disable=SC2086
    RUST_LOG=warn "$PROXY" demo --cluster --dir "$CLUSTER_DIR" ${DEMO_ARGS:-} >cluster-demo.out 2>cluster-demo.log &
    DEMO_PID=$!
    PIDS+=("$DEMO_PID")
    deadline=$((SECONDS + 3600))
    until grep -q "is ready" cluster-demo.out 2>/dev/null; do
        kill -0 "$DEMO_PID" 2>/dev/null || die "demo --cluster failed: $(tail -5 cluster-demo.log)"
        [ $SECONDS -lt $deadline ] || die "demo --cluster not ready within an hour"
        sleep 0.5
    done
    # Each testbed process runs under a bash watchdog (src/testbed/process.rs) named after it.
    watched() { # NAME: the pid of the process the watchdog "watchdog-NAME" runs
        local watchdog pid
        watchdog=$(pgrep -P "$DEMO_PID" -f "watchdog-$1 " | head -1 || true)
        [ -n "$watchdog" ] || return 0
        for pid in $(pgrep -P "$watchdog" || true); do
            [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = bash ] || { echo "$pid"; return 0; }
        done
    }
    KUBE_PID=$(watched kube-apiserver)
    ETCD_PID=$(watched etcd)
    [ -n "$KUBE_PID" ] && [ -n "$ETCD_PID" ] || die "no kube-apiserver or etcd process under demo --cluster"
    KUBE_TOKEN=$(cat "$CLUSTER_DIR/admin.token")
    KUBE=$(awk '$1 == "server:" {print $2; exit}' "$CLUSTER_DIR/direct.kubeconfig")
    CLUSTER_PROXY=$(awk '$1 == "server:" {print $2; exit}' "$CLUSTER_DIR/proxy.kubeconfig")
    kubectl --kubeconfig "$CLUSTER_DIR/direct.kubeconfig" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: Service
metadata: {name: bench-backend, namespace: bench}
spec: {type: ExternalName, externalName: localhost, ports: [{name: https, port: $BACKEND_PORT}]}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1.bench.example.com}
spec:
  group: bench.example.com
  version: v1
  groupPriorityMinimum: 1000
  versionPriority: 15
  service: {namespace: bench, name: bench-backend, port: $BACKEND_PORT}
  caBundle: $CA_B64
EOF
else
    SETUPS=$(for s in $SETUPS; do [[ " $TESTBED_SETUPS " == *" $s "* ]] || printf '%s ' "$s"; done)
fi

declare -A URL=(
    [direct]="https://127.0.0.1:$BACKEND_PORT$RESOURCE_PATH"
    [proxy]="https://127.0.0.1:$PROXY_PORT$RESOURCE_PATH"
    [proxy-alt]="https://127.0.0.1:${PROXY_ALT_PORT:-0}$RESOURCE_PATH"
    [nginx]="https://127.0.0.1:$NGINX_PORT$RESOURCE_PATH"
    [haproxy]="https://127.0.0.1:$HAPROXY_PORT$RESOURCE_PATH"
    [kube]="${KUBE:-}$RESOURCE_PATH"
    [cluster-proxy]="${CLUSTER_PROXY:-}$RESOURCE_PATH"
    [delegate-direct]="${KUBE:-}$CORE_PATH"
    [delegate-proxy]="${CLUSTER_PROXY:-}$CORE_PATH"
)
# Each setup's token and the CA its server presents.
token_of() { if [[ " $TESTBED_SETUPS " == *" $1 "* ]]; then echo "$KUBE_TOKEN"; else echo "$TOKEN"; fi; }
ca_of() {
    case $1 in
        kube | delegate-direct) echo "$CLUSTER_DIR/cluster-ca.crt" ;;
        cluster-proxy | delegate-proxy) echo "$CLUSTER_DIR/proxy-ca.crt" ;;
        *) echo "$WORK/ca.crt" ;;
    esac
}
for setup in $SETUPS; do
    # kube-aggregator routes to a new APIService once its first probe passed: allow a minute.
    wait_for 120 "$setup to answer 200" curl_ok "${URL[$setup]}" "$(ca_of "$setup")" "$(token_of "$setup")"
done
# The processes whose CPU and memory a setup costs (direct: the backend itself).
target_pids() {
    case $1 in
        direct) echo "$BACKEND_PID" ;;
        proxy) echo "$PROXY_PID" ;;
        proxy-alt) echo "$PROXY_ALT_PID" ;;
        nginx) with_children "$NGINX_PID" ;;
        haproxy) echo "$HAPROXY_PID" ;;
        kube) echo "$KUBE_PID" ;;
        cluster-proxy | delegate-proxy) echo "$DEMO_PID" ;;
        delegate-direct) echo "$KUBE_PID $ETCD_PID" ;;
        scale) echo "$SCALE_PID" ;;
    esac
}
# The processes that serve the request behind the setup (its "backend").
backend_pids() {
    case $1 in
        delegate-*) echo "$KUBE_PID $ETCD_PID" ;;
        *) echo "$BACKEND_PID" ;;
    esac
}
IDLE_RSS_KB=$(status_kb VmRSS "$PROXY_PID")

# ---------------------------------------------------------------------------------------------
# One measurement: a warm-up run, then the measured run bracketed by CPU and peak-RSS reads.
# h2load: HTTP/1.1 uses C connections; HTTP/2 uses ceil(C/H2_STREAMS) connections with C
# streams in all (a few multiplexing clients, as client-go does).
h2load_args() { # PROTO C
    local conns streams
    if [ "$1" = h1 ]; then
        echo "--h1 -c $2 -m 1"
    else
        conns=$((($2 + H2_STREAMS - 1) / H2_STREAMS))
        streams=$(($2 / conns))
        echo "-c $conns -m $streams"
    fi
}
echo -e "name\tsetup\tproto\tconcurrency\tround\ttarget_cpu_ticks\tbackend_cpu_ticks\tpeak_rss_kb\tclk_tck" \
    >"$OUT/runs.tsv"
CLK_TCK=$(getconf CLK_TCK)
measure() { # NAME SETUP PROTO C ROUND [extra h2load args...]
    local name=$1 setup=$2 proto=$3 c=$4 round=$5
    shift 5
    local url=${URL[$setup]} token pids bpids cpu0 cpu1 b0 b1 hwm
    token=$(token_of "$setup")
    # shellcheck disable=SC2046
    timeout $((WARMUP + 30)) h2load -t 1 $(h2load_args "$proto" "$c") -H "Authorization: Bearer $token" \
        -D "$WARMUP" "$@" "$url" >/dev/null 2>&1 || true
    pids=$(target_pids "$setup")
    bpids=$(backend_pids "$setup")
    # shellcheck disable=SC2086
    reset_peak $pids
    # shellcheck disable=SC2086
    cpu0=$(cpu_ticks $pids)
    # shellcheck disable=SC2086
    b0=$(cpu_ticks $bpids)
    # shellcheck disable=SC2046
    timeout $((DURATION + 30)) h2load -t 1 $(h2load_args "$proto" "$c") -H "Authorization: Bearer $token" \
        -D "$DURATION" --log-file="$OUT/raw/$name.log" "$@" "$url" >"$OUT/raw/$name.out" 2>&1 || true
    # shellcheck disable=SC2086
    cpu1=$(cpu_ticks $pids)
    # shellcheck disable=SC2086
    b1=$(cpu_ticks $bpids)
    # shellcheck disable=SC2086
    hwm=$(status_kb VmHWM $pids)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$setup" "$proto" "$c" "$round" \
        $((cpu1 - cpu0)) $((b1 - b0)) "$hwm" "$CLK_TCK" >>"$OUT/runs.tsv"
    log "$name: $(grep -m1 '^finished' "$OUT/raw/$name.out" || echo 'no result')"
}

log "load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg)"
cut -d' ' -f1-3 /proc/loadavg >"$OUT/loadavg-start"
for round in $(seq "$ROUNDS"); do
    for proto in $PROTOCOLS; do
        for c in $CONCURRENCY; do
            for setup in $SETUPS; do
                measure "$setup-$proto-c$c-r$round" "$setup" "$proto" "$c" "$round"
            done
        done
    done
done

# ---------------------------------------------------------------------------------------------
# Churn: steady HTTP/2 load at a fixed rate through the proxy, first without changes, then
# with CHURN_RATE APIService changes a second (adds, updates, deletes of other groups, whose
# APIServices point at the decoy: a request it answers comes back 3xx and counts as misrouted).
if [ "$CHURN_SECONDS" -gt 0 ]; then
    mkdir -p churn-staging
    python3 "$ROOT/benches/load/churn.py" --dir "$WORK/apiservices" --staging "$WORK/churn-staging" \
        --ca-b64 "$CA_B64" --prepare 100 --rate 0 --seconds 0 >/dev/null
    metric() { curl -s --max-time 5 --cacert ca.crt -H "Authorization: Bearer $TOKEN" \
        "https://127.0.0.1:$PROXY_PORT/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
    wait_for 10 "the churn baseline table" bash -c \
        "[ \"\$(curl -s --cacert ca.crt -H 'Authorization: Bearer $TOKEN' https://127.0.0.1:$PROXY_PORT/metrics |
            awk '\$1 == \"aggregator_routing_table_apiservices\" {print \$2}')\" = 101 ]"
    # 4 connections x 4 streams, each connection paced at CHURN_RPS/4 requests a second.
    rps_per_conn=$((CHURN_RPS / 4))
    churn_h2load() { # NAME
        local cpu0 cpu1
        cpu0=$(cpu_ticks "$PROXY_PID")
        timeout $((CHURN_SECONDS + 30)) h2load -t 1 -c 4 -m 4 --rps "$rps_per_conn" \
            -H "Authorization: Bearer $TOKEN" -D "$CHURN_SECONDS" --log-file="$OUT/raw/$1.log" \
            "${URL[proxy]}" >"$OUT/raw/$1.out" 2>&1 || true
        cpu1=$(cpu_ticks "$PROXY_PID")
        printf '%s\tproxy\th2\t16\t0\t%s\t0\t%s\t%s\n' "$1" $((cpu1 - cpu0)) \
            "$(status_kb VmHWM "$PROXY_PID")" "$CLK_TCK" >>"$OUT/runs.tsv"
        log "$1: $(grep -m1 '^finished' "$OUT/raw/$1.out" || echo 'no result')"
    }
    log "churn: baseline ${CHURN_SECONDS}s at $CHURN_RPS req/s"
    churn_h2load churn-baseline
    rebuilds0=$(metric aggregator_routing_table_rebuilds_total)
    log "churn: ${CHURN_SECONDS}s at $CHURN_RPS req/s with $CHURN_RATE APIService changes/s"
    python3 "$ROOT/benches/load/churn.py" --dir "$WORK/apiservices" --staging "$WORK/churn-staging" \
        --ca-b64 "$CA_B64" --rate "$CHURN_RATE" --seconds "$CHURN_SECONDS" >"$OUT/churn.json" &
    churn_pid=$!
    PIDS+=("$churn_pid")
    churn_h2load churn-under-changes
    wait "$churn_pid" || true
    rebuilds1=$(metric aggregator_routing_table_rebuilds_total)
    echo "{\"rebuilds\": $((${rebuilds1%.*} - ${rebuilds0%.*}))}" >"$OUT/churn-rebuilds.json"
fi

# ---------------------------------------------------------------------------------------------
# Scale: a second proxy with SCALE_APISERVICES APIServices (100 per file), plus the bench one.
if [ "$SCALE_APISERVICES" -gt 0 ]; then
    mkdir -p scale
    python3 "$ROOT/benches/load/churn.py" --dir "$WORK/scale" --staging "$WORK/churn-staging" \
        --ca-b64 "$CA_B64" --bulk "$SCALE_APISERVICES" >/dev/null
    cp apiservices/bench.yaml scale/
    SCALE_PORT=$(free_port)
    started=$(date +%s.%N)
    start_proxy proxy-scale "$WORK/scale" "$SCALE_PORT"
    SCALE_PID=$STARTED_PID
    wait_for 120 "the 10,000-APIService proxy to be ready" curl_ok "https://127.0.0.1:$SCALE_PORT/readyz"
    ready=$(date +%s.%N)
    scale_metrics=$(curl -s --max-time 5 --cacert ca.crt -H "Authorization: Bearer $TOKEN" \
        "https://127.0.0.1:$SCALE_PORT/metrics")
    {
        echo "apiservices_loaded $(awk '$1 == "aggregator_routing_table_apiservices" {print $2}' <<<"$scale_metrics")"
        echo "build_seconds_sum $(awk '$1 == "aggregator_routing_table_build_duration_seconds_sum" {print $2}' <<<"$scale_metrics")"
        echo "build_count $(awk '$1 == "aggregator_routing_table_build_duration_seconds_count" {print $2}' <<<"$scale_metrics")"
        echo "ready_seconds $(python3 -c "print(round($ready - $started, 3))")"
        echo "rss_kb $(status_kb VmRSS "$SCALE_PID")"
        echo "hwm_kb $(status_kb VmHWM "$SCALE_PID")"
        echo "idle_rss_kb_one_apiservice $IDLE_RSS_KB"
    } >"$OUT/scale.txt"
    URL[scale]="https://127.0.0.1:$SCALE_PORT$RESOURCE_PATH"
    # The same load against both proxies, back to back: per-request cost at 10,000 APIServices.
    measure scale-h2-c16 scale h2 16 0
    measure scale-reference-h2-c16 proxy h2 16 0
    echo "rss_kb_after_load $(status_kb VmRSS "$SCALE_PID")" >>"$OUT/scale.txt"
fi

# ---------------------------------------------------------------------------------------------
cut -d' ' -f1-3 /proc/loadavg >"$OUT/loadavg-end"
{
    echo "command: benches/load.sh (DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS CONCURRENCY=\"$CONCURRENCY\" PROTOCOLS=\"$PROTOCOLS\" SETUPS=\"$SETUPS\" CHURN_SECONDS=$CHURN_SECONDS CHURN_RATE=$CHURN_RATE CHURN_RPS=$CHURN_RPS SCALE_APISERVICES=$SCALE_APISERVICES)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel: $(uname -r)"
    echo "os: $(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "h2load: $(h2load --version | head -1)"
    echo "nginx: $("$NGINX" -v 2>&1 | cut -d/ -f2)"
    echo "kube-apiserver: $(if [ -n "$KUBE_PID" ]; then basename "$(readlink "/proc/$KUBE_PID/exe")"; else echo none; fi)"
    echo "rustc: $(rustc --version)"
    echo "proxy-alt settings: ${PROXY_ALT_SETTINGS:-none}, binary: ${PROXY_ALT_BIN:-the same}"
    echo "demo --cluster flags: ${DEMO_ARGS:-none}"
    echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet HEAD -- src || echo ' + uncommitted src changes')"
    echo "load average: start $(cat "$OUT/loadavg-start"), end $(cat "$OUT/loadavg-end")"
} >"$OUT/machine.txt"
python3 "$ROOT/benches/load/report.py" "$OUT"
log "report: $OUT/report.md, plot: $OUT/latency.png"
