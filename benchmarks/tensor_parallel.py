"""Tensor parallelism: TP=1 vs TP=N on the same weights, in one process (rank 0) plus N-1 spawned workers.

    python -m benchmarks.tensor_parallel --random 512x8 --tp 2                 # dense LLaDA-shaped model
    python -m benchmarks.tensor_parallel --random 256x4 --moe 8 --tp 2 --expert-parallel
    python -m benchmarks.tensor_parallel --model /path/to/ckpt --device cuda --dtype bfloat16 --tp 2

For each configuration: one full forward over a batch of canvases (ms, the compute-bound pass), generation
throughput (tok/s) over the same prompts in a cache mode, the speedup over TP=1, the tokens' agreement with
TP=1, and per-rank memory (parameters, resident set). On CPU the threads are split evenly over the ranks
(cores / N each), so TP=N uses the same cores as TP=1: expect no speedup from the arithmetic, only the cost of the
collectives; on GPUs each rank brings its own device and memory.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--random", metavar="DxL", default="512x8", help="random LLaDA model of d_model D and L layers")
    p.add_argument("--moe", type=int, default=0, metavar="E", help="random model: LLaDA-MoE with E experts (top-2)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size to compare with 1")
    p.add_argument("--expert-parallel", action="store_true")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--cache", default="dual")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--memory-only", action="store_true", help="only load and report per-rank memory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    return p.parse_args(argv)


def model_dir(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    from engine.random_checkpoint import write_random_checkpoint
    d, layers = (int(x) for x in args.random.split("x"))
    heads = max(4, d // 64)
    if args.moe:
        return write_random_checkpoint(tmp, "llada_moe", hidden_size=d, num_layers=layers, num_heads=heads,
                                       num_kv_heads=heads, num_experts=args.moe, top_k=2,
                                       moe_intermediate_size=d, vocab_size=args.vocab, seed=0)
    return write_random_checkpoint(tmp, "llada", hidden_size=d, num_layers=layers, num_heads=heads,
                                   num_kv_heads=heads, intermediate_size=4 * d, vocab_size=args.vocab, seed=0)


def measure(llm: LLM, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    if args.memory_only:
        return dict(forward_ms=float("nan"), tok_s=1.0, tokens=None, memory=llm.memory_report())
    canvas = torch.tensor([p + [llm.model.config.mask_id] * args.gen_len for p in prompts])  # [B, L]
    llm.model.logits(canvas[:1])  # warm-up
    fwd = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        llm.model.logits(canvas)
        fwd.append(time.perf_counter() - t)
    params = SamplingParams(max_tokens=args.gen_len, block_length=args.block_length, steps=args.gen_len,
                            temperature=0.0, cache=args.cache, ignore_eos=True, seed=0)
    gen, outs = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        gen.append(time.perf_counter() - t)
    tokens = sum(len(o.token_ids) for o in outs)
    return dict(forward_ms=1e3 * min(fwd), tok_s=tokens / min(gen), tokens=[o.token_ids for o in outs],
                memory=llm.memory_report())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args, Path(tmp))
        rng = random.Random(0)
        opts = dict(device=args.device, dtype=args.dtype, kv_cache_memory=1 << 28)
        one = LLM(path, **opts)
        vocab = one.model.config.vocab_size
        prompts = [[rng.randrange(vocab - 8) for _ in range(args.prompt_len)] for _ in range(args.batch_size)]
        threads = torch.get_num_threads()
        per_rank = max(1, threads // args.tp) if args.device == "cpu" else threads
        rows = []
        for t in sorted({threads, per_rank}, reverse=True):  # TP=1 with all the cores, and with one rank's share
            torch.set_num_threads(t)
            rows.append((f"TP=1, {t} thread{'s' * (t > 1)}", measure(one, args, prompts)))
        torch.set_num_threads(threads)
        del one
        label = f"TP={args.tp}{' EP' if args.expert_parallel else ''}, {per_rank} thread{'s' * (per_rank > 1)}/rank"
        with LLM(path, tensor_parallel_size=args.tp, expert_parallel=args.expert_parallel, **opts) as tp:
            rows.append((label, measure(tp, args, prompts)))
    base = max((r for _, r in rows[:-1]), key=lambda r: r["tok_s"])
    print(f"model: {args.model or ('llada_moe ' if args.moe else 'llada ') + args.random}, {args.device} "
          f"{args.dtype}, batch {args.batch_size} x (prompt {args.prompt_len} + gen {args.gen_len}), "
          f"cache {args.cache}; speedup vs the faster TP=1 row")
    print(f"| config | full forward (ms) | generate (tok/s) | speedup (tok/s) | same tokens | "
          f"params per rank (MB) | RSS per rank (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        mb = lambda k: " / ".join(f"{m[k] / 2**20:.1f}" for m in r["memory"])  # noqa: E731
        print(f"| {name} | {r['forward_ms']:.1f} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x | "
              f"{r['tokens'] == base['tokens']} | {mb('param_bytes')} | {mb('rss_bytes')} |")


if __name__ == "__main__":
    main()
