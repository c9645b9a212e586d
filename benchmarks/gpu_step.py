"""End-to-end decode steps of an LLaDA-8B-shaped random model on a CUDA device, against the step's floor.

    python -m benchmarks.gpu_step --out benchmarks/results/gpu_step.md     # on a GPU: d4096 x 32, bf16
    python -m benchmarks.gpu_step --smoke                                   # tiny shape on the CPU (checks the script)

The model has LLaDA-8B's shape (d_model 4096, 32 layers, 32 heads, MLP 12288, vocabulary 126464: 8.0 B
parameters, 16 GB in bf16). Its weights are drawn on the device (writing and reading 16 GB of safetensors would
cost minutes of a scarce device lease); everything else is the engine as users run it: `LLM.engine`'s
add_request / step loop with the scheduler, the runner, the decoders and the kernels backend named by --kernels.
Each (backend, cache mode, batch) runs once untimed (compiles, CUDA-graph capture) and then --repeats times
timed; a step is one `engine.step()` (one forward of every running row plus its decode), timed by the wall clock
around the whole loop after a device synchronize, divided by the number of steps.

The floor of a step is max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both ceilings measured in the same
process on the same card (benchmarks/kernels/common.py). Bytes: every weight but the embedding once (the
embedding reads only the looked-up rows), plus the cached K/V read by block passes. FLOPs: 2 x body parameters x
query tokens, plus attention (4 x queries x keys x d_model per layer), plus the head over the decoded block's
rows. Prompt 64 + generation 64 tokens, block 32, one token per step (steps = 64): the no-cache step runs all 128
positions of every row; the dual-cache step runs the 32 block positions against 128 cached keys (and every 32nd
step is the block's full refresh).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int


LLADA_8B = Shape(hidden=4096, layers=32, heads=32, mlp=12288, vocab=126464)
SMOKE = Shape(hidden=128, layers=2, heads=4, mlp=352, vocab=1024)


@dataclass
class Row:
    kernels: str
    cache: str
    batch: int
    steps: int
    ms_per_step: float
    floor_ms: float
    bytes_gb: float
    tflop: float
    tokens_per_s: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shape, CPU allowed (checks the script)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--caches", default="none,dual")
    p.add_argument("--kernels", default="triton,torch", help="comma list of kernels backends")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--profile", help="append a torch.profiler table of one extra run per setting to this file")
    p.add_argument("--out", help="write the markdown table here (and the rows as JSON beside it)")
    return p.parse_args(argv)


def config_only_checkpoint(shape: Shape, dtype: str) -> Path:
    """A checkpoint directory with LLaDA's config.json and generation_config.json and no weights."""
    from engine.random_checkpoint import write_random_checkpoint
    return write_random_checkpoint(Path(tempfile.mkdtemp(prefix="gpu_step_")) / "llada8b", "llada",
                                   hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
                                   intermediate_size=shape.mlp, vocab_size=shape.vocab, tokenizer=False, dtype=dtype,
                                   weights=False)


def random_network(model_dir: Path, device: torch.device, dtype: torch.dtype):
    """The Transformer of model_dir's config with weights drawn on `device` (norm weights 1, matrices
    N(0, 1/fan_in)), with the loader's projection fusion applied."""
    from engine.loader import read_config
    from engine.model.fuse import fuse_projections
    from engine.model.parallel import SINGLE
    from engine.model.transformer import Transformer
    cfg = read_config(model_dir)
    with torch.device("meta"):
        net = Transformer(cfg, SINGLE)
    net = net.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    net.rotary.reset()
    net = net.eval().requires_grad_(False)
    fuse_projections(net)
    return net, cfg


