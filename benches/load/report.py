#!/usr/bin/env python3
"""Turns a benches/load.sh run directory into report.md (tables, ratios, targets) and
latency.png (latency percentiles per setup). Usage: report.py OUT_DIR"""

import csv
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np

SETUP_ORDER = ["direct", "proxy", "proxy-alt", "nginx", "haproxy", "kube", "cluster-proxy"]
# The path to kube-apiserver itself (a core resource), in its own section.
DELEGATE_SETUPS = ["delegate-direct", "delegate-proxy"]
LABEL = {
    "direct": "direct to backend",
    "proxy": "kube-aggregation-proxy",
    "proxy-alt": "kube-aggregation-proxy, PROXY_ALT_SETTINGS",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "kube": "kube-apiserver aggregator",
    "cluster-proxy": "kube-aggregation-proxy, cluster mode",
    "delegate-direct": "kube-apiserver, core GET",
    "delegate-proxy": "kube-aggregation-proxy, cluster mode, core GET",
    "scale": "kube-aggregation-proxy, 10,000 APIServices",
}
PERCENTILES = [50, 75, 90, 95, 99, 99.9]


def parse_out(path):
    text = open(path).read() if os.path.exists(path) else ""
    r = {"rps": 0.0, "seconds": 0.0, "done": 0, "succeeded": 0, "failed": 0, "errored": 0, "timeout": 0}
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    if m:
        r["seconds"] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        r["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    if m:
        for i, k in enumerate(["total", "started", "done", "succeeded", "failed", "errored", "timeout"]):
            r[k] = int(m.group(i + 1))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    for i, k in enumerate(["s2xx", "s3xx", "s4xx", "s5xx"]):
        r[k] = int(m.group(i + 1)) if m else 0
    return r


def parse_log(path):
    if not os.path.exists(path):
        return np.array([]), 0
    data = np.loadtxt(path, dtype=np.int64, ndmin=2, usecols=(1, 2)) if os.path.getsize(path) else np.zeros((0, 2))
    ok = data[data[:, 0] != -1] if len(data) else data
    return (ok[:, 1] / 1000.0 if len(ok) else np.array([])), int(len(data) - len(ok))


def main(out):
    runs = list(csv.DictReader(open(os.path.join(out, "runs.tsv")), delimiter="\t"))
    by_key = defaultdict(list)
    for run in runs:
        run.update(parse_out(os.path.join(out, "raw", run["name"] + ".out")))
        run["lat"], _ = parse_log(os.path.join(out, "raw", run["name"] + ".log"))
        tck = float(run["clk_tck"])
        run["cpu_s"] = int(run["target_cpu_ticks"]) / tck
        run["backend_cpu_s"] = int(run["backend_cpu_ticks"]) / tck
        run["errors"] = run["failed"] + run["errored"] + run["timeout"] + run["s4xx"] + run["s5xx"]
        run["misrouted"] = run["s3xx"]
        if run["round"] != "0":
            by_key[(run["proto"], int(run["concurrency"]), run["setup"])].append(run)

    # One row per (protocol, concurrency, setup): median throughput over rounds, latency
    # percentiles over every request of every round, CPU summed over rounds.
    rows = {}
    for key, rs in by_key.items():
        lat = np.concatenate([r["lat"] for r in rs]) if rs else np.array([])
        done = sum(r["done"] for r in rs)
        cpu = sum(r["cpu_s"] for r in rs)
        backend_cpu = sum(r["backend_cpu_s"] for r in rs)
        rows[key] = {
            # CPU per request as a multiple of the backend's for the same requests: a ratio
            # that moves little with machine load.
            "cpu_x_backend": cpu / backend_cpu if backend_cpu else float("nan"),
            "rps": float(np.median([r["rps"] for r in rs])),
            "pct": {p: float(np.percentile(lat, p)) if len(lat) else float("nan") for p in PERCENTILES},
            "errors": sum(r["errors"] for r in rs),
            "misrouted": sum(r["misrouted"] for r in rs),
            "done": done,
            "cpu_s": cpu / len(rs),
            "req_per_cpu_s": done / cpu if cpu else float("nan"),
            "rss_mib": max(int(r["peak_rss_kb"]) for r in rs) / 1024,
            "lat": lat,
        }

    protos = [p for p in ["h1", "h2"] if any(k[0] == p for k in rows)]
    concs = sorted({k[1] for k in rows})
    setups = [s for s in SETUP_ORDER if any(k[2] == s for k in rows)]
    proto_name = {"h1": "HTTP/1.1", "h2": "HTTP/2"}
    md = []
    machine = open(os.path.join(out, "machine.txt")).read().strip() if os.path.exists(
        os.path.join(out, "machine.txt")) else ""
    md += ["## Machine and command", "", "```", machine, "```", ""]

    def fmt(x, digits=2):
        return "n/a" if x != x else f"{x:.{digits}f}"

    md += ["## Throughput, latency, CPU and memory", "",
           "Ratios are to *direct* from the same run (and, for the proxy, to kube-apiserver's "
           "aggregator). CPU s and peak RSS are the process(es) under test during the measured "
           "run (nginx: master + workers; direct: the backend itself); req/CPU-s is requests "
           "completed per CPU second of that process. p99 added = p99 minus direct's p99.", ""]
    for proto in protos:
        for c in concs:
            direct = rows.get((proto, c, "direct"))
            kube = rows.get((proto, c, "kube"))
            md += [f"### {proto_name[proto]}, concurrency {c}", "",
                   "| setup | req/s | x direct | x kube | p50 ms | p99 ms | p99 added ms | errors | "
                   "CPU s | req/CPU-s | CPU/req x kube | CPU/req x backend | peak RSS MiB |",
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for s in setups:
                r = rows.get((proto, c, s))
                if not r:
                    continue
                xd = r["rps"] / direct["rps"] if direct and direct["rps"] else float("nan")
                xk = r["rps"] / kube["rps"] if kube and kube["rps"] and s != "kube" else float("nan")
                added = r["pct"][99] - direct["pct"][99] if direct and s != "direct" else float("nan")
                cpu_x = ((1 / r["req_per_cpu_s"]) / (1 / kube["req_per_cpu_s"])
                         if kube and s not in ("kube", "direct") else float("nan"))
                md.append(f"| {LABEL[s]} | {r['rps']:.0f} | {fmt(xd)} | {fmt(xk)} | {fmt(r['pct'][50], 3)} | "
                          f"{fmt(r['pct'][99], 3)} | {fmt(added, 3)} | {r['errors'] + r['misrouted']} | "
                          f"{r['cpu_s']:.2f} | {r['req_per_cpu_s']:.0f} | {fmt(cpu_x)} | "
                          f"{fmt(r['cpu_x_backend']) if s != 'direct' else 'n/a'} | {r['rss_mib']:.1f} |")
            md.append("")

    # The ratio table the issue asks to quote.
    md += ["## Ratio table", "",
           "Throughput as a ratio to direct; the proxy's throughput and CPU per request against "
           "kube-apiserver's aggregator; requests per CPU second, proxy against nginx and HAProxy; "
           "CPU per request of each proxy as a multiple of the backend's for the same requests.", "",
           "| protocol | c | proxy x direct | nginx x direct | HAProxy x direct | kube x direct | "
           "proxy x kube (req/s) | proxy CPU/req x kube | proxy req/CPU-s x nginx | "
           "proxy req/CPU-s x HAProxy | CPU/req x backend: proxy / nginx / HAProxy | proxy p99 added ms |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for proto in protos:
        for c in concs:
            g = lambda s: rows.get((proto, c, s))
            d, p, n, h, k = g("direct"), g("proxy"), g("nginx"), g("haproxy"), g("kube")
            ratio = lambda a, b, f: f(a, b) if a and b else float("nan")
            xb = lambda r: fmt(r["cpu_x_backend"]) if r else "n/a"
            md.append(
                f"| {proto_name[proto]} | {c} | {fmt(ratio(p, d, lambda a, b: a['rps'] / b['rps']))} | "
                f"{fmt(ratio(n, d, lambda a, b: a['rps'] / b['rps']))} | "
                f"{fmt(ratio(h, d, lambda a, b: a['rps'] / b['rps']))} | "
                f"{fmt(ratio(k, d, lambda a, b: a['rps'] / b['rps']))} | "
                f"{fmt(ratio(p, k, lambda a, b: a['rps'] / b['rps']))} | "
                f"{fmt(ratio(p, k, lambda a, b: b['req_per_cpu_s'] / a['req_per_cpu_s']))} | "
                f"{fmt(ratio(p, n, lambda a, b: a['req_per_cpu_s'] / b['req_per_cpu_s']))} | "
                f"{fmt(ratio(p, h, lambda a, b: a['req_per_cpu_s'] / b['req_per_cpu_s']))} | "
                f"{xb(p)} / {xb(n)} / {xb(h)} | "
                f"{fmt(ratio(p, d, lambda a, b: a['pct'][99] - b['pct'][99]), 3)} |")
    md.append("")

    # Fronting kube-apiserver: the delegate path, with the aggregated path of the same proxy.
    if any(k[2] in DELEGATE_SETUPS for k in rows):
        md += ["## Fronting kube-apiserver: the delegate path", "",
               "GET /api/v1/namespaces/default with the testbed's admin token, directly (delegate-direct) and "
               "through the proxy in cluster mode (delegate-proxy); beside them the aggregated path through the "
               "same proxy (cluster-proxy) and through kube-apiserver's aggregator (kube). CPU us/req is the "
               "process under test (for the proxy rows, the proxy alone); x backend divides it by the CPU per "
               "request of what served the request behind it: kube-apiserver + etcd on the delegate path, the "
               "bench backend on the aggregated one. p50 added is against delegate-direct (delegate path) or "
               "direct (aggregated path).", "",
               "| protocol | c | setup | req/s | p50 ms | p99 ms | p50 added ms | CPU us/req | CPU/req x backend |",
               "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for proto in protos:
            for c in concs:
                for name in DELEGATE_SETUPS + ["cluster-proxy", "kube"]:
                    r = rows.get((proto, c, name))
                    if not r:
                        continue
                    ref = rows.get((proto, c, "delegate-direct" if name in DELEGATE_SETUPS else "direct"))
                    added = r["pct"][50] - ref["pct"][50] if ref and name != "delegate-direct" else float("nan")
                    cpu_us = 1e6 / r["req_per_cpu_s"] if r["req_per_cpu_s"] else float("nan")
                    xb = r["cpu_x_backend"] if name != "delegate-direct" else float("nan")
                    md.append(f"| {proto_name[proto]} | {c} | {LABEL[name]} | {r['rps']:.0f} | "
                              f"{fmt(r['pct'][50], 3)} | {fmt(r['pct'][99], 3)} | {fmt(added, 3)} | "
                              f"{fmt(cpu_us, 1)} | {fmt(xb)} |")
        md.append("")

    # Churn.
    churn = {r["name"]: r for r in runs if r["name"].startswith("churn-")}
    if churn:
        ops = json.load(open(os.path.join(out, "churn.json"))) if os.path.exists(
            os.path.join(out, "churn.json")) else {}
        rebuilds = json.load(open(os.path.join(out, "churn-rebuilds.json"))) if os.path.exists(
            os.path.join(out, "churn-rebuilds.json")) else {}
        md += ["## Churn", "",
               f"HTTP/2 through the proxy at a fixed rate, first without changes, then with "
               f"{ops.get('changes', '?')} APIService changes in {ops.get('seconds', '?')} s "
               f"({ops.get('rate', '?')}/s: {ops.get('add', '?')} adds, {ops.get('update', '?')} updates, "
               f"{ops.get('rename', '?')} renames, {ops.get('delete', '?')} deletes of other groups, which "
               f"point at a decoy backend answering 300). Routing tables swapped in during the churn: "
               f"{rebuilds.get('rebuilds', '?')}.", "",
               "| phase | requests | failed | misrouted (3xx) | req/s | p50 ms | p99 ms | p99.9 ms | proxy CPU s |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ["churn-baseline", "churn-under-changes"]:
            r = churn.get(name)
            if not r:
                continue
            pct = {p: float(np.percentile(r["lat"], p)) if len(r["lat"]) else float("nan") for p in PERCENTILES}
            md.append(f"| {name.replace('churn-', '')} | {r['done']} | {r['errors']} | {r['misrouted']} | "
                      f"{r['rps']:.0f} | {fmt(pct[50], 3)} | {fmt(pct[99], 3)} | {fmt(pct[99.9], 3)} | "
                      f"{r['cpu_s']:.2f} |")
        md.append("")

    # Scale.
    scale_path = os.path.join(out, "scale.txt")
    if os.path.exists(scale_path):
        s = dict(line.split(" ", 1) for line in open(scale_path).read().splitlines() if " " in line)
        build_ms = (float(s.get("build_seconds_sum", "nan")) / max(float(s.get("build_count", "1")), 1) * 1000)
        md += ["## Scale", "",
               "| measure | value |", "|---|---:|",
               f"| APIServices in the table | {s.get('apiservices_loaded', '?')} |",
               f"| table builds at start | {s.get('build_count', '?')} |",
               f"| table build, mean (aggregator_routing_table_build_duration_seconds) | {build_ms:.1f} ms |",
               f"| start to ready (parse + validate 10,000 manifests, build) | {s.get('ready_seconds', '?')} s |",
               f"| VmRSS, 10,000 APIServices, idle | {int(s.get('rss_kb', 0)) / 1024:.1f} MiB |",
               f"| VmRSS after the load run below | {int(s.get('rss_kb_after_load', 0)) / 1024:.1f} MiB |",
               f"| VmHWM (peak, start-up included) | {int(s.get('hwm_kb', 0)) / 1024:.1f} MiB |",
               f"| VmRSS, 1 APIService, idle (reference) | {int(s.get('idle_rss_kb_one_apiservice', 0)) / 1024:.1f} MiB |",
               ""]
        sr = {r["name"]: r for r in runs if r["name"].startswith("scale")}
        if sr:
            md += ["HTTP/2, concurrency 16, the same load against both proxies back to back:", "",
                   "| proxy | req/s | p50 ms | p99 ms | CPU s | req/CPU-s |", "|---|---:|---:|---:|---:|---:|"]
            for name, label in [("scale-h2-c16", "10,000 APIServices"), ("scale-reference-h2-c16", "1 APIService")]:
                r = sr.get(name)
                if r:
                    md.append(f"| {label} | {r['rps']:.0f} | {fmt(float(np.percentile(r['lat'], 50)), 3)} | "
                              f"{fmt(float(np.percentile(r['lat'], 99)), 3)} | {r['cpu_s']:.2f} | "
                              f"{r['done'] / r['cpu_s'] if r['cpu_s'] else float('nan'):.0f} |")
            md.append("")

    md += ["![latency percentiles per setup](latency.png)", ""]
    open(os.path.join(out, "report.md"), "w").write("\n".join(md))

    # Plot: one panel per (protocol, concurrency), latency against percentile, one line per setup.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(protos), len(concs), figsize=(4.2 * len(concs), 3.4 * len(protos)),
                             squeeze=False)
    xs = np.array(PERCENTILES)
    xpos = -np.log10(1 - xs / 100)
    for i, proto in enumerate(protos):
        for j, c in enumerate(concs):
            ax = axes[i][j]
            for s in setups:
                r = rows.get((proto, c, s))
                if r and len(r["lat"]):
                    ax.plot(xpos, [r["pct"][p] for p in PERCENTILES], marker="o", label=LABEL[s])
            ax.set_yscale("log")
            ax.set_xticks(xpos)
            ax.set_xticklabels([f"p{p:g}" for p in PERCENTILES], fontsize=8)
            ax.set_title(f"{proto_name[proto]}, concurrency {c}", fontsize=10)
            ax.set_ylabel("latency (ms)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Latency percentiles per setup (loopback TLS, constant small JSON backend)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency.png"), dpi=100)


if __name__ == "__main__":
    main(sys.argv[1])
