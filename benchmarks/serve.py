"""Load generator for an OpenAI-compatible server (unmask serve, or vLLM / SGLang for comparison).

    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --dataset-name task --num-prompts 200 \
        --max-concurrency 32 --cache dual --threshold 0.9 --result-file out.json
    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --dataset-name random --random-input-len 128 \
        --random-output-len 64 --request-rate 4 --ignore-eos --steps 64 --block-length 16
    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --dataset-name shared-prefix \
        --shared-prefix-len 512 --random-input-len 32 --random-output-len 32 --ignore-eos

Flags and result keys follow `vllm bench serve`. Every request streams (`stream_options.include_usage`), from
the Poisson arrival process of --request-rate (inf: all at once), at most --max-concurrency in flight.

Per request:
- TTFT: time to the first chunk carrying content. (vLLM counts the first chunk with choices; unmask sends the
  assistant role in an empty chunk before the first block is decoded, which would make TTFT meaningless.)
- ITL: gaps between later content chunks; with block streaming these are block intervals, not token intervals.
- E2EL: time to the end of the stream. TPOT: (E2EL - TTFT) / (output tokens - 1).
- Output tokens: the usage chunk's completion_tokens.

Datasets: `random` sends token-id prompts to /v1/completions (lengths uniform in input-len * [1 - r, 1 + r], ids
uniform over the served model's vocabulary without its special ids, or in --random-token-range);
`shared-prefix` is the random dataset behind a shared system prompt: every prompt
starts with one of --shared-prefix-num random prefixes of --shared-prefix-len tokens (round robin), followed by its
own random suffix of --random-input-len tokens (the workload prompt-prefix caching serves; vLLM's
prefix-repetition dataset); `task` sends the bundled model's held-out problems as chat and reports accuracy.
Diffusion options (--steps, --block-length, --threshold, ...) are sent as top-level fields. The server's diffusion
counters (unmask:* or vllm:diffusion_*) and the prefix-cache counters (prefix_cache_queries / _hits, in tokens, and
their ratio) are read from /metrics before and after the run.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import httpx
from tqdm import tqdm

from unmask_client import AsyncClient, RetryPolicy, UnmaskError

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION_OPTIONS = ("steps", "block_length", "remasking", "threshold", "factor", "cfg_scale", "cache", "top_k",
                     "ignore_eos", "algorithm", "alg_temp")
COUNTERS = {  # result key -> metric names (unmask's, then vLLM's) summed over their labels
    "denoising_steps": ("unmask:denoising_steps_total", "vllm:diffusion_num_denoising_steps_total"),
    "positions_computed": ("unmask:positions_computed_total", "vllm:diffusion_num_canvas_positions_total"),
    "tokens_committed": ("unmask:tokens_committed_total", "vllm:diffusion_num_committed_tokens_total"),
    "generation_tokens": ("unmask:generation_tokens_total", "vllm:generation_tokens_total"),
    "prefix_cache_queries": ("unmask:prefix_cache_queries_total", "vllm:prefix_cache_queries_total"),
    "prefix_cache_hits": ("unmask:prefix_cache_hits_total", "vllm:prefix_cache_hits_total"),
}
DATASETS = ("random", "shared-prefix", "task")


@dataclass
class BenchRequest:
    prompt: list[int] | None = None
    """Token ids for /v1/completions (random dataset)."""
    messages: list[dict[str, str]] | None = None
    """Chat messages (task dataset)."""
    question: str | None = None
    """The task question, to score the answer."""
    input_len: int = 0
    max_tokens: int | None = None


@dataclass
class RequestResult:
    success: bool = False
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    e2el: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""
    error: str = ""
    tokens_per_forward: float | None = None


# workload --------------------------------------------------------------------------------------------------
def load_task_module() -> Any:
    """engine/bundled/task.py loaded by path: it is plain Python, and importing the engine package pulls torch."""
    spec = importlib.util.spec_from_file_location("unmask_bundled_task", ROOT / "engine" / "bundled" / "task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float,
                    token_range: tuple[int, int] | Sequence[int], seed: int) -> list[BenchRequest]:
    """token_range: (LO, HI) draws ids uniformly from [LO, HI); a longer sequence is the list of ids to draw from."""
    rng = random.Random(seed)
    lo_len, hi_len = max(1, round(input_len * (1 - range_ratio))), max(1, round(input_len * (1 + range_ratio)))
    ids = _id_pool(token_range)
    out = []
    for _ in range(n):
        length = rng.randint(lo_len, hi_len)
        out.append(BenchRequest(prompt=[ids[rng.randrange(len(ids))] for _ in range(length)], input_len=length,
                                max_tokens=output_len))
    return out


OFFLINE_TOKEN_RANGE = (0, 1000)
"""Random-prompt ids when requests are built without a server to ask (make_requests(args) with no model card)."""


def _id_pool(token_range: tuple[int, int] | Sequence[int]) -> Sequence[int]:
    """(LO, HI) -> range(LO, HI); a longer sequence is the list of ids itself."""
    return range(*token_range) if isinstance(token_range, tuple) and len(token_range) == 2 else list(token_range)


def served_token_ids(card: Any) -> list[int]:
    """The ids a random prompt may use on the served model: its vocabulary (/v1/models `vocab_size`, as vllm bench
    serve takes it from the model's tokenizer) minus the mask, EOS and stop ids."""
    vocab = getattr(card, "vocab_size", None)
    if not vocab:
        raise SystemExit(f"benchmarks.serve: the server does not report model {card.id!r}'s vocab_size; pass "
                         f"--random-token-range LO HI")
    special = getattr(card, "special_tokens", None) or {}
    skip = {special.get("mask_token_id"), special.get("eos_token_id"), *(special.get("stop_token_ids") or [])}
    return [t for t in range(vocab) if t not in skip]


def shared_prefix_requests(n: int, prefix_len: int, num_prefixes: int, suffix_len: int, output_len: int,
                           range_ratio: float, token_range: tuple[int, int] | Sequence[int], seed: int) -> list[BenchRequest]:
    """Random prompts behind shared prefixes: request i = prefix[i % num_prefixes] + its own random suffix (length
    as in random_requests)."""
    rng = random.Random(seed + 7)
    pool = _id_pool(token_range)
    prefixes = [[pool[rng.randrange(len(pool))] for _ in range(prefix_len)] for _ in range(num_prefixes)]
    suffixes = random_requests(n, suffix_len, output_len, range_ratio, token_range, seed)
    return [BenchRequest(prompt=prefixes[i % num_prefixes] + r.prompt, input_len=prefix_len + r.input_len,
                         max_tokens=output_len) for i, r in enumerate(suffixes)]


def task_requests(n: int, output_len: int | None, seed: int) -> list[BenchRequest]:
    task = load_task_module()
    return [BenchRequest(messages=task.messages_for(q), question=q, max_tokens=output_len)
            for q, _ in task.make_problems(n, seed=seed, split="held_out")]


def arrival_gaps(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps (Poisson arrivals) at request_rate, 0 for inf."""
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed + 1)
    return [rng.expovariate(request_rate) for _ in range(n)]


# one request -----------------------------------------------------------------------------------------------
async def send(client: AsyncClient, req: BenchRequest, options: dict[str, Any]) -> RequestResult:
    """Stream one request and time it."""
    res = RequestResult(prompt_tokens=req.input_len)
    t0 = time.perf_counter()
    last = t0
    try:
        if req.messages is not None:
            stream = await client.chat(req.messages, stream=True, max_completion_tokens=req.max_tokens, **options)
        else:
            stream = await client.complete(req.prompt, stream=True, max_tokens=req.max_tokens, **options)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.text:
                if not res.ttft:
                    res.ttft = now - t0
                else:
                    res.itls.append(now - last)
                last = now
                res.text += chunk.text
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
                res.prompt_tokens = chunk.usage.prompt_tokens or res.prompt_tokens
            if chunk.diffusion is not None and chunk.diffusion.tokens_per_forward is not None:
                res.tokens_per_forward = chunk.diffusion.tokens_per_forward
        res.e2el = time.perf_counter() - t0
        res.success = True
    except (UnmaskError, httpx.HTTPError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        res.e2el = time.perf_counter() - t0
    return res


async def run_load(client: AsyncClient, requests: list[BenchRequest], options: dict[str, Any],
                   max_concurrency: int | None, request_rate: float, seed: int = 0,
                   progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send every request (arrivals at request_rate, at most max_concurrency in flight); results in request
    order, and the wall time from the first send to the last answer."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress, file=sys.stderr)

    async def one(req: BenchRequest) -> RequestResult:
        if limit is None:
            res = await send(client, req, options)
        else:
            async with limit:
                res = await send(client, req, options)
        bar.update(1)
        return res

    tasks = []
    t0 = time.perf_counter()
    for req, gap in zip(requests, arrival_gaps(len(requests), request_rate, seed)):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration


# report ----------------------------------------------------------------------------------------------------
def _percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(name: str, seconds: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    mean = sum(ms) / len(ms) if ms else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms)) if ms else 0.0
    out = {f"mean_{name}_ms": mean, f"median_{name}_ms": _percentile(ms, 50), f"std_{name}_ms": std}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = _percentile(ms, p)
    return out


def summarize(results: list[RequestResult], duration: float, percentiles: list[float] = (99,)) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.ttft]
    summary: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
    }
    summary |= _stats("ttft", [r.ttft for r in ok if r.ttft], percentiles)
    summary |= _stats("tpot", tpots, percentiles)
    summary |= _stats("itl", [x for r in ok for x in r.itls], percentiles)
    summary |= _stats("e2el", [r.e2el for r in ok], percentiles)
    tpf = [r.tokens_per_forward for r in ok if r.tokens_per_forward is not None]
    if tpf:
        summary["mean_tokens_per_forward"] = sum(tpf) / len(tpf)
    return summary


def parse_counters(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over label sets} for the COUNTERS names."""
    wanted = {n for names in COUNTERS.values() for n in names}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            try:
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    out = {}
    for key, names in COUNTERS.items():
        found = [sums[n] for n in names if n in sums]
        if found:
            out[key] = found[0]
    return out


async def scrape(client: AsyncClient) -> dict[str, float]:
    try:
        return parse_counters(await client.metrics())
    except UnmaskError:
        return {}


def diffusion_section(before: dict[str, float], after: dict[str, float], duration: float) -> dict[str, float]:
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    if "tokens_committed" in d and duration:
        d["committed_tokens_per_s"] = d["tokens_committed"] / duration
    if d.get("denoising_steps"):
        d["committed_per_step"] = d.get("tokens_committed", 0.0) / d["denoising_steps"]
    if d.get("prefix_cache_queries"):
        d["prefix_cache_hit_rate"] = d.get("prefix_cache_hits", 0.0) / d["prefix_cache_queries"]
    return d


def print_report(r: dict[str, Any], percentiles: list[float]) -> None:
    line = "{:<40}{:<10}"
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=60, c="="))
    for label, key, fmt in (("Successful requests:", "completed", "{}"), ("Failed requests:", "failed", "{}"),
                            ("Benchmark duration (s):", "duration", "{:.2f}"),
                            ("Total input tokens:", "total_input_tokens", "{}"),
                            ("Total generated tokens:", "total_output_tokens", "{}"),
                            ("Request throughput (req/s):", "request_throughput", "{:.2f}"),
                            ("Output token throughput (tok/s):", "output_throughput", "{:.2f}"),
                            ("Total token throughput (tok/s):", "total_token_throughput", "{:.2f}")):
        print(line.format(label, fmt.format(r[key])))
    if r.get("accuracy") is not None:
        print(line.format("Accuracy:", f"{100 * r['accuracy']:.1f}%"))
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency (between blocks)"), ("e2el", "End-to-end Latency")):
        print("{s:{c}^{n}}".format(s=title, n=60, c="-"))
        print(line.format(f"Mean {name.upper()} (ms):", f"{r[f'mean_{name}_ms']:.2f}"))
        print(line.format(f"Median {name.upper()} (ms):", f"{r[f'median_{name}_ms']:.2f}"))
        for p in percentiles:
            print(line.format(f"P{p:g} {name.upper()} (ms):", f"{r[f'p{p:g}_{name}_ms']:.2f}"))
    if r.get("diffusion"):
        print("{s:{c}^{n}}".format(s="Diffusion Decoding (server counters)", n=60, c="-"))
        for k, v in r["diffusion"].items():
            print(line.format(f"{k}:", f"{v:.2f}" if isinstance(v, float) and not v.is_integer() else f"{v:.0f}"))
    print("=" * 60)


