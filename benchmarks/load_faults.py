"""Load with faults against a real `unmask serve` process on 127.0.0.1 (bounded: rounds x clients requests).

    python -m benchmarks.load_faults --clients 200 --rounds 5 --out benchmarks/results/load_faults.md

Each round starts `--clients` concurrent clients. Each sends one request drawn from a pool of request specs that mix
chat and completions, streaming and not, and random diffusion options (block_length, steps, remasking, threshold,
cache mode, sampling with a seed, n=2). A third of the clients leave mid-request (a streaming client after its
first chunk, a non-streaming one after a random delay). Checked every round:
- every request that was not abandoned is correct and whole: its text (the concatenated deltas for a stream) and
  finish_reason equal what the offline `LLM` returns for the same prompt and options (the reference, computed in
  this process), a stream ends with a finish_reason chunk, a usage chunk and [DONE];
- after the round the running and waiting gauges are back to 0 and the KV cache usage is 0 (all pages free);
- the server's resident memory (VmRSS, measured idle after each round) stays within --rss-tolerance of round 1.
The bundled model's task accuracy over the completed chat requests is reported too (informational: random
options are not all accurate settings). Exit status 0 when every check passes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.server.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[1]


# --- the server process ------------------------------------------------------------------------------------------
class Server(ServeProcess):
    """`unmask serve` on a free 127.0.0.1 port (the tests' ServeProcess), plus its memory and exit status."""

    def __init__(self, args: list[str], timeout: float = 180) -> None:
        super().__init__(*args, timeout=timeout)

    def rss_bytes(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the server process."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        get = lambda k: int(re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1)) * 1024  # noqa: E731
        return get("VmRSS"), get("VmHWM")

    def stop(self) -> int:
        super().stop()
        return self.proc.wait()


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(f"unmask:{name}{{")]
        out[name] = sum(vals)
    return out


# --- request specs and their offline references ----------------------------------------------------------------------
@dataclass
class Spec:
    kind: str  # chat | completion
    question: str
    options: dict[str, Any]
    n: int = 1
    expected: list[tuple[str, str]] = field(default_factory=list)
    """(text, finish_reason) per choice, from the offline LLM."""

    def body(self, stream: bool) -> dict[str, Any]:
        from engine.bundled import task
        b: dict[str, Any] = {"model": "tiny", **self.options, "n": self.n, "stream": stream}
        if stream:
            b["stream_options"] = {"include_usage": True}
        if self.kind == "chat":
            b["messages"] = task.messages_for(self.question)
        else:
            b["prompt"] = self.question
        return b


def random_options(rng: random.Random) -> dict[str, Any]:
    max_tokens = rng.choice([8, 16, 16, 24, 32])
    o: dict[str, Any] = {"max_tokens": max_tokens}
    block = rng.choice([b for b in (4, 8, 16, 32) if max_tokens % b == 0])
    o["block_length"] = block
    o["steps"] = rng.choice([max_tokens, max_tokens // 2, max_tokens * 2]) if rng.random() < 0.6 else max_tokens
    o["steps"] = max(o["steps"] // (max_tokens // block) * (max_tokens // block), max_tokens // block)
    if rng.random() < 0.4:
        o["cache"] = rng.choice(["prefix", "dual"])
    if rng.random() < 0.3:
        o["threshold"] = rng.choice([0.7, 0.9])
    if rng.random() < 0.3:
        o["remasking"] = rng.choice(["low_confidence", "margin", "entropy", "random"])
    if rng.random() < 0.3 or o.get("remasking") == "random":
        o["temperature"] = rng.choice([0.0, 0.5, 1.0])
        o["seed"] = rng.randrange(2 ** 31)
    if rng.random() < 0.1:
        o["stop"] = [" 9"]
    return o


def make_specs(count: int, seed: int) -> list[Spec]:
    from engine.bundled import task
    rng = random.Random(seed)
    problems = task.make_problems(count, seed=seed, split="held_out")
    specs = []
    for k, (q, _) in enumerate(problems):
        opts = random_options(rng) if k % 4 else {}  # a quarter at the model's defaults (its accurate setting)
        n = 2 if "seed" in opts and rng.random() < 0.5 else 1
        specs.append(Spec(rng.choice(["chat", "chat", "completion"]), q, opts, n))
    return specs


def fill_references(specs: list[Spec], dtype: str) -> None:
    """Each choice's (text, finish_reason) from the offline LLM: one batched chat call and one batched generate
    call (outputs do not depend on the batch)."""
    from engine import LLM, SamplingParams
    from engine.bundled import task
    llm = LLM(dtype=dtype)
    for kind in ("chat", "completion"):
        jobs = []
        for s in specs:
            if s.kind != kind:
                continue
            seed = s.options.get("seed")
            for i in range(s.n):
                opts = {**s.options, **({"seed": (seed + i) & (2 ** 63 - 1)} if seed is not None else {})}
                jobs.append((s, SamplingParams(**opts)))
        if not jobs:
            continue
        params = [p for _, p in jobs]
        outs = (llm.chat([task.messages_for(s.question) for s, _ in jobs], params) if kind == "chat"
                else llm.generate([s.question for s, _ in jobs], params))
        for (s, _), out in zip(jobs, outs):
            s.expected.append((out.text, out.finish_reason))


# --- clients ---------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    ok: bool = False
    abandoned: bool = False
    error: str = ""
    answers: list[str] = field(default_factory=list)


async def run_client(c: httpx.AsyncClient, spec: Spec, stream: bool, leave: float | None) -> Outcome:
    path = "/v1/chat/completions" if spec.kind == "chat" else "/v1/completions"
    body = spec.body(stream)
    if not stream:
        try:
            r = await asyncio.wait_for(c.post(path, json=body), leave) if leave else await c.post(path, json=body)
        except asyncio.TimeoutError:
            return Outcome(abandoned=True)
        if r.status_code != 200:
            return Outcome(error=f"{r.status_code}: {r.text[:200]}")
        choices = sorted(r.json()["choices"], key=lambda ch: ch["index"])
        got = [((ch["message"]["content"] if spec.kind == "chat" else ch["text"]), ch["finish_reason"])
               for ch in choices]
        return _judge(spec, got)
    texts = [""] * spec.n
    finish: list[str | None] = [None] * spec.n
    usage, done = None, False
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return Outcome(error=f"{r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line:
                continue
            if leave is not None:  # leave after the first event
                return Outcome(abandoned=True)
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                break
            ev = json.loads(payload)
            if "error" in ev:
                return Outcome(error=f"stream error: {ev['error']}")
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev["choices"]:
                i = ch["index"]
                texts[i] += (ch["delta"].get("content") or "") if spec.kind == "chat" else ch["text"]
                if ch.get("finish_reason"):
                    if finish[i] is not None:
                        return Outcome(error=f"choice {i} finished twice")
                    finish[i] = ch["finish_reason"]
    if not done or usage is None:
        return Outcome(error=f"stream not whole (done={done}, usage={usage is not None})")
    return _judge(spec, list(zip(texts, finish)))


def _judge(spec: Spec, got: list[tuple[str, str | None]]) -> Outcome:
    if got != spec.expected:
        return Outcome(error=f"{spec.kind} {spec.question!r} {spec.options} n={spec.n}: got {got}, "
                             f"expected {spec.expected}")
    return Outcome(ok=True, answers=[t for t, _ in got])


@dataclass
class Round:
    index: int
    seconds: float
    completed: int
    abandoned: int
    failed: int
    errors: list[str]
    gauges_zero: bool
    gauges: dict[str, float]
    rss_mib: float
    hwm_mib: float
    chat_correct: int
    chat_total: int
    default_correct: int
    default_total: int
    """The same over chat choices at the model's default options."""


async def one_round(url: str, specs: list[Spec], clients: int, rng: random.Random, index: int,
                    leave_fraction: float) -> tuple[list[Outcome], list[tuple[Spec, Outcome]], float]:
    plan = []
    for i in range(clients):
        spec = rng.choice(specs)
        stream = rng.random() < 0.5
        leave = None
        if i % 3 == 0 and rng.random() < leave_fraction * 3:
            leave = 0.0 if stream else rng.uniform(0.02, 0.6)
        plan.append((spec, stream, leave))
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=0)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        outs = await asyncio.gather(*(run_client(c, s, st, lv) for s, st, lv in plan), return_exceptions=True)
    secs = time.monotonic() - t0
    results = [o if isinstance(o, Outcome) else Outcome(error=f"client exception {o!r}") for o in outs]
    return results, [(s, o) for (s, _, _), o in zip(plan, results)], secs


def wait_gauges_zero(url: str, timeout: float = 60) -> tuple[bool, dict[str, float]]:
    end = time.monotonic() + timeout
    g = gauges(url)
    while time.monotonic() < end:
        g = gauges(url)
        if all(v == 0 for v in g.values()):
            return True, g
        time.sleep(0.1)
    return False, g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200, help="concurrent clients per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--specs", type=int, default=60, help="distinct (prompt, options) specs in the pool")
    ap.add_argument("--leave-fraction", type=float, default=1 / 3, help="fraction of clients that leave early")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto",
                    help="server and reference dtype (auto: the server's default, not passed to it; the reference "
                         "is exact at every dtype because outputs do not depend on the batch)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no new round after this many seconds (the rounds run stay complete)")
    ap.add_argument("--rss-tolerance", type=float, default=0.10)
    ap.add_argument("--serve-args", default="", help="extra `unmask serve` flags, e.g. '--max-num-seqs 32'")
    ap.add_argument("--out", help="write a markdown report here (and .json beside it)")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or not 0 <= args.leave_fraction <= 1:
        ap.error("--clients and --rounds must be >= 1, --leave-fraction in [0, 1]")

    t0 = time.monotonic()
    specs = make_specs(args.specs, args.seed)
    fill_references(specs, args.dtype)
    print(f"references for {len(specs)} specs in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    serve_args = [*(["--dtype", args.dtype] if args.dtype != "auto" else []), "--served-model-name", "tiny",
                  *args.serve_args.split()]
    server = Server(serve_args)
    rng = random.Random(args.seed)
    rounds: list[Round] = []
    from engine.bundled import task
    try:
        for i in range(args.rounds):
            if args.max_seconds is not None and rounds and time.monotonic() - t0 > args.max_seconds:
                print(f"stopping after {i} rounds: --max-seconds {args.max_seconds} reached", file=sys.stderr)
                break
            results, pairs, secs = asyncio.run(one_round(server.url, specs, args.clients, rng, i,
                                                         args.leave_fraction))
            zero, g = wait_gauges_zero(server.url)
            time.sleep(0.5)
            rss, hwm = server.rss_bytes()
            chat = [(s, o) for s, o in pairs if o.ok and s.kind == "chat"]
            rounds.append(Round(
                index=i + 1, seconds=round(secs, 2), completed=sum(o.ok for o in results),
                abandoned=sum(o.abandoned for o in results), failed=sum(bool(o.error) for o in results),
                errors=[o.error for o in results if o.error][:5], gauges_zero=zero, gauges=g,
                rss_mib=round(rss / 2 ** 20, 1), hwm_mib=round(hwm / 2 ** 20, 1),
                chat_correct=sum(task.check(s.question, a) for s, o in chat for a in o.answers),
                chat_total=sum(len(o.answers) for _, o in chat),
                default_correct=sum(task.check(s.question, a) for s, o in chat if not s.options for a in o.answers),
                default_total=sum(len(o.answers) for s, o in chat if not s.options)))
            r = rounds[-1]
            print(f"round {r.index}: {r.completed} whole and correct, {r.abandoned} left early, {r.failed} failed, "
                  f"{r.seconds:.1f} s; gauges back to 0: {r.gauges_zero}; RSS {r.rss_mib} MiB (peak {r.hwm_mib})",
                  file=sys.stderr)
            for e in r.errors:
                print(f"  error: {e}", file=sys.stderr)
        code = server.stop()
    finally:
        if server.proc.poll() is None:
            server.stop()
    base = rounds[0].rss_mib
    rss_ok = all(abs(r.rss_mib - base) <= args.rss_tolerance * base for r in rounds)
    passed = (all(r.failed == 0 and r.gauges_zero for r in rounds) and rss_ok and code == 0
              and sum(r.completed for r in rounds) > 0)
    summary = {"passed": passed, "rss_within_tolerance": rss_ok, "exit_code": code, "args": vars(args),
               "dtype": _resolved_dtype(args.dtype),
               "commit": _commit(),
               "rounds": [asdict(r) for r in rounds], "total_seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}), file=sys.stderr)
    if args.out:
        _report(Path(args.out), summary, argv if argv is not None else sys.argv[1:])
    return 0 if passed else 1


def _resolved_dtype(dtype: str) -> str:
    from engine.loader import resolve_dtype
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _report(path: Path, s: dict[str, Any], argv: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(s, indent=1) + "\n")
    rows = ["| round | s | whole & correct | left early | failed | gauges 0 | RSS MiB | vs round 1 | peak RSS MiB "
            "| chat task exact (all) | (default options) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = s["rounds"][0]["rss_mib"]
    for r in s["rounds"]:
        rows.append(f"| {r['index']} | {r['seconds']} | {r['completed']} | {r['abandoned']} | {r['failed']} | "
                    f"{'yes' if r['gauges_zero'] else 'NO'} | {r['rss_mib']} | {100 * (r['rss_mib'] / base - 1):+.1f}% "
                    f"| {r['hwm_mib']} | {r['chat_correct']}/{r['chat_total']} | "
                    f"{r['default_correct']}/{r['default_total']} |")
    path.write_text(
        "# Load with faults\n\n"
        f"Command: `python -m benchmarks.load_faults {' '.join(argv)}` (commit {s['commit']}, bundled model, "
        f"dtype {s['args']['dtype']} = {s['dtype']}, {os.cpu_count()} CPUs shared with other jobs)\n\n"
        f"Result: **{'PASS' if s['passed'] else 'FAIL'}** (RSS within {100 * s['args']['rss_tolerance']:.0f}% of "
        f"round 1: {s['rss_within_tolerance']}; server exit status after SIGTERM: {s['exit_code']}; "
        f"{s['total_seconds']} s in all)\n\n" + "\n".join(rows) + "\n\n"
        "Whole & correct: text and finish_reason (every choice; a stream's concatenated deltas) equal the offline "
        "LLM's for the same prompt and options, streams end with finish_reason, usage and [DONE]. Left early: the "
        "client closed its connection mid-request (after the first event of a stream, or after a random delay). "
        "Gauges 0: running, waiting and KV cache usage back to 0 after the round. RSS: the server's VmRSS, idle "
        "after the round. Chat task exact: the bundled model's answers that solve the task, over completed chat "
        "choices (informational: the random options include settings the tiny model is inaccurate with, e.g. half the "
        "steps or random remasking; a quarter of the specs use the model's defaults, reported apart).\n")


if __name__ == "__main__":
    sys.exit(main())
