#!/usr/bin/env python3
"""A picture of manifests/dashboards/kube-aggregation-proxy.json from a benchmark run, without
Grafana or Prometheus.

    benches/dashboard.py scrape --url https://127.0.0.1:8443/metrics --cacert ca.crt \\
        --token TOKEN --interval 1 --duration 30 --out DIR
    benches/dashboard.py render --scrapes DIR \\
        --dashboard manifests/dashboards/kube-aggregation-proxy.json --out dashboard.png

`scrape` GETs /metrics every --interval seconds until --duration has passed and saves each
answer as DIR/<unix milliseconds>.prom (written to a temporary name and renamed, so a partial
body is never read). A scrape that fails or is slower than the interval is reported and
skipped: the series has a gap there, as Prometheus's would. Only the standard library is used
(ssl, urllib), so it runs wherever the benchmark does.

`render` evaluates every panel's PromQL `expr` from the dashboard JSON itself over the saved
scrapes, and draws the panels where their gridPos puts them. The queries are evaluated rather
than mapped to hand-written Python per panel so that the picture cannot drift from the
dashboard: change an expr and the picture follows, use PromQL this evaluator does not know and
it stops with the construct named. The subset is what the dashboard uses:

- selectors with =, !=, =~, !~ matchers and a [range]; Grafana's $var, ${var} and
  ${var:format} are substituted first (--var group=x; a variable not given is "All", `.*`),
  and $__rate_interval is 4 scrape intervals, as Grafana computes it when the data source's
  scrape interval is the scrape interval here;
- rate() and increase() with Prometheus's extrapolation to the window's edges and counter
  resets; histogram_quantile() with Prometheus's linear interpolation within a bucket (the
  +Inf bucket answers the highest finite bound);
- sum, min, max, avg and count, with `by` or `without`;
- + - * / between scalars and vectors (vectors match one-to-one on their labels) and `or`.

Each scrape is one evaluation step, at the time the scrape was started; a series missing from
a scrape is absent at that step (Prometheus marks it stale). The page looks like Grafana's dark
theme (panel titles, legends below the graph, a shared time axis) and says at the bottom that
benches/dashboard.py drew it, so it is never taken for a Grafana screenshot.
"""

import argparse
import bisect
import http.client
import json
import math
import os
import re
import ssl
import statistics
import sys
import time
import urllib.request
from datetime import datetime, timezone

# ---------------------------------------------------------------------------------------------
# scrape


def scrape(args):
    """Saves /metrics every --interval seconds for --duration seconds; failures are skipped."""
    context = ssl.create_default_context(cafile=args.cacert)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    headers = {"Accept": "text/plain;version=0.0.4"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    os.makedirs(args.out, exist_ok=True)
    if any(name.endswith(".prom") for name in os.listdir(args.out)):
        # render reads every scrape in the directory: two runs in one would draw as one.
        print(f"{args.out} already holds scrapes; give a new directory", file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.duration
    tick, saved, failed = 0, 0, 0
    try:
        while True:
            taken = time.time()
            try:
                request = urllib.request.Request(args.url, headers=headers)
                with urllib.request.urlopen(request, context=context, timeout=args.interval) as response:
                    body = response.read()
            # URLError, HTTPError, TLS errors and timeouts are OSErrors; a body cut short is an
            # HTTPException.
            except (OSError, http.client.HTTPException) as e:
                failed += 1
                print(f"scrape at {stamp(taken)} skipped: {e}", file=sys.stderr)
            else:
                path = os.path.join(args.out, f"{round(taken * 1000):013d}.prom")
                with open(path + ".tmp", "wb") as f:
                    f.write(body)
                os.replace(path + ".tmp", path)
                saved += 1
            # The next tick on the original schedule; ticks a slow scrape overran are skipped.
            tick = max(tick + 1, round((time.monotonic() - start) / args.interval))
            next_at = start + tick * args.interval
            if next_at >= deadline:
                break
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    print(f"{saved} scrapes saved to {args.out}, {failed} skipped", file=sys.stderr)
    return 0 if saved else 1


def stamp(epoch):
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%H:%M:%S.%f")[:-3]


# ---------------------------------------------------------------------------------------------
# Prometheus text exposition format

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|\})')
LABEL_ESCAPE = re.compile(r"\\(.)")