def make_llm(net, cfg, model_dir: Path, device: torch.device, dtype: torch.dtype, kernels: str, max_seqs: int,
             canvas: int):
    """An LLM whose load_model returns the drawn network with the named kernels backend."""
    import engine.llm as llm_mod
    from engine.kv_pool import kv_bytes_per_token
    from engine.loaded_model import DiffusionModel
    from kernels.dispatch import resolve_kernels
    backend = resolve_kernels(kernels, device)
    saved = llm_mod.load_model
    llm_mod.load_model = lambda *a, **k: DiffusionModel(net, cfg, None, device, dtype, model_dir, kernels=backend)
    try:
        kv = kv_bytes_per_token(cfg, dtype) * (canvas + 64) * max_seqs + (64 << 20)
        return llm_mod.LLM(model_dir, device=device, dtype=dtype, max_num_seqs=max_seqs,
                           max_num_batched_tokens=1 << 30, kv_cache_memory=kv, kernels=kernels)
    finally:
        llm_mod.load_model = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(llm, prompts: list[list[int]], params, label: str) -> tuple[float, int]:
    """(seconds, engine steps) of generating all prompts in one batch."""
    eng = llm.engine
    resolved = params.resolve(llm.defaults)
    sync(llm.model.device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"{label}-{i}", p, resolved)
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    sync(llm.model.device)
    return time.perf_counter() - t0, steps


