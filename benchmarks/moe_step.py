"""One forward step of an MoE model against a dense model with the same active FLOPs, on the CPU, in one process.

    python -m benchmarks.moe_step                       # d1024 x 12, 32 and 512 query tokens, f32 and bf16
    python -m benchmarks.moe_step --tokens 32 --dtypes bfloat16 --repeats 9

Dense: LLaDA, MLP 2816. MoE: LLaDA-MoE, 64 experts, top-8 of width 352 (8 x 352 = 2816: the same active
parameters per token). Each step is the forward of T query tokens (one sequence, no cache) plus the logits of 32
rows, as an engine step computes them. The steps run interleaved (dense, MoE, MoE with the previous CPU path: the
per-expert torch/MKL GEMM loop of engine/model/moe_cpu.py, i.e. its grouped_mm kernel switched off), best of --repeats, timed by the calling thread's CPU time (torch runs on it with
--threads 1) and by the wall clock; the table gives MoE / dense for both MoE implementations.
The grouped kernel is the CPU's best (engine/model/cpu_kernel.py isa()); `UNMASK_CPU_ISA=avx2 python -m
benchmarks.moe_step` runs the AVX2 kernel with its row limit instead, as on an AVX2-only CPU.
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="32,512", help="comma list of query tokens per step")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def _clock() -> tuple[float, float]:
    return time.thread_time(), time.perf_counter()


def time_step(fn: Callable[[], object]) -> tuple[float, float]:
    """-> (thread CPU seconds, wall seconds) of one call."""
    c0, w0 = _clock()
    fn()
    c1, w1 = _clock()
    return c1 - c0, w1 - w0


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm
    from engine.forward_batch import ForwardBatch
    from engine.model.attention import AttnContext
    from engine.loader import load_model
    from engine.random_checkpoint import write_random_checkpoint
    try:
        import engine.model.moe_cpu as moe_cpu_mod
    except ImportError:  # a tree from before the grouped CPU path (run as a script against it): no "previous"
        moe_cpu_mod = None

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    d, inter = args.hidden, args.hidden * 11 // 4
    width = inter // args.top_k
    tmp = Path(tempfile.mkdtemp(prefix="moe_step_"))  # two random checkpoints, ~4 GB: removed at exit
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    common = dict(hidden_size=d, num_layers=args.layers, num_heads=max(1, d // 64), vocab_size=32000,
                  tokenizer=False)
    dense_dir = write_random_checkpoint(tmp / "dense", "llada", intermediate_size=inter, **common)
    moe_dir = write_random_checkpoint(tmp / "moe", "llada_moe", num_experts=args.experts, top_k=args.top_k,
                                      moe_intermediate_size=width, **common)
    kernel = getattr(moe_cpu_mod, "grouped_mm", None)
    print(f"dense MLP {inter}; MoE {args.experts} experts, top-{args.top_k} of width {width}; "
          f"{args.layers} layers, d {d}, {args.threads} thread(s)")
    print("| dtype | query tokens | dense ms | MoE ms | MoE / dense | previous MoE ms | previous / dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        dense, moe = load_model(dense_dir, dtype=dtype), load_model(moe_dir, dtype=dtype)
        for T in (int(t) for t in args.tokens.split(",")):
            ids = torch.randint(0, 31000, (T,))
            pos = torch.arange(T)
            rows = torch.arange(min(T, 32))

            def step(model) -> Callable[[], object]:
                return lambda: model._executor.run(ForwardBatch(ids, pos, AttnContext.from_lengths([T], ids.device),
                                                                    max_pos=T - 1, logit_rows=rows), None)

            def previous() -> object:
                moe_cpu_mod.grouped_mm = lambda *a: None  # moe_cpu falls back to its per-expert loop
                try:
                    return step(moe)()
                finally:
                    moe_cpu_mod.grouped_mm = kernel

            runs = {"dense": step(dense), "moe": step(moe), "previous": previous if kernel else step(moe)}
            best = {k: (float("inf"), float("inf")) for k in runs}
            with torch.inference_mode():
                for fn in runs.values():
                    fn()  # warm-up
                for _ in tqdm(range(args.repeats), desc=f"{dtype} T={T}", file=sys.stderr):
                    for k, fn in runs.items():
                        c, w = time_step(fn)
                        best[k] = (min(best[k][0], c), min(best[k][1], w))
            cpu = {k: v[0] * 1e3 for k, v in best.items()}
            wall = {k: v[1] * 1e3 for k, v in best.items()}
            print(f"| {dtype} | {T} | {cpu['dense']:.1f} | {cpu['moe']:.1f} | {cpu['moe'] / cpu['dense']:.2f}x | "
                  f"{cpu['previous']:.1f} | {cpu['previous'] / cpu['dense']:.2f}x |", flush=True)
            print(f"|   (wall) | {T} | {wall['dense']:.1f} | {wall['moe']:.1f} | {wall['moe'] / wall['dense']:.2f}x | "
                  f"{wall['previous']:.1f} | {wall['previous'] / wall['dense']:.2f}x |", flush=True)
        del dense, moe


if __name__ == "__main__":
    main()
