#!/usr/bin/env python3
"""Hostile-client figures for the front end (not a test: it measures). Loopback only, every
loop bounded; it starts `kube-aggregation-proxy demo` (proxy and sample backend in one
process) and stops it at the end.

    cargo build --release && benches/hostile.py [--connections 5000] [--bin PATH]

1. flood: N TLS connections that finish the handshake and then say nothing. Proxy RSS and
   open fds before, at the peak, and 5 s after they are closed; the canary's worst latency.
2. slowloris: 200 HTTP/2 connections trickling a HEADERS frame a byte a second; how many the
   proxy still holds after the request-header timeout (32 s by default) and its grace.
3. manifest: a 200 KB nested YAML dropped into the manifest directory; the proxy's CPU time
   for it and the canary's worst latency meanwhile.
"""
import argparse
import http.client
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Canary(threading.Thread):
    """GETs the echo route every 50 ms on fresh connections; records the worst latency."""

    def __init__(self, port, pki):
        super().__init__(daemon=True)
        self.ctx = ssl.create_default_context(cafile=f"{pki}/serving-ca.crt")
        self.ctx.load_cert_chain(f"{pki}/demo-admin.crt", f"{pki}/demo-admin.key")
        self.port, self.worst, self.failed, self.ok = port, 0.0, 0, 0
        self.stopping = threading.Event()

    def run(self):
        for _ in range(20_000):
            if self.stopping.is_set():
                return
            started = time.monotonic()
            try:
                # From an address of its own, so the flood's per-client share is not the canary's.
                c = http.client.HTTPSConnection("localhost", self.port, context=self.ctx, timeout=10,
                                                source_address=("127.0.0.254", 0))
                c.request("GET", "/apis/echo.example.com/v1/namespaces/default/things/x")
                ok = c.getresponse().status == 200
                c.close()
            except OSError:
                ok = False
            self.worst = max(self.worst, time.monotonic() - started)
            self.ok += ok
            self.failed += not ok
            time.sleep(0.05)

    def stop(self):
        self.stopping.set()
        self.join()
        return f"canary: {self.ok} answered, {self.failed} failed, worst {self.worst * 1000:.0f} ms"


def tls_silent(port, alpn, source="127.0.0.1"):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    tcp = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return ctx.wrap_socket(tcp, server_hostname="localhost")


def still_open(socks):
    """Connections the proxy has not closed: reading drains what it sent (an HTTP/2 GOAWAY)
    and stops at end of stream (closed) or at nothing more to read (open)."""
    n = 0
    for s in socks:
        s.setblocking(False)
        for _ in range(100):
            try:
                if s.recv(65536) == b"":
                    break
            except (BlockingIOError, ssl.SSLWantReadError):
                n += 1
                break
            except OSError:
                break
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/kube-aggregation-proxy")
    ap.add_argument("--connections", type=int, default=5000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kap-hostile-")
    port = free_port()
    log = open(f"{work}/demo.log", "w")
    proc = subprocess.Popen([args.bin, "demo", "--dir", work, "--port", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{work}/kubeconfig") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        pid = proc.pid
        canary = Canary(port, f"{work}/pki")
        canary.start()
        time.sleep(1)

        base_rss, base_fds = rss_kib(pid), fds(pid)
        socks = []
        started = time.monotonic()
        # Spread over source addresses: each has a share of 1,000 (--max-connections-per-client).
        for i in range(args.connections):
            try:
                socks.append(tls_silent(port, ["h2", "http/1.1"], f"127.0.0.{1 + i // 900}"))
            except OSError:
                break
        took = time.monotonic() - started
        peak_rss, peak_fds = rss_kib(pid), fds(pid)
        print(f"flood: {len(socks)} silent TLS connections opened in {took:.1f} s")
        print(f"  proxy RSS {base_rss} KiB -> {peak_rss} KiB at the peak ({(peak_rss - base_rss) / max(len(socks), 1):.1f} KiB each), fds {base_fds} -> {peak_fds}")
        time.sleep(max(0.0, 40 - (time.monotonic() - started)))
        print(f"  still open 40 s after the first: {still_open(socks)} of {len(socks)}")
        for s in socks:
            s.close()
        time.sleep(5)
        print(f"  5 s after closing: RSS {rss_kib(pid)} KiB, fds {fds(pid)}")
        print(f"  {canary.stop()}")

        canary = Canary(port, f"{work}/pki")
        canary.start()
        slow = []
        for _ in range(200):
            s = tls_silent(port, ["h2"])
            s.sendall(H2_PREFACE + bytes([0, 0, 64, 1, 4, 0, 0, 0, 1]))
            slow.append(s)
        started = time.monotonic()
        for _ in range(45):
            for s in slow:
                try:
                    s.sendall(b"\x82")
                except OSError:
                    pass
            time.sleep(1)
        print(f"slowloris: 200 HTTP/2 connections trickling headers at 1 byte/s; still open after {time.monotonic() - started:.0f} s: {still_open(slow)}")
        print(f"  {canary.stop()}")
        for s in slow:
            s.close()

        canary = Canary(port, f"{work}/pki")
        canary.start()
        cpu_before = cpu_seconds(pid)
        with open(f"{work}/apiservices/deep.yaml", "w") as f:
            f.write("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
        time.sleep(5)
        print(f"manifest: 200 KB nested YAML: proxy CPU {cpu_seconds(pid) - cpu_before:.2f} s over the next 5 s")
        print(f"  {canary.stop()}")
        with open(f"{work}/demo.log") as f:
            reasons = [line.strip() for line in f if "deep.yaml" in line]
        print(f"  log: {reasons[-1][:200] if reasons else 'no line about deep.yaml'}")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


if __name__ == "__main__":
    main()
