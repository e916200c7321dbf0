#!/usr/bin/env python3
"""Turns scripts/bench-redis.sh's results.csv into a Markdown table (medians over rounds, with the
ratios the targets are stated in) and an SVG plot of throughput and p50/p99 latency.

Usage: bench-redis-report.py RESULTS_CSV SUMMARY_MD PLOT_SVG (PIPELINE=N in the environment picks the
targets for that pipelining; default 1)
"""

import csv
import os
import statistics
import sys
from collections import defaultdict
from html import escape

SYSTEMS = ["redis-none", "redis-always", "grex-1", "grex-3", "grex-3c", "grex-3r"]
LABELS = {
    "redis-none": "Redis, no persistence",
    "redis-always": "Redis, appendfsync always",
    "grex-1": "Grex, 1 node (durable)",
    "grex-3": "Grex, 3 nodes RF=3",
    "grex-3c": "Grex, 3 nodes RF=3, cluster client",
    "grex-3r": "Grex, 3 nodes RF=3, grex bench (every flock)",
}
COLOURS = {"redis-none": "#bbbbbb", "redis-always": "#777777", "grex-1": "#2b8cbe", "grex-3": "#08519c", "grex-3c": "#41ab5d", "grex-3r": "#006d2c"}
TESTS = ["counter EVAL", "counter FCALL", "HSET", "HGET"]
# (Grex system, Redis system, Redis test, target ratio at pipelining 1, at pipelining 16): Grex's
# counter job against Redis's Lua HINCRBY. The cluster-aware target counts the row whose keys spread
# over every flock (grex-3r); redis-benchmark --cluster (grex-3c) puts each client's keys in one flock.
TARGETS = [
    ("grex-1", "redis-always", "counter EVAL", 1.0, None),
    ("grex-1", "redis-none", "counter EVAL", None, 1.0),
    ("grex-3", "redis-always", "counter EVAL", 0.35, 0.35),
    ("grex-3r", "redis-always", "counter EVAL", 0.5, 1.0),
    ("grex-3c", "redis-always", "counter EVAL", None, None),
]
PIPELINE = int(os.environ.get("PIPELINE", "1"))


def load(path):
    runs = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            runs[(row["system"], row["test"])].append(
                (float(row["rps"]), float(row["p50_ms"]), float(row["p99_ms"]))
            )
    medians = {}
    for key, values in runs.items():
        medians[key] = tuple(statistics.median(v[i] for v in values) for i in range(3)) + (len(values),)
    return medians


def summary(medians):
    lines = [
        "| test | system | requests/s | p50 ms | p99 ms | rounds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for test in TESTS:
        for system in SYSTEMS:
            if (system, test) in medians:
                rps, p50, p99, n = medians[(system, test)]
                lines.append(f"| {test} | {LABELS[system]} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {n} |")
    lines += ["", "| Grex | against | ratio of requests/s | target |", "|---|---|---:|---:|"]
    for grex, redis, redis_test, *targets in TARGETS:
        g, r = medians.get((grex, "counter FCALL")), medians.get((redis, redis_test))
        target = targets[0] if PIPELINE == 1 else targets[1] if PIPELINE == 16 else None
        if g and r:
            ratio = g[0] / r[0]
            verdict = "-" if target is None else f">= {target:g}x ({'met' if ratio >= target else 'not met'})"
            lines.append(f"| {LABELS[grex]}, counter | {LABELS[redis]}, {redis_test} | {ratio:.2f}x | {verdict} |")
    for test in ["HSET", "HGET"]:
        for grex in ["grex-1", "grex-3", "grex-3c"]:  # grex bench runs the counter job only
            for redis in ["redis-always", "redis-none"]:
                g, r = medians.get((grex, test)), medians.get((redis, test))
                if g and r:
                    lines.append(f"| {LABELS[grex]}, {test} | {LABELS[redis]}, {test} | {g[0] / r[0]:.2f}x | - |")
    return "\n".join(lines) + "\n"


def plot(medians):
    panels = [("requests/s", 0, "{:,.0f}"), ("p50 latency, ms", 1, "{:.2f}"), ("p99 latency, ms", 2, "{:.2f}")]
    bar, gap, label_w, panel_w, top = 14, 10, 120, 260, 40
    rows = [(test, s) for test in TESTS for s in SYSTEMS if (s, test) in medians]
    groups = [t for t in TESTS if any((s, t) in medians for s in SYSTEMS)]
    height = top + len(rows) * bar + len(groups) * gap + 70
    width = label_w + len(panels) * (panel_w + 30) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for p, (title, index, fmt) in enumerate(panels):
        x0 = label_w + p * (panel_w + 30)
        out.append(f'<text x="{x0}" y="20" font-weight="bold">{escape(title)}</text>')
        top_value = max(medians[r][index] for r in ((s, t) for t, s in rows)) or 1
        y = top
        for test in groups:
            if p == 0:
                out.append(f'<text x="4" y="{y + 11}" font-weight="bold">{escape(test)}</text>')
            for system in SYSTEMS:
                if (system, test) not in medians:
                    continue
                value = medians[(system, test)][index]
                w = max(1, value / top_value * (panel_w - 60))
                out.append(f'<rect x="{x0}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{COLOURS[system]}"/>')
                out.append(f'<text x="{x0 + w + 3:.1f}" y="{y + 10}">{fmt.format(value)}</text>')
                y += bar
            y += gap
    y = height - 40
    for i, system in enumerate(SYSTEMS):
        x = 4 + i * 190
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{COLOURS[system]}"/>')
        out.append(f'<text x="{x + 16}" y="{y + 10}">{escape(LABELS[system])}</text>')
    out.append(
        f'<text x="4" y="{height - 10}">redis-benchmark, 50 clients, random keys; medians over rounds; '
        "counter = Grex wasm job (FCALL) / Redis Lua HINCRBY (EVAL, FCALL)</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    medians = load(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        f.write(summary(medians))
    with open(sys.argv[3], "w") as f:
        f.write(plot(medians))


if __name__ == "__main__":
    main()