# CLI -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (with or without /v1)")
    p.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    p.add_argument("--api-key", help="bearer key (default: $UNMASK_API_KEY, else $OPENAI_API_KEY)")
    p.add_argument("--dataset-name", choices=DATASETS, default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at t=0)")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="input lengths in len * [1 - r, 1 + r]")
    p.add_argument("--shared-prefix-len", type=int, default=256,
                   help="shared-prefix dataset: tokens of each shared system prompt")
    p.add_argument("--shared-prefix-num", type=int, default=1,
                   help="shared-prefix dataset: distinct shared prefixes (requests cycle through them)")
    p.add_argument("--random-token-range", type=int, nargs=2, metavar=("LO", "HI"),
                   help="random prompt token ids are drawn from [LO, HI) (default: the served model's vocabulary "
                        "from /v1/models, without its mask / EOS / stop ids)")
    p.add_argument("--output-len", type=int, help="task dataset: max_completion_tokens (default: the server's)")
    p.add_argument("--num-warmups", type=int, default=1, help="requests sent (and not counted) before the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--steps", type=int)
    p.add_argument("--block-length", type=int)
    p.add_argument("--remasking")
    p.add_argument("--threshold", type=float)
    p.add_argument("--factor", type=float)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--cache", choices=("none", "prefix", "dual"))
    p.add_argument("--top-k", type=int)
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--algorithm")
    p.add_argument("--alg-temp", type=float)
    p.add_argument("--extra-body", type=json.loads, default=None, help="more request fields as JSON")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--label", help="free text stored in the result (e.g. what was varied)")
    p.add_argument("--result-file", help="write the JSON result here")
    p.add_argument("--save-detailed", action="store_true", help="also store per-request ttfts, itls, e2els, errors")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num_prompts < 1:
        p.error("--num-prompts must be >= 1")
    if args.shared_prefix_len < 0 or args.shared_prefix_num < 1:
        p.error("--shared-prefix-len must be >= 0 and --shared-prefix-num >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    if not args.request_rate > 0:
        p.error("--request-rate must be > 0 (inf: all at once)")
    return args


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {k: getattr(args, k) for k in DIFFUSION_OPTIONS if getattr(args, k) is not None}
    opts["temperature"] = args.temperature
    if args.extra_body:
        opts["extra_body"] = args.extra_body
    return opts


def make_requests(args: argparse.Namespace, card: Any = None) -> list[BenchRequest]:
    if args.dataset_name == "task":
        return task_requests(args.num_prompts + args.num_warmups, args.output_len, args.seed)
    if args.random_token_range:
        ids: Sequence[int] = tuple(args.random_token_range)
    else:  # the served vocabulary; with no server to ask (card None, building requests offline) [0, 1000)
        ids = served_token_ids(card) if card is not None else OFFLINE_TOKEN_RANGE
    if args.dataset_name == "shared-prefix":
        return shared_prefix_requests(args.num_prompts + args.num_warmups, args.shared_prefix_len,
                                      args.shared_prefix_num, args.random_input_len, args.random_output_len,
                                      args.random_range_ratio, ids, args.seed)
    return random_requests(args.num_prompts + args.num_warmups, args.random_input_len, args.random_output_len,
                           args.random_range_ratio, ids, args.seed)


def make_client(base_url: str, api_key: str | None, model: str | None, concurrency: int | None) -> AsyncClient:
    limits = httpx.Limits(max_connections=max(concurrency or 0, 1000),
                          max_keepalive_connections=max(concurrency or 0, 100))
    return AsyncClient(base_url, api_key, model=model, read_timeout=3600, retry=RetryPolicy(max_retries=0),
                       transport=httpx.AsyncHTTPTransport(limits=limits))


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    key = args.api_key or os.environ.get("UNMASK_API_KEY") or os.environ.get("OPENAI_API_KEY")
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    options = request_options(args)
    async with make_client(args.base_url, key, args.model, args.max_concurrency) as client:
        await client.wait_until_ready(timeout=300)
        cards = await client.models()
        model = client.model or cards[0].id
        client.model = model
        requests = make_requests(args, next((c for c in cards if c.id == model), cards[0]))
        warmups, requests = requests[:args.num_warmups], requests[args.num_warmups:]
        if warmups:
            await run_load(client, warmups, options, None, float("inf"), progress=False)
        before = await scrape(client)
        results, duration = await run_load(client, requests, options, args.max_concurrency, args.request_rate,
                                           args.seed, progress=not args.no_progress)
        after = await scrape(client)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "backend": "openai",
        "base_url": args.base_url, "model_id": model, "dataset_name": args.dataset_name,
        "num_prompts": args.num_prompts, "max_concurrency": args.max_concurrency,
        "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
        "label": args.label, "options": {k: v for k, v in options.items()},
        "random_input_len": args.random_input_len if args.dataset_name != "task" else None,
        "random_output_len": args.random_output_len if args.dataset_name != "task" else None,
    }
    if args.dataset_name == "shared-prefix":
        result |= {"shared_prefix_len": args.shared_prefix_len, "shared_prefix_num": args.shared_prefix_num}
    result |= summarize(results, duration, percentiles)
    result["accuracy"] = None
    if args.dataset_name == "task":
        task = load_task_module()
        result["accuracy"] = sum(r.success and task.check(q.question, r.text)
                                 for q, r in zip(requests, results)) / len(requests)
    result["diffusion"] = diffusion_section(before, after, duration)
    result["errors"] = sorted({r.error for r in results if r.error})[:10]
    if args.save_detailed:
        result["detailed"] = [asdict(r) for r in results]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = asyncio.run(benchmark(args))
    print_report(result, [float(p) for p in args.metric_percentiles.split(",")])
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(result, indent=2) + "\n")
        print(f"result written to {args.result_file}")
    return result


def exit_status(result: dict[str, Any]) -> int:
    """Non-zero when no request succeeded (a run that measured nothing must not look like one that did)."""
    if result["completed"] == 0:
        print(f"benchmarks.serve: every request failed ({result['failed']}); first errors: "
              f"{result['errors'][:3]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main()))
