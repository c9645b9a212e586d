"""Cost of bounding GEMM row counts: padded buckets (engine/shape_buckets.py) vs fixed row tiles vs the exact M.

    python -m benchmarks.shape_buckets --dtype float32 --hidden 1024 --inter 2816 --out benchmarks/results/shape_buckets.md

For each packed token count M, one model-shaped Linear pair (up [D -> I] and down [I -> D]) is timed as
- exact: one GEMM at M rows (unbounded shapes: today's oneDNN bf16 cache growth),
- bucket: one GEMM at row_bucket(M) rows (the engine's choice),
- tile T: ceil(M / T) GEMMs of exactly T rows each (one shape whatever the batch: batch-invariant by construction
  on any GEMM library, at the price of re-reading the weights once per tile and padding small batches to T).
Modes run interleaved, repeated, in one process; each time is the median, reported as a ratio to `exact`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.shape_buckets import row_bucket


def linear_tiles(x: torch.Tensor, w: torch.Tensor, tile: int) -> torch.Tensor:
    """x [M, K] @ w[N, K].T as GEMMs of exactly `tile` rows (the last one zero-padded)."""
    m = x.shape[0]
    padded = F.pad(x, (0, 0, 0, -(-m // tile) * tile - m))
    return torch.cat([F.linear(padded[a:a + tile], w) for a in range(0, padded.shape[0], tile)])[:m]


def run(dtype: torch.dtype, hidden: int, inter: int, ms: list[int], tiles: list[int], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    up = torch.randn(inter, hidden).to(dtype)
    down = torch.randn(hidden, inter).to(dtype)

    def pair(x: torch.Tensor, fn) -> None:
        h = fn(x, up)
        fn(h, down)

    modes = {"exact": lambda x, w: F.linear(x, w),
             "bucket": lambda x, w: F.linear(F.pad(x, (0, 0, 0, row_bucket(x.shape[0]) - x.shape[0])), w)[:x.shape[0]]}
    for t in tiles:
        modes[f"tile {t}"] = lambda x, w, t=t: linear_tiles(x, w, t)
    rows = []
    with torch.inference_mode():
        for m in ms:
            x = torch.randn(m, hidden).to(dtype)
            times: dict[str, list[float]] = {k: [] for k in modes}
            for fn in modes.values():  # warm up every shape
                pair(x, fn)
            for _ in range(repeats):
                for name, fn in modes.items():
                    t0 = time.perf_counter()
                    pair(x, fn)
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"M": m, "bucket_rows": row_bucket(m), "exact_ms": round(1e3 * med["exact"], 3),
                         **{k: round(med[k] / med["exact"], 3) for k in modes if k != "exact"}})
            print(rows[-1], file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--m", default="1,17,33,70,130,200,530,1100,2100", help="packed token counts")
    ap.add_argument("--tiles", default="16,64,256")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="append a markdown table here (and write .json beside it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.m.split(",")]
    tiles = [int(v) for v in args.tiles.split(",") if v]
    rows = run(getattr(torch, args.dtype), args.hidden, args.inter, ms, tiles, args.repeats)
    cols = [k for k in rows[0] if k not in ("M", "bucket_rows", "exact_ms")]
    table = ["| M | bucket rows | exact ms | " + " | ".join(f"{c} / exact" for c in cols) + " |",
             "|---" * (3 + len(cols)) + "|"]
    table += [f"| {r['M']} | {r['bucket_rows']} | {r['exact_ms']} | " + " | ".join(str(r[c]) for c in cols) + " |"
              for r in rows]
    text = (f"\n### {args.dtype}, Linear pair {args.hidden} -> {args.inter} -> {args.hidden}, "
            f"{torch.get_num_threads()} threads\n\nCommand: `python -m benchmarks.shape_buckets "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n" + "\n".join(table) + "\n")
    print(text)
    if args.out:
        out = Path(args.out)
        with out.open("a") as f:
            f.write(text)
        js = out.with_suffix(".json")
        prev = json.loads(js.read_text()) if js.exists() else []
        js.write_text(json.dumps(prev + [{"args": vars(args), "rows": rows}], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
