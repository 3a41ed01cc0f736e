#!/usr/bin/env python3
"""APIService manifests for benches/load.sh: churn under load, and bulk sets for the scale test.

Churned APIServices are `v1.churn<N>.example.com`, other groups than the one under load, and
point at the decoy service. Every write goes to a staging file first and is renamed into the
directory, as editors and config management do, so the proxy never reads half a file.

  --prepare N           write N churn manifests (one APIService each) and exit
  --rate R --seconds S  R changes a second for S seconds, cycling add, update, rename, delete;
                        bounded by count (R*S) and by time (S + 5 s); prints a JSON summary
  --bulk N              write N APIServices, 100 per file, and exit
"""

import argparse
import json
import os
import time

TEMPLATE = """---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1.{group}
spec:
  group: {group}
  version: v1
  groupPriorityMinimum: {gpm}
  versionPriority: {vp}
  service:
    namespace: bench
    name: decoy
    port: 443
  caBundle: {ca}
"""


def manifest(n, ca, vp=15):
    return TEMPLATE.format(group=f"churn{n}.example.com", gpm=100 + n % 900, vp=vp, ca=ca)


def put(args, name, text):
    staging = os.path.join(args.staging, name + ".tmp")
    with open(staging, "w") as f:
        f.write(text)
    os.replace(staging, os.path.join(args.dir, name))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--staging", required=True)
    p.add_argument("--ca-b64", required=True)
    p.add_argument("--prepare", type=int, default=0)
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--seconds", type=float, default=0)
    p.add_argument("--bulk", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.staging, exist_ok=True)

    if args.bulk:
        per_file = 100
        for start in range(0, args.bulk, per_file):
            text = "".join(manifest(n, args.ca_b64) for n in range(start, min(start + per_file, args.bulk)))
            put(args, f"bulk-{start // per_file:05d}.yaml", text)
        return

    if args.prepare:
        for n in range(args.prepare):
            put(args, f"churn-{n}.yaml", manifest(n, args.ca_b64))
        return

    # Live churn files: (number, file name). Starts from what --prepare wrote.
    live = sorted(
        (int(f.split("-")[1].split(".")[0]), f)
        for f in os.listdir(args.dir)
        if f.startswith("churn-") and f.endswith(".yaml")
    )
    next_n = max((n for n, _ in live), default=-1) + 1
    total = int(args.rate * args.seconds)
    counts = {"add": 0, "update": 0, "rename": 0, "delete": 0}
    kinds = ["add", "update", "rename", "delete"]
    started = time.monotonic()
    deadline = started + args.seconds + 5
    for i in range(total):
        due = started + i / args.rate
        now = time.monotonic()
        if now > deadline:
            break
        if due > now:
            time.sleep(due - now)
        kind = kinds[i % 4]
        if kind != "add" and not live:
            kind = "add"
        if kind == "add":
            name = f"churn-{next_n}.yaml"
            put(args, name, manifest(next_n, args.ca_b64))
            live.append((next_n, name))
            next_n += 1
        elif kind == "update":
            n, name = live[i % len(live)]
            put(args, name, manifest(n, args.ca_b64, vp=15 + (i % 50)))
        elif kind == "rename":
            n, name = live.pop(i % len(live))
            renamed = f"churn-{n}-r{i}.yaml"
            os.replace(os.path.join(args.dir, name), os.path.join(args.dir, renamed))
            live.append((n, renamed))
        else:
            n, name = live.pop(0)
            os.remove(os.path.join(args.dir, name))
        counts[kind] += 1
    elapsed = time.monotonic() - started
    done = sum(counts.values())
    print(json.dumps({"changes": done, "seconds": round(elapsed, 2), "rate": round(done / elapsed, 1), **counts}))


if __name__ == "__main__":
    main()
