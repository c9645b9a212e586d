"""HTTP overhead of `unmask serve` against the in-process AsyncEngine, on the bundled model's task.

    python -m benchmarks.serve_overhead --num-prompts 200 --concurrency 200

Runs the same held-out chat problems, all submitted at once, (1) straight into an AsyncEngine in this process,
(2) through the FastAPI app in this process (httpx ASGITransport: routing, validation, JSON, no sockets) and
(3) through a real `unmask serve` subprocess on 127.0.0.1 (sockets, uvicorn), while a probe measures /health
latency (the event loop's responsiveness during the batch). Prints requests/s, generated tokens/s, the ratio to (1),
task accuracy and the probe's latency percentiles. A warm-up round precedes the measurements; the engine and
ASGI rounds are interleaved and the best round of each path is reported.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from engine.async_engine import AsyncEngine
from engine.bundled import DEFAULT_MODEL_DIR, task
from engine.sampling_params import SamplingParams


async def run_engine(engine: AsyncEngine, problems: list[tuple[str, str]], opts: dict) -> tuple[float, int, int]:
    model = engine.llm.model
    ids = [model.apply_chat_template(task.messages_for(q)) for q, _ in problems]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(i, SamplingParams(**opts)) for i in ids))
    dt = time.perf_counter() - t0
    return dt, sum(len(o.token_ids) for o in outs), sum(task.check(q, o.text) for (q, _), o in zip(problems, outs))


async def run_http(client: httpx.AsyncClient, problems: list[tuple[str, str]], opts: dict,
                   probe: bool) -> tuple[float, int, int, list[float]]:
    latencies: list[float] = []
    done = asyncio.Event()

    async def health_probe() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await client.get("/health")
            latencies.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)

    async def ask(q: str) -> dict:
        r = await client.post("/v1/chat/completions", json={"messages": task.messages_for(q), **opts})
        r.raise_for_status()
        return r.json()

    prober = asyncio.create_task(health_probe()) if probe else None
    t0 = time.perf_counter()
    bodies = await asyncio.gather(*(ask(q) for q, _ in problems))
    dt = time.perf_counter() - t0
    done.set()
    if prober:
        await prober
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    correct = sum(task.check(q, b["choices"][0]["message"]["content"]) for (q, _), b in zip(problems, bodies))
    return dt, tokens, correct, latencies


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=200, help="max_num_seqs of the engine")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--cache", default="none")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    problems = task.make_problems(args.num_prompts, seed=99, split="held_out")
    opts = {"cache": args.cache, **({"threshold": args.threshold} if args.threshold else {})}
    rows = []

    from server.app import build_app
    from server.config import ServerConfig
    from server.engine_client import LocalEngineClient
    from tests.server.serve_process import ServeProcess

    async def in_process() -> None:
        engine = AsyncEngine.from_model(DEFAULT_MODEL_DIR, dtype=args.dtype, max_num_seqs=args.concurrency)
        app = build_app(LocalEngineClient(engine), ServerConfig(served_model_names=["tiny"]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=600) as c:
            await run_engine(engine, problems, opts)  # warm-up: touches every KV page the run will use
            for _ in range(args.rounds):  # interleaved, best of rounds: the machine's load drifts
                rows.append(("AsyncEngine (in-process)", *await run_engine(engine, problems, opts), []))
                rows.append(("FastAPI app (ASGI, no sockets)", *await run_http(c, problems, opts, True)))
        await engine.aclose()

    asyncio.run(in_process())
    srv = ServeProcess("--dtype", args.dtype, "--max-num-seqs", str(args.concurrency))
    try:
        async def over_http() -> None:
            limits = httpx.Limits(max_connections=args.num_prompts + 8)
            async with httpx.AsyncClient(base_url=srv.url, timeout=600, limits=limits) as c:
                await run_http(c, problems, opts, False)
                for _ in range(args.rounds):
                    rows.append(("unmask serve (127.0.0.1)", *await run_http(c, problems, opts, True)))
        asyncio.run(over_http())
    finally:
        srv.stop()

    best: dict[str, tuple] = {}
    for row in rows:
        if row[0] not in best or row[1] < best[row[0]][1]:
            best[row[0]] = row
    rows = list(best.values())
    base = rows[0][1]
    print(f"\n{args.num_prompts} held-out chats at once, bundled model, dtype {args.dtype}, opts {opts}, "
          f"best of {args.rounds} rounds")
    print(f"{'path':34s} {'req/s':>8s} {'tok/s':>8s} {'vs engine':>9s} {'exact':>6s} {'/health p50 / p99 / max ms':>28s}")
    for name, dt, tokens, correct, lat in rows:
        probe = (f"{pct(lat, 50) * 1e3:6.1f} / {pct(lat, 99) * 1e3:6.1f} / {max(lat) * 1e3:6.1f}  (n={len(lat)})"
                 if lat else "")
        print(f"{name:34s} {args.num_prompts / dt:8.1f} {tokens / dt:8.1f} {base / dt:9.2f} "
              f"{correct / args.num_prompts:6.1%} {probe:>28s}")


if __name__ == "__main__":
    main()
