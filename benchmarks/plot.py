"""Render benchmark result JSON (from benchmarks/serve.py) to PNG with matplotlib.

    python -m benchmarks.plot concurrency R1.json R2.json ... -o throughput_vs_concurrency.png
    python -m benchmarks.plot latency R.json ... -o latency.png
    python -m benchmarks.plot threshold R.json ... -o tokens_per_forward_vs_threshold.png
    python -m benchmarks.plot cache R.json ... -o cache_modes.png

concurrency: output tokens/s (and requests/s) against --max-concurrency, one line per `label` (or per cache mode).
latency:     mean / median / p99 of TTFT, ITL (block interval), TPOT and E2EL, one bar group per result.
threshold:   tokens committed per forward pass and task accuracy against the `threshold` option.
cache:       output tokens/s and mean E2EL for each `cache` option side by side.
llamacpp:    unmask / llama.cpp tokens/s for each row of benchmarks/vs_llamacpp.py --json files (one bar per file
             and row, e.g. before.json after.json), parity at 1.
Each figure's footer names the result files it was drawn from.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths: list[str]) -> list[dict[str, Any]]:
    """One dict per result; a file holding a list (vs_llamacpp rows) gives one per row."""
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data if isinstance(data, list) else [data]:
            r["_path"] = p
            out.append(r)
    return out


def series_name(r: dict[str, Any]) -> str:
    return r.get("label") or f"cache={r.get('options', {}).get('cache', 'default')}"


def tokens_per_forward(r: dict[str, Any]) -> float | None:
    """Per-request mean from the responses' diffusion stats, else the server counters' committed per step."""
    if r.get("mean_tokens_per_forward") is not None:
        return r["mean_tokens_per_forward"]
    return (r.get("diffusion") or {}).get("committed_per_step")


def _cache_order(r: dict[str, Any]) -> tuple[int, int]:
    """none, prefix, dual, then anything else; then by concurrency."""
    cache = r.get("options", {}).get("cache")
    return (["none", "prefix", "dual"].index(cache) if cache in ("none", "prefix", "dual") else 9,
            r.get("max_concurrency") or 0)


def _footer(fig: plt.Figure, results: list[dict[str, Any]]) -> None:
    names = sorted({Path(r["_path"]).name for r in results})
    text = "from: " + ", ".join(names)
    fig.text(0.01, 0.01, text if len(text) < 160 else text[:157] + "...", fontsize=6, color="gray")


def plot_concurrency(results: list[dict[str, Any]], out: str, title: str | None) -> None:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[series_name(r)].append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["max_concurrency"] or 0)
        xs = [r["max_concurrency"] for r in rs]
        ax1.plot(xs, [r["output_throughput"] for r in rs], marker="o", label=name)
        ax2.plot(xs, [r["median_e2el_ms"] / 1000 for r in rs], marker="o", label=name)
    ax1.set(xlabel="concurrent requests (--max-concurrency)", ylabel="output tokens/s", title="throughput")
    ax2.set(xlabel="concurrent requests (--max-concurrency)", ylabel="median end-to-end latency (s)",
            title="latency")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "throughput vs concurrency")
    _footer(fig, results)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=120)


def plot_latency(results: list[dict[str, Any]], out: str, title: str | None) -> None:
    metrics = [("ttft", "TTFT"), ("itl", "ITL (block interval)"), ("tpot", "TPOT"), ("e2el", "E2EL")]
    stats = [("mean", "mean"), ("median", "median"), ("p99", "p99")]
    results = sorted(results, key=_cache_order)
    fig, axes = plt.subplots(1, len(metrics), figsize=(14, 4))
    width = 0.8 / max(len(results), 1)
    for ax, (key, label) in zip(axes, metrics):
        for i, r in enumerate(results):
            vals = [r.get(f"{s}_{key}_ms", 0.0) for s, _ in stats]
            xs = [j + i * width for j in range(len(stats))]
            ax.bar(xs, vals, width=width, label=series_name(r) + f" (c={r.get('max_concurrency')})")
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(stats))], [s for _, s in stats])
        ax.set(title=label, ylabel="ms")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "latency percentiles")
    _footer(fig, results)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=120)


def plot_threshold(results: list[dict[str, Any]], out: str, title: str | None) -> None:
    rs = sorted((r for r in results if r.get("options", {}).get("threshold") is not None),
                key=lambda r: r["options"]["threshold"])
    if not rs:
        raise SystemExit("threshold plot: no result has a threshold option")
    xs = [r["options"]["threshold"] for r in rs]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(xs, [tokens_per_forward(r) for r in rs], marker="o", color="C0", label="tokens per forward")
    ax1.set(xlabel="threshold", ylabel="tokens committed per forward pass")
    ax1.grid(alpha=0.3)
    lines = ax1.get_lines()
    if any(r.get("accuracy") is not None for r in rs):
        ax2 = ax1.twinx()
        ax2.plot(xs, [100 * (r.get("accuracy") or 0) for r in rs], marker="s", color="C1", label="accuracy %")
        ax2.set(ylabel="task accuracy (%)", ylim=(0, 105))
        lines += ax2.get_lines()
    ax1.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="lower left")
    fig.suptitle(title or "parallel decoding: tokens per forward vs threshold")
    _footer(fig, rs)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=120)


def plot_cache(results: list[dict[str, Any]], out: str, title: str | None) -> None:
    rs = sorted(results, key=_cache_order)
    names = [r.get("label") or r.get("options", {}).get("cache", "default") for r in rs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(names, [r["output_throughput"] for r in rs], color="C0")
    ax1.set(ylabel="output tokens/s", title="throughput")
    ax2.bar(names, [r["mean_e2el_ms"] / 1000 for r in rs], color="C2")
    ax2.set(ylabel="mean end-to-end latency (s)", title="latency")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title or "cache modes side by side")
    _footer(fig, rs)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=120)


def plot_llamacpp(results: list[dict[str, Any]], out: str, title: str | None) -> None:
    files = list(dict.fromkeys(r["_path"] for r in results))
    keys = list(dict.fromkeys((r["family"], r["dtype"], r["cache"], r["threads"], r["batch"]) for r in results))
    ratio = {(r["_path"], (r["family"], r["dtype"], r["cache"], r["threads"], r["batch"])): r["ratio"]
             for r in results}
    width = 0.8 / len(files)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(keys) + 2), 4.5))
    for i, f in enumerate(files):
        xs = [k + (i - (len(files) - 1) / 2) * width for k in range(len(keys))]
        ys = [ratio.get((f, key), 0.0) for key in keys]
        bars = ax.bar(xs, ys, width, label=Path(f).stem, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{y:.2f}" if y else "" for y in ys], fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{fam}\n{dt.replace('float32', 'f32').replace('bfloat16', 'bf16')} {cache}"
                        + (f"\nt{t} b{b}" if (t, b) != (1, 1) else "") for fam, dt, cache, t, b in keys], fontsize=8)
    ax.set(ylabel="unmask / llama.cpp (tokens/s)", title=title or "unmask against llama-diffusion-cli on CPU")
    ax.grid(axis="y", alpha=0.3)
    if len(files) > 1:
        ax.legend(fontsize=8)
    _footer(fig, [{"_path": f} for f in files])
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=120)


KINDS = {"concurrency": plot_concurrency, "latency": plot_latency, "threshold": plot_threshold,
         "cache": plot_cache, "llamacpp": plot_llamacpp}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("results", nargs="+", help="result JSON files from benchmarks/serve.py (llamacpp: from vs_llamacpp.py)")
    p.add_argument("-o", "--out", required=True, help="PNG to write")
    p.add_argument("--title")
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    KINDS[args.kind](load(args.results), args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
