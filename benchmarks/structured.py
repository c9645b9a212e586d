"""Structured outputs: constrained vs unconstrained decoding in one process on the same weights.

    python -m benchmarks.structured                      # bundled model + a random 256x4 model, writes the table
    python -m benchmarks.structured --out benchmarks/results/structured.md --repeats 3

Workloads (each run batched through LLM.generate / LLM.chat, constrained and unconstrained interleaved, the median
of --repeats runs reported):
- bundled: the trained sort/reverse model on 32 held-out problems at its default schedule (16 steps for 16
  tokens) and with threshold 0.9; constrained = its answer format as a regex `[0-9]( [0-9]){1,7}`; accuracy too;
- random: a random-weight 256x4 LLaDA (vocab 2048) on 8 prompts, 64 tokens, blocks of 32, 64 steps or threshold 0.9;
  constrained = a JSON schema (object with a string, an integer range, an enum and a bounded array). Its
  unconstrained output is gibberish until an EOS (if any); the constrained one is valid JSON, then EOS.
Columns: wall seconds, generated tokens (before EOS) per second, denoising steps, tokens per forward
(tokens committed / steps, over the batch), the constraint's own host time per constrained request-step
(StepConstraints.consume + apply, timed by wrapping them) and the same per token the constrained requests committed.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

from engine import LLM, SamplingParams
from engine.bundled import DEFAULT_MODEL_DIR, task
from engine.constraints import decoder
from engine.random_checkpoint import write_random_checkpoint

REGEX = r"[0-9]( [0-9]){1,7}"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["name", "age", "role", "tags"], "additionalProperties": False}


class ConstraintTimer:
    """Wraps StepConstraints.consume/apply to time the constraint's host work and count its request-steps."""

    def __init__(self) -> None:
        self.seconds, self.row_steps, self.tokens = 0.0, 0, 0
        self._consume, self._apply = decoder.StepConstraints.consume, decoder.StepConstraints.apply
        timer = self

        def consume(sc: Any, *a: Any) -> None:
            t = time.perf_counter()
            timer._consume(sc, *a)
            timer.seconds += time.perf_counter() - t

        def apply(sc: Any, *a: Any) -> Any:
            t = time.perf_counter()
            out = timer._apply(sc, *a)
            timer.seconds += time.perf_counter() - t
            timer.row_steps += len(sc.rows)
            timer.tokens += sum(len(r.tokens) for r in sc.rows)
            return out

        decoder.StepConstraints.consume, decoder.StepConstraints.apply = consume, apply

    def reset(self) -> None:
        self.seconds, self.row_steps, self.tokens = 0.0, 0, 0


def run(llm: LLM, prompts: list[Any], params: SamplingParams, chat: bool, timer: ConstraintTimer
        ) -> dict[str, float]:
    timer.reset()
    t0 = time.perf_counter()
    outs = llm.chat(prompts, params) if chat else llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    steps = sum(o.stats.steps for o in outs)
    committed = sum(o.stats.tokens_committed for o in outs)
    return {"wall": wall, "tok_s": tokens / wall, "steps": steps, "tpf": committed / max(steps, 1),
            "ms_per_step": 1000 * timer.seconds / timer.row_steps if timer.row_steps else 0.0,
            "us_per_token": 1e6 * timer.seconds / timer.tokens if timer.tokens else 0.0,
            "outs": outs}


def bench(name: str, llm: LLM, prompts: list[Any], configs: dict[str, dict[str, Any]], constraint: dict[str, Any],
          chat: bool, repeats: int, timer: ConstraintTimer, check: Any = None) -> list[str]:
    rows = []
    for cname, opts in configs.items():
        res: dict[str, list[dict[str, float]]] = {"unconstrained": [], "constrained": []}
        for _ in range(repeats):  # interleaved, so machine load hits both alike
            res["unconstrained"].append(run(llm, prompts, SamplingParams(**opts), chat, timer))
            res["constrained"].append(run(llm, prompts, SamplingParams(**opts, structured_outputs=constraint),
                                          chat, timer))
        for kind, runs in res.items():
            med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "tok_s", "steps", "tpf", "ms_per_step",
                                                                    "us_per_token")}
            extra = f"{sum(check(i, o) for i, o in enumerate(runs[0]['outs']))}/{len(prompts)}" if check else "-"
            rows.append(f"| {name} | {cname} | {kind} | {med['wall']:.2f} | {med['tok_s']:.1f} | {med['steps']:.0f} "
                        f"| {med['tpf']:.2f} | {med['ms_per_step']:.2f} | {med['us_per_token']:.0f} | {extra} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    timer = ConstraintTimer()
    header = ["| model | schedule | decoding | wall s | tok/s | steps | tokens/forward | constraint ms per "
              "request-step | constraint µs per token | accuracy / valid |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows: list[str] = []

    llm = LLM(DEFAULT_MODEL_DIR, dtype="float32")
    probs = task.make_problems(32, seed=3, split="held_out")
    convs = [task.messages_for(q) for q, _ in probs]

    def bundled_check(i: int, out: Any) -> bool:
        return task.check(probs[i][0], out.text)

    rows += bench("bundled", llm, convs, {"default (16 steps)": {}, "threshold 0.9": {"threshold": 0.9}},
                  {"regex": REGEX}, True, args.repeats, timer, bundled_check)
    llm.shutdown()

    with tempfile.TemporaryDirectory() as d:
        path = write_random_checkpoint(Path(d) / "rand", "llada", hidden_size=256, num_layers=4, num_heads=4,
                                       intermediate_size=512, vocab_size=2048, seed=5)
        llm = LLM(path, dtype="float32")
        rng = random.Random(0)
        cfg = llm.model.config
        banned = {cfg.mask_id, *cfg.stop_ids}
        prompts = [[t for t in (rng.randrange(cfg.vocab_size) for _ in range(40)) if t not in banned][:32]
                   for _ in range(8)]
        def valid(_: int, out: Any) -> bool:
            try:
                jsonschema.validate(json.loads(out.text), SCHEMA)
                return out.finish_reason == "stop"
            except ValueError:
                return False
            except jsonschema.ValidationError:
                return False

        base = {"max_tokens": 64, "block_length": 32}
        rows += bench("random 256x4", llm, prompts, {"64 steps": {**base, "steps": 64},
                                                     "threshold 0.9": {**base, "threshold": 0.9}},
                      {"json": SCHEMA}, False, args.repeats, timer, valid)
        llm.shutdown()
    table = "\n".join(header + rows) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
