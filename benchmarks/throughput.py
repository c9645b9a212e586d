"""Offline throughput: the published LLaDA loop vs each engine mode, in one process on the same weights.

    python -m benchmarks.throughput --random 512x8 --prompt-len 128 --gen-len 256 --block-length 32 --steps 256
    python -m benchmarks.throughput                      # the bundled trained model, with task accuracy

Prints one table: mode, tok/s, forward passes, tokens per forward, speedup over the reference, accuracy (trained
model), peak memory. Tokens counted are generated tokens before the first EOS (all of them for random models,
which run with ignore_eos so every mode does the same work).

Continuous batching (--concurrency N): N requests with prompts of different lengths (random model: spread evenly
over [prompt-len / 2, 3 * prompt-len / 2]) go through the AsyncEngine all at once, then the same N requests one
after another, in the same process on the same weights; prints tok/s of both, the ratio and peak memory.

    python -m benchmarks.throughput --random 256x4 --concurrency 16 --prompt-len 64 --gen-len 64 \
        --block-length 16 --cache dual
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.memory import PeakMemory, rss_bytes
from benchmarks.reference_loop import reference_generate
from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.kv_pool import kv_bytes_per_token
from engine.llm import read_generation_config
from engine.loader import read_config, resolve_dtype
from engine.sampling_params import model_defaults
from engine.outputs import cut_at_stop_token


@dataclass
class Row:
    mode: str
    seconds: float
    tokens: int
    forwards: int
    tokens_per_forward: float
    accuracy: float | None
    peak_mb: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the bundled trained model)")
    p.add_argument("--random", metavar="DxL", help="random LLaDA model of d_model D and L layers, e.g. 512x8")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the random model")
    p.add_argument("--prompt-len", type=int, default=128, help="random model: prompt length")
    p.add_argument("--gen-len", type=int, help="generation length (default: model default)")
    p.add_argument("--block-length", type=int, help="block length (default: model default)")
    p.add_argument("--steps", type=int, help="steps (default: gen length)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-prompts", type=int, help="prompts in all (default: batch size; trained model: 200)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--factor", type=float, default=1.0)
    p.add_argument("--modes", default="reference,none,prefix,dual,prefix+threshold,dual+threshold,dual+factor")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=0, metavar="N",
                   help="continuous batching: N concurrent requests (prompts of different lengths) vs one at a time")
    p.add_argument("--cache", default="dual", metavar="MODE",
                   help="engine mode for --concurrency, as in --modes (none, prefix, dual, dual+threshold, ...)")
    args = p.parse_args(argv)
    if args.concurrency < 0:
        p.error("--concurrency must be >= 1")
    if args.concurrency and args.cache == "reference":
        p.error("--cache: the reference loop has no engine; pick an engine mode")
    return args


def engine_params(mode: str, args: argparse.Namespace, ignore_eos: bool) -> SamplingParams:
    cache = mode.split("+")[0]
    extra = {}
    if mode.endswith("+threshold"):
        extra["threshold"] = args.threshold
    if mode.endswith("+factor"):
        extra["factor"] = args.factor
    return SamplingParams(max_tokens=args.gen_len, block_length=args.block_length, steps=args.steps,
                          temperature=0.0, cache=cache, ignore_eos=ignore_eos, **extra)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_reference(llm: LLM, prompts: list[list[int]], args: argparse.Namespace) -> tuple[list[list[int]], int]:
    outs, forwards = [], 0
    bar = tqdm(total=len(prompts) // args.batch_size * args.steps, desc="reference", unit="step", file=sys.stderr)
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i:i + args.batch_size]
        outs += reference_generate(llm.model, chunk, args.gen_len, args.block_length, args.steps,
                                   on_step=bar.update)
        forwards += args.steps
    bar.close()
    return outs, forwards


def run_engine(llm: LLM, prompts: list[list[int]], params: SamplingParams, label: str) -> tuple[list, int]:
    eng = llm.engine
    resolved = params.resolve(llm.defaults)
    ids = [eng.add_request(f"{label}-{i}", p, resolved).request_id for i, p in enumerate(prompts)]
    bar = tqdm(total=len(prompts) * resolved.max_tokens, desc=label, unit="tok", file=sys.stderr)
    done, forwards = {}, 0
    while eng.has_unfinished():
        finished = eng.step()
        forwards += 1
        for out in finished:
            done[out.request_id] = out
            bar.update(resolved.max_tokens)
    bar.close()
    return [done[i] for i in ids], forwards


@dataclass
class ConcurrencyRow:
    run: str
    seconds: float
    tokens: int
    steps: int
    mean_latency: float
    peak_mb: float


async def _serve(llm: LLM, prompts: list[list[int]], params: SamplingParams, concurrent: bool,
                 ) -> tuple[list, list[float], int]:
    """The requests through one AsyncEngine: all at once, or each awaited before the next is sent."""
    async with AsyncEngine(llm) as eng:
        async def one(p: list[int]) -> tuple:
            t0 = time.perf_counter()
            out = await eng.generate(p, params)
            return out, time.perf_counter() - t0

        if concurrent:
            res = await asyncio.gather(*(one(p) for p in prompts))
        else:
            res = [await one(p) for p in prompts]
        steps = eng.stats.steps
    return [r[0] for r in res], [r[1] for r in res], steps


def run_concurrency(llm: LLM, prompts: list[list[int]], args: argparse.Namespace, ignore_eos: bool,
                    score) -> None:
    device = llm.model.device
    params = engine_params(args.cache, args, ignore_eos)
    asyncio.run(_serve(llm, prompts[:1], params, False))  # warm-up
    rows, tokens_of = [], {}
    for run, concurrent in (("one at a time", False), (f"{len(prompts)} concurrent", True)):
        sync(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            outs, latencies, steps = asyncio.run(_serve(llm, prompts, params, concurrent))
            sync(device)
            seconds = time.perf_counter() - t0
        tokens_of[run] = [o.token_ids for o in outs]
        tokens, _ = score(tokens_of[run])
        rows.append(ConcurrencyRow(run, seconds, tokens, steps, sum(latencies) / len(latencies), mem.peak / 2**20))
    same = sum(a == b for a, b in zip(*tokens_of.values()))
    print()
    print("| run | requests | tok/s | seconds | engine steps | mean submit-to-final s | peak memory MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.run} | {len(prompts)} | {r.tokens / r.seconds:.1f} | {r.seconds:.2f} | {r.steps} | "
              f"{r.mean_latency:.2f} | {r.peak_mb:.0f} |")
    seq, conc = rows
    print(f"\nconcurrent / one at a time: {(conc.tokens / conc.seconds) / (seq.tokens / seq.seconds):.2f}x tok/s; "
          f"identical outputs {same}/{len(prompts)}")
    sys.stdout.flush()


def _bundled() -> Path:
    from engine.bundled import DEFAULT_MODEL_DIR
    return DEFAULT_MODEL_DIR


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    task = None
    if args.random:
        from engine.random_checkpoint import write_random_checkpoint
        d, n_layers = (int(v) for v in args.random.lower().split("x"))
        tmp = Path(tempfile.mkdtemp(prefix="unmask-throughput-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the random checkpoint goes at exit
        model_dir = write_random_checkpoint(tmp / "random", "llada", hidden_size=d,
                                            num_layers=n_layers, num_heads=max(d // 64, 1),
                                            intermediate_size=d * 8 // 3 // 64 * 64, vocab_size=args.vocab,
                                            tokenizer=False, seed=args.seed)
    else:
        model_dir = args.model
        if args.model is None:
            from engine.bundled import task as task_module
            task = task_module
    if args.concurrency:
        args.batch_size = args.num_prompts = args.concurrency
    n = args.num_prompts or (args.batch_size if task is None else 200)
    model_path = Path(model_dir) if model_dir else _bundled()
    model_cfg = read_config(model_path)
    defaults = model_defaults(model_cfg.family, read_generation_config(model_path))
    args.gen_len = args.gen_len or defaults.max_tokens
    # a pool sized to the batch's canvases (prompts up to 256 tokens for the task model)
    max_prompt = args.prompt_len * 3 // 2 if args.concurrency else args.prompt_len
    canvas = (max_prompt if task is None else 256) + args.gen_len
    kv_bytes = kv_bytes_per_token(model_cfg, resolve_dtype(dtype))
    llm = LLM(model_dir, device=device, dtype=dtype, max_num_seqs=args.batch_size, max_num_batched_tokens=1 << 30,
              kv_cache_memory=kv_bytes * (canvas + 32) * args.batch_size + kv_bytes * 64)
    args.block_length = min(args.block_length or llm.defaults.block_length, args.gen_len)
    args.steps = args.steps or args.gen_len
    rng = random.Random(args.seed)
    cfg = llm.model.config
    if task is None:
        banned = {cfg.mask_id, *cfg.stop_ids}
        vocab = [t for t in range(cfg.vocab_size) if t not in banned]
        if args.concurrency:  # different lengths, spread evenly around prompt-len
            lengths = [max(1, args.prompt_len // 2 + (args.prompt_len * i) // max(n - 1, 1)) for i in range(n)]
            rng.shuffle(lengths)
        else:
            lengths = [args.prompt_len] * n
        prompts = [[rng.choice(vocab) for _ in range(length)] for length in lengths]
        questions = None
    else:
        questions = [q for q, _ in task.make_problems(n, seed=1234, split="held_out")]
        prompts = [llm.model.apply_chat_template(task.messages_for(q)) for q in questions]
    ignore_eos = task is None

    weights_mb = sum(p.numel() * p.element_size() for p in llm.model.net.parameters()) / 2**20
    kv_mb = llm.engine.allocator.num_pages * llm.engine.allocator.page_size * kv_bytes_per_token(
        cfg, llm.model.dtype) / 2**20
    print(f"# model: {model_path} ({cfg.family}, d={cfg.hidden_size}, layers={cfg.num_layers}, vocab={cfg.vocab_size}, "
          f"weights {weights_mb:.1f} MB), device {device}, dtype {dtype}, threads {torch.get_num_threads()}")
    print(f"# prompts {n} (mean length {sum(map(len, prompts)) / n:.0f}), batch {args.batch_size}, gen {args.gen_len}, "
          f"block {args.block_length}, steps {args.steps}, threshold {args.threshold}, factor {args.factor}; "
          f"KV pool {kv_mb:.0f} MB; baseline RSS {rss_bytes() / 2**20:.0f} MB")

    def score(token_lists: list[list[int]]) -> tuple[int, float | None]:
        cut = [cut_at_stop_token(t, cfg.stop_ids)[0] if not ignore_eos else t for t in token_lists]
        tokens = sum(len(c) for c in cut)
        if questions is None:
            return tokens, None
        texts = [llm.model.decode(c) for c in cut]
        return tokens, sum(task.check(q, t) for q, t in zip(questions, texts)) / len(questions)

    if args.concurrency:
        print(f"# continuous batching: mode {args.cache}, prompt lengths {min(map(len, prompts))}.."
              f"{max(map(len, prompts))}")
        run_concurrency(llm, prompts, args, ignore_eos, score)
        return

    rows: list[Row] = []
    for mode in args.modes.split(","):
        warm, blk = prompts[:1], args.block_length  # warm up on one short block
        if mode == "reference":
            reference_generate(llm.model, warm, blk, blk, blk)
        else:
            wp = engine_params(mode, args, ignore_eos)
            wp.max_tokens = wp.block_length = wp.steps = blk
            run_engine(llm, warm, wp, f"warmup-{mode}")
        sync(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            if mode == "reference":
                outs, forwards = run_reference(llm, prompts, args)
                token_lists, tpf = outs, args.gen_len / args.steps
            else:
                res, forwards = run_engine(llm, prompts, engine_params(mode, args, ignore_eos), mode)
                token_lists = [r.token_ids for r in res]
                tpf = sum(r.stats.tokens_per_forward for r in res) / len(res)
            sync(device)
            seconds = time.perf_counter() - t0
        tokens, acc = score(token_lists)
        rows.append(Row(mode, seconds, tokens, forwards, tpf, acc, mem.peak / 2**20))

    base = next((r for r in rows if r.mode == "reference"), rows[0])
    print()
    print("| mode | tok/s | forward passes | tokens/forward | speedup | accuracy | peak memory MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        tps = r.tokens / r.seconds
        print(f"| {r.mode} | {tps:.1f} | {r.forwards} | {r.tokens_per_forward:.2f} | "
              f"{tps / (base.tokens / base.seconds):.2f}x | {acc} | {r.peak_mb:.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