def profile(llm, prompts: list[list[int]], params, label: str, path: str) -> None:
    """One more run under torch.profiler; its top operators by device (else CPU) time appended to `path`."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = llm.model.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        run_loop(llm, prompts, params, label + "-prof")
    key = "cuda_time_total" if cuda else "cpu_time_total"
    with open(path, "a") as f:
        f.write(f"### {label}\n\n{prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)}\n")


def floor(shape: Shape, n_params: int, batch: int, cache: str, args: argparse.Namespace, elem: int,
          gbps: float, tflops: float) -> tuple[float, float, float]:
    """(floor ms, GB moved, TFLOP) of the mean step of a generation (see the module docstring)."""
    d, L = shape.hidden, shape.layers
    body = n_params - 2 * shape.vocab * d  # without embedding and head
    head = shape.vocab * d
    canvas = args.prompt_len + args.gen_len
    steps_per_block = args.block_length  # one token per step
    if cache == "none":
        q_tokens, keys, kv_read = canvas, canvas, 0.0
    else:  # block passes: block_length queries against the canvas' keys; one refresh (the whole canvas) a block
        refresh = 1 / steps_per_block
        q_tokens = refresh * canvas + (1 - refresh) * args.block_length
        keys = canvas
        kv_read = (1 - refresh) * L * 2 * canvas * d * elem * batch
    flops = batch * (2 * body * q_tokens + 4 * q_tokens * keys * d * L + 2 * head * args.block_length)
    nbytes = (body + head) * elem + kv_read
    ms = max(nbytes / (gbps * 1e9), flops / (tflops * 1e12)) * 1e3
    return ms, nbytes / 1e9, flops / 1e12


def main(argv: list[str] | None = None) -> int:
    from benchmarks.kernels.common import device as pick_device, device_name, measure_ceilings
    from engine import SamplingParams
    args = parse_args(argv)
    dev = pick_device()
    if dev.type != "cuda" and not args.smoke:
        print("gpu_step: no CUDA device (use --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    shape = SMOKE if args.smoke else LLADA_8B
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    ceil = measure_ceilings(dev, args.smoke)
    print(f"# {device_name(dev)}: bf16 matmul {ceil.tflops:.0f} TFLOP/s, copy {ceil.gbps:.0f} GB/s", flush=True)
    model_dir = config_only_checkpoint(shape, args.dtype)
    t = time.perf_counter()
    net, cfg = random_network(model_dir, dev, dtype)
    sync(dev)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"# LLaDA shape {asdict(shape)}: {n_params / 1e9:.2f} B parameters, drawn in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rng = random.Random(0)
    banned = {cfg.mask_id, *cfg.stop_ids}
    vocab = [i for i in range(min(cfg.vocab_size, 30000)) if i not in banned]
    prompts = [[rng.choice(vocab) for _ in range(args.prompt_len)] for _ in range(max(batches))]
    canvas = args.prompt_len + args.gen_len
    rows: list[Row] = []
    failures: list[str] = []
    elem = torch.empty((), dtype=dtype).element_size()
    for kernels in args.kernels.split(","):
        try:
            llm = make_llm(net, cfg, model_dir, dev, dtype, kernels, max(batches), canvas)
        except Exception as e:  # one backend failing must not lose the other's numbers
            traceback.print_exc()
            failures.append(f"{kernels}: LLM construction failed: {type(e).__name__}: {e}")
            print(failures[-1], flush=True)
            continue
        for cache in args.caches.split(","):
            params = SamplingParams(max_tokens=args.gen_len, steps=args.gen_len, block_length=args.block_length,
                                    temperature=0.0, cache=cache, ignore_eos=True)
            for batch in batches:
                label = f"{kernels}-{cache}-b{batch}"
                try:
                    run_loop(llm, prompts[:batch], params, label + "-warm")
                    best, steps = float("inf"), 0
                    for r in range(args.repeats):
                        sec, steps = run_loop(llm, prompts[:batch], params, f"{label}-{r}")
                        best = min(best, sec)
                    if args.profile:
                        profile(llm, prompts[:batch], params, label, args.profile)
                except Exception as e:  # the engine may hold the failed requests: skip to the next backend
                    traceback.print_exc()
                    failures.append(f"{label}: {type(e).__name__}: {e}")
                    print(failures[-1], flush=True)
                    break
                ms = best / steps * 1e3
                f_ms, gb, tf = floor(shape, n_params, batch, cache, args, elem, ceil.gbps, ceil.tflops)
                rows.append(Row(kernels, cache, batch, steps, ms, f_ms, gb, tf, batch * args.gen_len / best))
                print(f"{label}: {steps} steps, {ms:.2f} ms/step, floor {f_ms:.2f} ms ({ms / f_ms:.2f}x), "
                      f"{rows[-1].tokens_per_s:.0f} tok/s", flush=True)
                write(args, argv, dev, ceil, shape, n_params, rows, failures)  # a timeout keeps what was measured
            else:
                continue
            break
        llm.shutdown()
        del llm
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if write(args, argv, dev, ceil, shape, n_params, rows, failures, echo=True) else 0


def write(args: argparse.Namespace, argv: list[str] | None, dev: torch.device, ceil, shape: Shape, n_params: int,
          rows: list[Row], failures: list[str], echo: bool = False) -> bool:
    """Write the markdown table (and JSON rows) to --out; -> whether anything failed."""
    from benchmarks.kernels.common import device_name
    lines = [f"## End-to-end steps, LLaDA-8B shape, {args.dtype}, on {device_name(dev)}", "",
             f"- command: `python -m benchmarks.gpu_step {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- ceilings measured in the same process: bf16 matmul {ceil.tflops:.0f} TFLOP/s, "
             f"copy {ceil.gbps:.0f} GB/s (read + write)",
             f"- model: {n_params / 1e9:.2f} B parameters ({asdict(shape)}), prompt {args.prompt_len}, "
             f"gen {args.gen_len}, block {args.block_length}, steps {args.gen_len}, best of {args.repeats}",
             "", "| kernels | cache | batch | steps | ms / step | floor ms | step / floor | GB / step | TFLOP / step | tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.kernels} | {r.cache} | {r.batch} | {r.steps} | {r.ms_per_step:.2f} | {r.floor_ms:.2f} | "
              f"{r.ms_per_step / r.floor_ms:.2f}x | {r.bytes_gb:.1f} | {r.tflop:.2f} | {r.tokens_per_s:.0f} |"
              for r in rows]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in failures]
    text = "\n".join(lines) + "\n"
    if echo:
        print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return bool(failures)


if __name__ == "__main__":
    sys.exit(main())