def parse_exposition(text, origin):
    """{series: value} for one scrape; a series is the sorted tuple of its (label, value) pairs,
    the metric name as __name__. Comments (HELP, TYPE) say nothing the panels need."""
    samples = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = METRIC_NAME.match(line)
        if not m:
            raise ValueError(f"{origin}:{lineno}: no metric name in {line!r}")
        labels = [("__name__", m.group())]
        pos = m.end()
        if line.startswith("{", pos):
            pos += 1
            if line[pos:].lstrip().startswith("}"):
                pos = line.index("}", pos) + 1
            else:
                while True:
                    pair = LABEL_PAIR.match(line, pos)
                    if not pair:
                        raise ValueError(f"{origin}:{lineno}: bad labels in {line!r}")
                    value = LABEL_ESCAPE.sub(lambda e: "\n" if e.group(1) == "n" else e.group(1), pair.group(2))
                    labels.append((pair.group(1), value))
                    pos = pair.end()
                    if pair.group(3) == "}":
                        break
        fields = line[pos:].split()
        if len(fields) not in (1, 2):  # the value and an optional timestamp
            raise ValueError(f"{origin}:{lineno}: bad sample {line!r}")
        samples[tuple(sorted(labels))] = float(fields[0])  # float() reads +Inf, -Inf and NaN
    return samples


def load_scrapes(directory):
    """([start times], [{metric name: {series: value}}]) of the scrapes in directory, in order."""
    names = sorted(n for n in os.listdir(directory) if re.fullmatch(r"\d+\.prom", n))
    if len(names) < 2:
        raise SystemExit(f"{directory}: {len(names)} scrapes; rate() needs at least two")
    times, scrapes = [], []
    for name in names:
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
            samples = parse_exposition(f.read(), path)
        by_name = {}
        for series, value in samples.items():
            by_name.setdefault(dict(series)["__name__"], {})[series] = value
        times.append(int(name[:-5]) / 1000)
        scrapes.append(by_name)
    return times, scrapes


# ---------------------------------------------------------------------------------------------
# PromQL, the subset the dashboard uses

TOKEN = re.compile(r"""\s*(?:
    (?P<range>\[\s*(?:\d+(?:ms|s|m|h|d|w|y))+\s*\])
  | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|[=,(){}+\-*/])
)""", re.VERBOSE)
DURATION_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
AGGREGATIONS = {
    "sum": sum,
    "min": min,
    "max": max,
    "avg": lambda values: sum(values) / len(values),
    "count": len,
}
FUNCTIONS = {"rate", "increase", "histogram_quantile"}
ARITHMETIC = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)),
}


def tokenize(expr):
    tokens, pos = [], 0
    while pos < len(expr.rstrip()):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 30]!r} in {expr!r}")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return tokens


