"""What `stream_options.include_steps` costs, on the bundled model's task, through the FastAPI app in this process.

    python -m benchmarks.step_stream_overhead --num-prompts 64 --rounds 3

Sends the same held-out chat problems, all at once, as streaming requests (1) plain, (2) with include_steps and
(3) half of them with include_steps, the other half plain, to one app over one AsyncEngine (httpx ASGITransport:
routing, JSON and SSE, no sockets). Rounds alternate between the modes. Reported per mode: the process's CPU time
per request and per engine step (median round; the cost, and what a shared machine disturbs least; the number of
engine steps a round takes varies with how the requests' arrivals split over the first steps), the best round's
requests/s, and each as a ratio to plain. Every stream is read to the end; with steps, each response's steps are replayed
(pieces up to the first stop token) and checked against its streamed content, so a client's work is counted too.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from engine.bundled import DEFAULT_MODEL_DIR, task
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import LocalEngineClient


async def one(client: httpx.AsyncClient, question: str, steps: bool, opts: dict, stop_ids: set[int]
              ) -> tuple[bool, int]:
    body = {"messages": task.messages_for(question), "stream": True, **opts}
    if steps:
        body["stream_options"] = {"include_steps": True}
    content, n_steps, canvas = "", 0, {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:])["choices"]:
                content += ch.get("delta", {}).get("content") or ""
                s = ch.get("diffusion_step")
                if s is not None:
                    n_steps += 1
                    canvas.update(zip(s["positions"], zip(s["token_ids"], s["tokens"])))
    if steps:  # replay: the committed pieces up to the first stop token are the streamed content
        text = []
        for pos in range(len(canvas) + 1):
            tok = canvas.get(pos)
            if tok is None or tok[0] in stop_ids:
                break
            text.append(tok[1])
        assert "".join(text) == content, (text, content)
    return task.check(question, content), n_steps


async def round_(client: httpx.AsyncClient, problems: list[str], mode: str, opts: dict, stop_ids: set[int],
                 engine: LocalEngineClient) -> tuple[float, float, int, int, int]:
    flags = {"plain": [False] * len(problems), "steps": [True] * len(problems),
             "mixed": [i % 2 == 0 for i in range(len(problems))]}[mode]
    t0, c0, s0 = time.perf_counter(), time.process_time(), engine.stats().steps
    res = await asyncio.gather(*(one(client, q, f, opts, stop_ids) for q, f in zip(problems, flags)))
    return (time.perf_counter() - t0, time.process_time() - c0, sum(ok for ok, _ in res), sum(n for _, n in res),
            engine.stats().steps - s0)


async def main(args: argparse.Namespace) -> None:
    engine = LocalEngineClient.from_model(DEFAULT_MODEL_DIR, dtype=args.dtype, max_num_seqs=args.num_prompts)
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))
    problems = [q for q, _ in task.make_problems(args.num_prompts, seed=1, split="held_out")]
    opts = {"max_tokens": args.max_tokens, "steps": args.steps, "block_length": args.block_length}
    modes = ("plain", "steps", "mixed")
    stop_ids = set(engine.info.stop_token_ids)
    results: dict[str, list[tuple[float, float, int, int, int]]] = {m: [] for m in modes}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench",
                                     timeout=600) as client:
            await round_(client, problems[:8], "steps", opts, stop_ids, engine)  # warm-up
            for _ in range(args.rounds):
                for mode in modes:
                    results[mode].append(await round_(client, problems, mode, opts, stop_ids, engine))
    finally:
        await engine.shutdown()
    n = args.num_prompts
    cpu = {m: statistics.median(r[1] for r in results[m]) for m in modes}
    per_step = {m: statistics.median(r[1] / r[4] for r in results[m]) for m in modes}
    wall = {m: min(r[0] for r in results[m]) for m in modes}
    print(f"{n} concurrent streaming chats, max_tokens {args.max_tokens}, steps {args.steps}, "
          f"block_length {args.block_length}, {args.dtype}; {args.rounds} rounds per mode, interleaved")
    print(f"{'mode':8} {'CPU ms/req':>11} {'vs plain':>9} {'CPU ms/engine step':>19} {'vs plain':>9} "
          f"{'best req/s':>11} {'vs plain':>9} {'correct':>8} {'step events':>12}")
    for m in modes:
        ok, events = results[m][-1][2], results[m][-1][3]
        print(f"{m:8} {1000 * cpu[m] / n:11.2f} {cpu[m] / cpu['plain']:9.3f} {1000 * per_step[m]:19.2f} "
              f"{per_step[m] / per_step['plain']:9.3f} {n / wall[m]:11.2f} {wall['plain'] / wall[m]:9.3f} "
              f"{ok:>5}/{n:<2} {events:12d}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    asyncio.run(main(p.parse_args()))
