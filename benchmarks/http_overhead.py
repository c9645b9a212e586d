"""What the HTTP layer costs: the same requests at the same concurrency through `unmask serve` (streamed over
HTTP with unmask_client, as benchmarks/serve.py sends them) and through an in-process AsyncEngine, in one run.

    python -m benchmarks.http_overhead --random 512x8 --concurrency 32 --num-prompts 64 \
        --prompt-len 64 --gen-len 64 --block-length 16 --cache dual
    python -m benchmarks.http_overhead --concurrency 32 --num-prompts 128          # the bundled model, task prompts

Both sides load the same checkpoint with the same engine options (device, dtype, max_num_seqs = concurrency,
KV pool size) and get identical prompts and sampling options (temperature 0, so identical outputs, checked). The
server runs as a child process on 127.0.0.1; the load generator runs in this process, so on a small machine
it competes with the server for the same cores (the in-process side has no client to run beside the engine).
Rounds alternate which side goes first; the ratio is output tokens/s over HTTP divided by in-process, over all
rounds. Because wall time on a shared machine swings with other load, it also reports CPU time: the server's
plus the load generator's for HTTP against this process's for in-process, and the ratio of output tokens per CPU
second (what the throughput ratio becomes when the cores are saturated). Writes a JSON result with every round and both sides' serve.py summary (latency percentiles included).
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks import serve
from engine import SamplingParams
from engine.async_engine import AsyncEngine
from engine.bundled import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the bundled model, task prompts)")
    p.add_argument("--random", metavar="DxL", help="random LLaDA model of d_model D and L layers, e.g. 512x8")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--concurrency", type=int, default=32, help="clients in flight, and the engine's max_num_seqs")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64, help="random model: mean prompt length (+-50%%)")
    p.add_argument("--gen-len", type=int, default=64, help="max_tokens (random model; task: the model default)")
    p.add_argument("--block-length", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cache", default="dual")
    p.add_argument("--threshold", type=float)
    p.add_argument("--rounds", type=int, default=2, help="each round runs both sides, alternating the order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--device", args.device, "--dtype", args.dtype, "--max-num-seqs", str(args.concurrency),
           "--kv-cache-memory", str(args.kv_cache_memory), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print("# server: " + " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def run_inprocess(engine: AsyncEngine, requests: list[serve.BenchRequest], params: SamplingParams,
                        concurrency: int, decode: Any) -> tuple[list[serve.RequestResult], float]:
    """serve.run_load's loop with AsyncEngine.add_request in place of the HTTP client; the same timing rules
    (TTFT: first delta with text; ITL: gaps between later ones). Chat requests are templated and tokenized inside
    the timed part, as the server does them."""
    limit = asyncio.Semaphore(concurrency)
    model = engine.llm.model

    async def one(req: serve.BenchRequest) -> serve.RequestResult:
        async with limit:
            t0 = last = time.perf_counter()
            ids = req.prompt if req.messages is None else model.apply_chat_template(req.messages)
            res = serve.RequestResult(prompt_tokens=len(ids))
            seen = 0
            async for out in engine.add_request(ids, params):
                now = time.perf_counter()
                if len(out.token_ids) > seen:
                    if not res.ttft:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last, seen = now, len(out.token_ids)
                if out.finished:
                    res.output_tokens = len(out.token_ids)
                    res.text = decode(out.token_ids)
                    res.tokens_per_forward = out.stats.tokens_per_forward
            res.e2el = time.perf_counter() - t0
            res.success = True
            return res

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    return list(results), time.perf_counter() - t0


async def run_http(base_url: str, requests: list[serve.BenchRequest], options: dict[str, Any],
                   concurrency: int) -> tuple[list[serve.RequestResult], float]:
    async with serve.make_client(base_url, None, None, concurrency) as client:
        client.model = (await client.models())[0].id
        return await serve.run_load(client, requests, options, concurrency, float("inf"), progress=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="unmask-overhead-"))  # random checkpoint and server log, removed at exit
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    task = None
    if args.random:
        from engine.random_checkpoint import write_random_checkpoint
        d, n_layers = (int(v) for v in args.random.lower().split("x"))
        model_dir = write_random_checkpoint(tmp / "random", "llada", hidden_size=d, num_layers=n_layers,
                                            num_heads=max(d // 64, 1), intermediate_size=d * 8 // 3 // 64 * 64,
                                            vocab_size=args.vocab, tokenizer=True, seed=args.seed)
    else:
        model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
        if args.model is None:
            task = serve.load_task_module()

    engine = AsyncEngine.from_model(model_dir, device=args.device, dtype=args.dtype, max_num_seqs=args.concurrency,
                                    kv_cache_memory=args.kv_cache_memory)
    model = engine.llm.model
    cfg = model.config
    if task is None:  # token-id prompts, lengths spread over [prompt-len / 2, 3 * prompt-len / 2]
        reqs = serve.random_requests(args.num_prompts + 1, args.prompt_len, args.gen_len, 0.5,
                                     (0, cfg.vocab_size - 64), args.seed)
        gen_len = args.gen_len
    else:
        reqs = serve.task_requests(args.num_prompts + 1, None, args.seed)
        gen_len = engine.llm.defaults.max_tokens
    for r in reqs:
        r.max_tokens = gen_len
    opts = {"temperature": 0.0, "cache": args.cache, "ignore_eos": task is None, "block_length": args.block_length,
            "steps": args.steps, "threshold": args.threshold}
    opts = {k: v for k, v in opts.items() if v is not None}
    params = SamplingParams(max_tokens=gen_len, **opts)
    warm_req, *reqs = reqs

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    proc = start_server(model_dir, args, port, log)
    rounds = []
    try:
        client = serve.AsyncClient(base_url)
        asyncio.run(client.wait_until_ready(timeout=600))
        print(f"# model {model_dir} ({cfg.family}, d={cfg.hidden_size}, layers={cfg.num_layers}), device "
              f"{args.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}; "
              f"{len(reqs)} requests, {args.concurrency} concurrent, options {opts}, max_tokens {gen_len}",
              flush=True)

        async def inproc() -> tuple[list[serve.RequestResult], float]:
            return await run_inprocess(engine, reqs, params, args.concurrency, model.decode)

        async def http() -> tuple[list[serve.RequestResult], float]:
            return await run_http(base_url, reqs, opts, args.concurrency)

        asyncio.run(run_inprocess(engine, [warm_req], params, 1, model.decode))  # warm-up, both sides
        asyncio.run(run_http(base_url, [warm_req], opts, 1))
        for i in range(args.rounds):
            order = ("in-process", "http") if i % 2 == 0 else ("http", "in-process")
            row: dict[str, Any] = {}
            for side in order:
                cpu0, srv0 = cpu_seconds(os.getpid()), cpu_seconds(proc.pid)
                results, seconds = asyncio.run(inproc() if side == "in-process" else http())
                cpu = {"this_process": cpu_seconds(os.getpid()) - cpu0, "server_process": cpu_seconds(proc.pid) - srv0}
                row[side] = {"results": results, "seconds": seconds, "cpu_s": cpu}
                s = serve.summarize(results, seconds)
                print(f"round {i + 1} {side:>10}: {s['output_throughput']:8.1f} tok/s  {seconds:6.2f} s  "
                      f"median TTFT {s['median_ttft_ms']:7.1f} ms  median E2EL {s['median_e2el_ms']:7.1f} ms  "
                      f"failed {s['failed']}  CPU s: this process {cpu['this_process']:.1f}, "
                      f"server {cpu['server_process']:.1f}", flush=True)
            rounds.append(row)
    finally:
        rc = stop_server(proc)
        asyncio.run(engine.aclose())
    if rc != 0:
        print(f"server exited {rc}; log:\n{log.read_text()[-3000:]}")

    def total(side: str) -> tuple[int, float]:
        return (sum(r.output_tokens for row in rounds for r in row[side]["results"]),
                sum(row[side]["seconds"] for row in rounds))

    (tok_h, sec_h), (tok_i, sec_i) = total("http"), total("in-process")
    ratio = (tok_h / sec_h) / (tok_i / sec_i)
    same = all(a.text == b.text and a.output_tokens == b.output_tokens
               for row in rounds for a, b in zip(row["http"]["results"], row["in-process"]["results"]))
    per_round = [(serve.summarize(row["http"]["results"], row["http"]["seconds"])["output_throughput"]
                  / serve.summarize(row["in-process"]["results"], row["in-process"]["seconds"])["output_throughput"])
                 for row in rounds]
    cpu_h = sum(row["http"]["cpu_s"]["this_process"] + row["http"]["cpu_s"]["server_process"] for row in rounds)
    cpu_i = sum(row["in-process"]["cpu_s"]["this_process"] for row in rounds)
    cpu_ratio = (tok_h / cpu_h) / (tok_i / cpu_i)
    print(f"\nHTTP / in-process output tokens/s: {ratio:.3f} (rounds: {', '.join(f'{r:.3f}' for r in per_round)}); "
          f"identical outputs: {same}")
    print(f"CPU seconds: HTTP {cpu_h:.1f} (server + load generator), in-process {cpu_i:.1f}; "
          f"HTTP / in-process output tokens per CPU second: {cpu_ratio:.3f}")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.random and f"random LLaDA d{args.random}" or str(model_dir), "device": args.device,
        "dtype": args.dtype, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "concurrency": args.concurrency, "num_prompts": len(reqs), "options": opts, "max_tokens": gen_len,
        "http_over_inprocess": ratio, "per_round": per_round, "identical_outputs": same,
        "http_over_inprocess_tokens_per_cpu_s": cpu_ratio,
        "cpu_s": [{side: row[side]["cpu_s"] for side in ("http", "in-process")} for row in rounds],
        "http": serve.summarize([r for row in rounds for r in row["http"]["results"]], sec_h),
        "in_process": serve.summarize([r for row in rounds for r in row["in-process"]["results"]], sec_i),
        "command": "python -m benchmarks.http_overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if task is not None:
        result["accuracy"] = {side: sum(task.check(q.question, r.text) for row in rounds
                                        for q, r in zip(reqs, row[side]["results"])) / (len(reqs) * len(rounds))
                              for side in ("http", "in-process")}
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