class Parser:
    """Recursive descent into tuples: ("number", v), ("select", name, matchers, range or None),
    ("call", function, args), ("aggregate", op, "by"/"without", labels, expr) and
    ("binary", op, lhs, rhs). `or` binds loosest, then + -, then * /, as in PromQL."""

    def __init__(self, expr):
        self.expr, self.tokens, self.pos = expr, tokenize(expr), 0

    def parse(self):
        node = self.or_expr()
        if self.pos != len(self.tokens):
            self.fail("unexpected")
        return node

    def fail(self, what):
        token = self.tokens[self.pos][1] if self.pos < len(self.tokens) else "end"
        raise ValueError(f"{what} {token!r} in {self.expr!r}")

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def take(self, value=None, kind=None):
        got_kind, got = self.peek()
        if (value is not None and got != value) or (kind is not None and got_kind != kind):
            self.fail(f"expected {value or kind}, got")
        self.pos += 1
        return got

    def binary(self, operand, ops):
        node = operand()
        while self.peek()[1] in ops:
            op = self.take()
            node = ("binary", op, node, operand())
        return node

    def or_expr(self):
        return self.binary(self.additive, {"or"})

    def additive(self):
        return self.binary(self.multiplicative, {"+", "-"})

    def multiplicative(self):
        return self.binary(self.primary, {"*", "/"})

    def primary(self):
        kind, value = self.peek()
        if kind == "number":
            self.pos += 1
            return ("number", float(value))
        if value == "(":
            self.pos += 1
            node = self.or_expr()
            self.take(")")
            return node
        name = self.take(kind="ident")
        if name in AGGREGATIONS:
            return self.aggregation(name)
        if self.peek()[1] == "(":
            if name not in FUNCTIONS:
                raise ValueError(f"function {name}() is not implemented by benches/dashboard.py: {self.expr!r}")
            self.pos += 1
            args = [self.or_expr()]
            while self.peek()[1] == ",":
                self.pos += 1
                args.append(self.or_expr())
            self.take(")")
            return ("call", name, tuple(args))
        return self.selector(name)

    def aggregation(self, op):
        mode, labels = self.grouping()
        self.take("(")
        inner = self.or_expr()
        self.take(")")
        if mode is None:
            mode, labels = self.grouping()
        return ("aggregate", op, mode or "by", labels, inner)

    def grouping(self):
        if self.peek()[1] not in ("by", "without"):
            return None, ()
        mode = self.take()
        self.take("(")
        labels = []
        while self.peek()[1] != ")":
            labels.append(self.take(kind="ident"))
            if self.peek()[1] == ",":
                self.pos += 1
        self.take(")")
        return mode, tuple(labels)

    def selector(self, name):
        matchers = []
        if self.peek()[1] == "{":
            self.pos += 1
            while self.peek()[1] != "}":
                label = self.take(kind="ident")
                op = self.peek()[1]
                if op not in ("=", "!=", "=~", "!~"):
                    self.fail("expected a matcher, got")
                self.pos += 1
                value = LABEL_ESCAPE.sub(lambda e: "\n" if e.group(1) == "n" else e.group(1),
                                         self.take(kind="string")[1:-1])
                matchers.append((label, op, value))
                if self.peek()[1] == ",":
                    self.pos += 1
            self.take("}")
        window = None
        if self.peek()[0] == "range":
            window = sum(int(n) * DURATION_UNIT[unit]
                         for n, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", self.take(kind="range")))
        return ("select", name, tuple(matchers), window)


def without_name(series):
    return tuple(pair for pair in series if pair[0] != "__name__")


class Evaluator:
    """Evaluates parsed queries at scrape i, for one i after another. Results are floats
    (scalars), {series: value} (instant vectors) or {series: [(t, value)]} (range vectors).

    Panels share subqueries (the p50, p90 and p99 panels rate the same buckets), so results are
    kept for the current step; selections are kept while a window can still reach them. Both
    are dropped as the steps move on, so memory follows one window, not the whole run."""

    def __init__(self, times, scrapes):
        self.times, self.scrapes = times, scrapes
        self.step, self.results, self.selected, self.longest_window = None, {}, {}, 0.0
        self.labels = {}  # series -> its labels as a dict, computed once for all scrapes

    def instant(self, node, i):
        """The selector's series in scrape i."""
        key = (node[1], node[2], i)
        if key not in self.selected:
            matchers = [(label, op, re.compile(value) if op in ("=~", "!~") else value)
                        for label, op, value in node[2]]
            selected = {}
            for series, value in self.scrapes[i].get(node[1], {}).items():
                labels = self.labels.get(series) or self.labels.setdefault(series, dict(series))
                if all(matches(labels.get(label, ""), op, value) for label, op, value in matchers):
                    selected[series] = value
            self.selected[key] = selected
        return self.selected[key]

    def eval(self, node, i):
        if i != self.step:
            self.step, self.results = i, {}
            oldest = self.times[i] - self.longest_window
            self.selected = {k: v for k, v in self.selected.items() if self.times[k[2]] > oldest}
        if node not in self.results:
            self.results[node] = self.compute(node, i)
        return self.results[node]

    def compute(self, node, i):
        kind = node[0]
        if kind == "number":
            return node[1]
        if kind == "select":
            if node[3] is None:
                return self.instant(node, i)
            self.longest_window = max(self.longest_window, node[3])
            first = bisect.bisect_right(self.times, self.times[i] - node[3])
            window = {}
            for j in range(first, i + 1):
                for series, value in self.instant(node, j).items():
                    window.setdefault(series, []).append((self.times[j], value))
            return window
        if kind == "call":
            return self.call(node[1], node[2], i)
        if kind == "aggregate":
            return self.aggregate(node, i)
        return self.binary(node[1], self.eval(node[2], i), self.eval(node[3], i))

    def call(self, name, args, i):
        if name in ("rate", "increase"):
            if len(args) != 1 or args[0][0] != "select" or args[0][3] is None:
                raise ValueError(f"{name}() takes one range selector")
            window = args[0][3]
            out = {}
            for series, points in self.eval(args[0], i).items():
                value = extrapolated_delta(points, self.times[i] - window, self.times[i])
                if value is not None:
                    out[without_name(series)] = value / window if name == "rate" else value
            return out
        q, vector = (self.eval(arg, i) for arg in args) if len(args) == 2 else (None, None)
        if not (isinstance(q, float) and isinstance(vector, dict)):
            raise ValueError("histogram_quantile() takes a scalar and an instant vector")
        groups = {}
        for series, count in vector.items():
            labels = dict(series)
            if "le" in labels:
                groups.setdefault(tuple(p for p in without_name(series) if p[0] != "le"), []).append(
                    (float(labels["le"]), count))
        return {series: bucket_quantile(q, buckets) for series, buckets in groups.items()}

    def aggregate(self, node, i):
        _, op, mode, labels, inner = node
        vector = self.eval(inner, i)
        if not isinstance(vector, dict):
            raise ValueError(f"{op}() takes an instant vector")
        groups = {}
        for series, value in vector.items():
            if mode == "by":
                key = tuple(p for p in series if p[0] in labels)
            else:
                key = tuple(p for p in without_name(series) if p[0] not in labels)
            groups.setdefault(key, []).append(value)
        return {key: AGGREGATIONS[op](values) for key, values in groups.items()}

    @staticmethod
    def binary(op, lhs, rhs):
        if op == "or":
            if not (isinstance(lhs, dict) and isinstance(rhs, dict)):
                raise ValueError("`or` takes two vectors")
            return {**{s: v for s, v in rhs.items() if s not in lhs}, **lhs}
        f = ARITHMETIC[op]
        if isinstance(lhs, float) and isinstance(rhs, float):
            return f(lhs, rhs)
        if isinstance(lhs, float):
            return {without_name(s): f(lhs, v) for s, v in rhs.items()}
        if isinstance(rhs, float):
            return {without_name(s): f(v, rhs) for s, v in lhs.items()}
        right = {without_name(s): v for s, v in rhs.items()}
        return {s: f(v, right[s]) for s, v in ((without_name(s), v) for s, v in lhs.items()) if s in right}


def matches(actual, op, expected):
    if op == "=":
        return actual == expected
    if op == "!=":
        return actual != expected
    found = expected.fullmatch(actual) is not None  # PromQL regexes are anchored at both ends
    return found if op == "=~" else not found


def extrapolated_delta(points, range_start, range_end):
    """increase() of a counter as Prometheus computes it (extrapolatedRate in
    promql/functions.go): the change over the samples, a reset counted as a drop to zero,
    extrapolated to the window's edges (by half an average interval where an edge is more than
    1.1 intervals from the nearest sample) but never to before the counter was zero. None
    below two samples."""
    if len(points) < 2:
        return None
    delta = points[-1][1] - points[0][1]
    for (_, previous), (_, current) in zip(points, points[1:]):
        if current < previous:
            delta += previous
    sampled = points[-1][0] - points[0][0]
    average = sampled / (len(points) - 1)
    to_start = points[0][0] - range_start
    to_end = range_end - points[-1][0]
    if to_start >= average * 1.1:
        to_start = average / 2
    if to_end >= average * 1.1:
        to_end = average / 2
    if delta > 0 and points[0][1] >= 0:
        to_start = min(to_start, sampled * points[0][1] / delta)
    return delta * (sampled + to_start + to_end) / sampled


def bucket_quantile(q, buckets):
    """histogram_quantile for one histogram's [(le, cumulative count)], as Prometheus's
    bucketQuantile: linear interpolation inside the bucket the rank falls in, the first bucket
    starting at 0, and the +Inf bucket answered with the highest finite bound."""
    if math.isnan(q):
        return math.nan
    if q < 0 or q > 1:
        return -math.inf if q < 0 else math.inf
    merged = {}
    for le, count in buckets:
        merged[le] = merged.get(le, 0.0) + count
    bounds = sorted(merged)
    if len(bounds) < 2 or bounds[-1] != math.inf:
        return math.nan
    counts, highest = [], 0.0
    for le in bounds:  # rates of cumulative buckets can come out a little non-monotonic
        highest = max(highest, merged[le])
        counts.append(highest)
    if counts[-1] == 0:
        return math.nan
    rank = q * counts[-1]
    b = bisect.bisect_left(counts, rank)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, count = 0.0, counts[b]
    if b > 0:
        start, count, rank = bounds[b - 1], counts[b] - counts[b - 1], rank - counts[b - 1]
    return start + (bounds[b] - start) * rank / count


def substitute(expr, variables):
    """Grafana's template variables: $name, ${name} and ${name:format}. Values are regex
    alternatives, as Grafana formats multi-value variables inside =~ matchers."""
    def value(m):
        name = m.group(1) or m.group(2)
        if name.startswith("__") and name not in variables:
            raise ValueError(f"Grafana variable ${name} is not implemented by benches/dashboard.py")
        values = variables.get(name)
        if not values:
            return ".*"
        escaped = [re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def evaluate_dashboard(panels, evaluator, variables):
    """{panel id: [(legend, [value per scrape])]}, targets in the order Grafana lists them.
    Every query is evaluated at one step before the next step, which is what lets the
    evaluator share and then drop its intermediate results."""
    queries = [(panel["id"], target, Parser(substitute(target["expr"], variables)).parse())
               for panel in panels for target in panel.get("targets", [])
               if target.get("expr") and not target.get("hide")]
    steps = len(evaluator.times)
    series = [{} for _ in queries]
    for i in range(steps):
        for (_, _, node), found in zip(queries, series):
            result = evaluator.eval(node, i)
            for labels, value in ({(): result} if isinstance(result, float) else result).items():
                found.setdefault(labels, [math.nan] * steps)[i] = value
    out = {panel["id"]: [] for panel in panels}
    for (panel_id, target, _), found in zip(queries, series):
        legend = target.get("legendFormat", "")
        out[panel_id].extend((legend_text(legend, dict(labels)), found[labels]) for labels in sorted(found))
    return out


def legend_text(template, labels):
    if template and template != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "value"


# ---------------------------------------------------------------------------------------------
# rendering

BACKGROUND, PANEL, BORDER, TEXT, DIM, GRID = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e99", "#24272c"
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0",
           "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477"]
NAMED_COLORS = {"green": "#73BF69", "red": "#F2495C", "orange": "#FF9830", "yellow": "#FADE2A",
                "blue": "#5794F2", "purple": "#B877D9", "text": TEXT, "transparent": "none"}
WIDTH, COLUMN, ROW, HEADER, FOOTER, GAP, DPI = 1800, 1800 / 24, 30, 64, 30, 4, 100
RATE_UNITS = {"reqps": " req/s", "ops": " ops/s"}


def format_value(value, unit):
    """Grafana's unit formatting, for the units the dashboard uses."""
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if unit == "percentunit":
        return f"{trim(value * 100)}%"
    if unit == "s":
        for scale, suffix in ((1, " s"), (1e-3, " ms"), (1e-6, " µs")):
            if abs(value) >= scale:
                return f"{trim(value / scale)}{suffix}"
        return "0 s" if value == 0 else f"{trim(value / 1e-9)} ns"
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{trim(value / scale)}{suffix.strip() if unit in RATE_UNITS else suffix}{RATE_UNITS.get(unit, '')}"
    return f"{trim(value)}{RATE_UNITS.get(unit, '')}"


def trim(value):
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 0.01 else 4
    return f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:.0f}"


def color(name):
    return NAMED_COLORS.get(name, name)


def threshold_color(value, field):
    steps = field.get("thresholds", {}).get("steps") or [{"color": "green", "value": None}]
    chosen = steps[0]["color"]
    for step in steps:
        if step["value"] is None or (not math.isnan(value) and value >= step["value"]):
            chosen = step["color"]
    return color(chosen)


def render(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    with open(args.dashboard, encoding="utf-8") as f:
        dashboard = json.load(f)
    times, scrapes = load_scrapes(args.scrapes)
    interval = statistics.median(b - a for a, b in zip(times, times[1:]))
    variables = {"__rate_interval": [f"{max(1, round(4 * interval * 1000))}ms"]}
    for assignment in args.var:
        name, _, value = assignment.partition("=")
        variables.setdefault(name, []).append(value)
    when = [datetime.fromtimestamp(t, timezone.utc) for t in times]

    panels = dashboard["panels"]
    evaluated = evaluate_dashboard(panels, Evaluator(times, scrapes), variables)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = HEADER + rows * ROW + FOOTER
    plt.rcParams.update({"font.size": 8, "text.color": TEXT, "axes.labelcolor": DIM,
                         "xtick.color": DIM, "ytick.color": DIM})
    fig = plt.figure(figsize=(WIDTH / DPI, height / DPI), dpi=DPI, facecolor=BACKGROUND)

    def box(x, y, w, h):
        """Figure fractions of a rectangle given in pixels from the top left."""
        return [x / WIDTH, 1 - (y + h) / height, w / WIDTH, h / height]

    def text(x, y, s, **kw):
        fig.text(x / WIDTH, 1 - y / height, s, va="top", **kw)

    selected = "   ".join(f"{v.get('label', v['name'])}: {', '.join(variables.get(v['name'], ['All']))}"
                           for v in dashboard.get("templating", {}).get("list", []) if v["type"] == "query")
    text(GAP, 10, dashboard.get("title", ""), fontsize=15, weight="bold")
    text(GAP, 36, f"{selected}      {when[0]:%Y-%m-%d %H:%M:%S} to {when[-1]:%H:%M:%S} UTC, "
         f"{len(times)} scrapes every {trim(interval)} s, $__rate_interval = {variables['__rate_interval'][0]}",
         fontsize=9, color=DIM)
    text(GAP, height - FOOTER + 10, "Rendered by benches/dashboard.py from real scrapes of a benchmark run's "
         f"/metrics ({len(times)} scrapes, {os.path.basename(os.path.abspath(args.scrapes))}), "
         "with the dashboard's own queries evaluated in Python; not by Grafana.", fontsize=7, color=DIM)

    for panel in panels:
        g = panel["gridPos"]
        x, y, w, h = g["x"] * COLUMN + GAP, HEADER + g["y"] * ROW + GAP, g["w"] * COLUMN - 2 * GAP, g["h"] * ROW - 2 * GAP
        if panel["type"] == "row":
            text(x, y + 4, panel.get("title", ""), fontsize=11, weight="bold")
            continue
        fig.add_artist(Rectangle(box(x, y, w, h)[:2], w / WIDTH, h / height, transform=fig.transFigure,
                                 facecolor=PANEL, edgecolor=BORDER, linewidth=0.8, zorder=-1))
        text(x + 8, y + 7, panel.get("title", ""), fontsize=9.5, weight="bold")
        field = panel.get("fieldConfig", {}).get("defaults", {})
        unit = field.get("unit", "short")
        data = evaluated[panel["id"]]
        present = [(name, values) for name, values in data if any(not math.isnan(v) for v in values)]
        if not present:
            text(x + w / 2, y + h / 2 - 6, "No data", fontsize=11, color=DIM, ha="center")
            continue

        if panel["type"] == "stat":
            name, values = present[0]
            last = next(v for v in reversed(values) if not math.isnan(v))
            shade = threshold_color(last, field)
            spark = fig.add_axes(box(x + 1, y + h * 0.55, w - 2, h * 0.45 - 1))
            spark.fill_between(when, [0 if math.isnan(v) else v for v in values], color=shade, alpha=0.18, linewidth=0)
            spark.plot(when, values, color=shade, linewidth=1)
            spark.set_ylim(bottom=min(0, *[v for v in values if not math.isnan(v)]))
            spark.set_xlim(when[0], when[-1])
            spark.axis("off")
            text(x + w / 2, y + h * 0.3, format_value(last, unit), fontsize=24, weight="bold", color=shade,
                 ha="center")
            continue

        legend_rows = 1 if h < 200 else 2
        top, bottom, left = 26, 22 + legend_rows * 15, 68
        if panel["type"] == "state-timeline":
            left = min(w * 0.35, 12 + 6.2 * max(len(n) for n, _ in present))
        ax = fig.add_axes(box(x + left, y + top, w - left - 12, h - top - bottom))
        ax.set_facecolor(PANEL)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.tick_params(length=0, labelsize=7.5)
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=max(3, int(w // 110))))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
        ax.set_xlim(when[0], when[-1])
        handles = []

        if panel["type"] == "state-timeline":
            mapping = {}
            for m in field.get("mappings", []):
                for raw, shown in m.get("options", {}).items():
                    mapping[float(raw)] = (shown.get("text", raw), color(shown.get("color", TEXT)))
            fits = max(1, int((h - top - bottom) // 16))
            hidden_note = ""
            if len(present) > fits:
                # Grafana would show every row; the picture has room for `fits`, so the rows that
                # ever leave the usual state (an APIService going unavailable) come first.
                usual = statistics.mode(v for _, values in present for v in values if not math.isnan(v))
                present = sorted(present, key=lambda p: all(v == usual or math.isnan(v) for v in p[1]))
                hidden = present[fits - 1:]
                hidden_note = f"+{len(hidden)} more rows"
                if all(v == usual or math.isnan(v) for _, values in hidden for v in values):
                    hidden_note += f", all {mapping.get(usual, (format_value(usual, unit),))[0]}"
                present = present[:fits - 1]
            # A value holds until the next scrape (the last one for a median interval); equal
            # neighbours merge into one bar, as Grafana's mergeValues does.
            edges = mdates.date2num(when + [datetime.fromtimestamp(times[-1] + interval, timezone.utc)])
            for row, (name, values) in enumerate(reversed(present)):
                k = 0
                while k < len(values):
                    end = k + 1
                    while end < len(values) and values[end] == values[k]:
                        end += 1
                    if not math.isnan(values[k]):
                        v = values[k]
                        fill = mapping[v][1] if v in mapping else threshold_color(v, field)
                        ax.barh(row, edges[end] - edges[k], left=edges[k], height=0.85, color=fill, linewidth=0)
                    k = end
            ax.set_yticks(range(len(present)), [n for n, _ in reversed(present)])
            ax.set_ylim(-0.5, len(present) - 0.5)
            handles = [Line2D([], [], color=fill, linewidth=6, label=label) for label, fill in mapping.values()]
            if hidden_note:
                handles.append(Line2D([], [], color="none", label=hidden_note))
        else:
            bars = field.get("custom", {}).get("drawStyle") == "bars"
            step = mdates.date2num(when[1]) - mdates.date2num(when[0])
            for k, (name, values) in enumerate(present):
                shade = PALETTE[k % len(PALETTE)]
                if bars:
                    ax.bar(when, [0 if math.isnan(v) else v for v in values], width=step * 0.8, color=shade,
                           alpha=0.85, linewidth=0)
                else:
                    ax.plot(when, values, color=shade, linewidth=1.2)
                    ax.fill_between(when, values, color=shade, alpha=0.08, linewidth=0)
                handles.append(Line2D([], [], color=shade, linewidth=2.5, label=name))
            if "min" in field:
                ax.set_ylim(bottom=field["min"])
            ax.yaxis.set_major_locator(MaxNLocator(4))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, unit=unit: format_value(v, unit)))
            ax.grid(color=GRID, linewidth=0.8)
            columns = max(1, int(w // 190))
            if len(handles) > columns * legend_rows:
                more = len(handles) - (columns * legend_rows - 1)
                handles = handles[:columns * legend_rows - 1]
                handles.append(Line2D([], [], color="none", label=f"+{more} more"))
        if handles:
            fig.legend(handles=handles, loc="upper left", bbox_to_anchor=box(x + 6, y + h - bottom + 16, 0, 0)[:2],
                       ncol=max(1, int(w // 190)), frameon=False, fontsize=7.5, handlelength=1.2,
                       columnspacing=1.2, borderaxespad=0, labelcolor=TEXT)

    fig.savefig(args.out, facecolor=BACKGROUND)
    print(f"{args.out}: {len(panels)} panels from {len(times)} scrapes", file=sys.stderr)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("scrape", help="save /metrics every --interval seconds")
    s.add_argument("--url", required=True, help="e.g. https://127.0.0.1:8443/metrics")
    s.add_argument("--cacert", required=True, help="CA bundle that verifies the proxy's serving certificate")
    s.add_argument("--cert", help="client certificate (with --key)")
    s.add_argument("--key", help="client certificate's private key")
    s.add_argument("--token", help="bearer token, instead of a client certificate")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes, and each one's timeout")
    s.add_argument("--duration", type=float, default=30.0, help="seconds to scrape for")
    s.add_argument("--out", required=True, help="directory for the scrapes")
    r = commands.add_parser("render", help="draw the dashboard's panels from saved scrapes")
    r.add_argument("--scrapes", required=True, help="directory written by scrape")
    r.add_argument("--dashboard", required=True, help="the dashboard JSON")
    r.add_argument("--out", required=True, help="PNG to write")
    r.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="a template variable's value (repeat for several); unset variables are All")
    args = parser.parse_args()
    if args.command == "scrape":
        if bool(args.cert) != bool(args.key):
            parser.error("--cert and --key go together")
        if args.interval <= 0 or args.duration <= 0:
            parser.error("--interval and --duration must be positive")
        return scrape(args)
    return render(args)


if __name__ == "__main__":
    sys.exit(main())
