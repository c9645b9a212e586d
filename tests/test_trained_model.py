"""The bundled trained model: task accuracy with the engine's own sampler (issue targets: >= 95% exact at
steps = max_tokens; threshold 0.9 + dual cache within 1 point of cache="none")."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.bundled import DEFAULT_MODEL_DIR, task

pytestmark = pytest.mark.slow
N = 200


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL_DIR, max_num_seqs=N)


@pytest.fixture(scope="module")
def problems():
    return task.make_problems(N, seed=2024, split="held_out")


def accuracy(llm: LLM, problems, params: SamplingParams) -> tuple[float, float]:
    outs = llm.chat([task.messages_for(q) for q, _ in problems], params)
    correct = sum(task.check(q, o.text) for (q, _), o in zip(problems, outs))
    tpf = sum(o.tokens_per_forward for o in outs) / len(outs)
    return correct / len(problems), tpf


def test_held_out_accuracy_at_full_steps_and_fewer(llm, problems):
    gen = llm.defaults.max_tokens
    assert llm.defaults.steps == gen, "generation_config.json should default to one token per step"
    full, _ = accuracy(llm, problems, SamplingParams(remasking="low_confidence", steps=gen))
    half, _ = accuracy(llm, problems, SamplingParams(remasking="low_confidence", steps=gen // 2))
    quarter, _ = accuracy(llm, problems, SamplingParams(remasking="low_confidence", steps=gen // 4))
    print(f"\nheld-out exact accuracy (n={N}, gen {gen}): steps={gen}: {full:.1%}  steps={gen // 2}: {half:.1%}  "
          f"steps={gen // 4}: {quarter:.1%}")
    assert full >= 0.95


def test_threshold_dual_keeps_accuracy(llm, problems):
    gen = llm.defaults.max_tokens
    base, _ = accuracy(llm, problems, SamplingParams(steps=gen, cache="none"))
    fast, tpf = accuracy(llm, problems, SamplingParams(steps=gen, cache="dual", threshold=0.9))
    print(f"\ncache=none {base:.1%}; dual + threshold 0.9: {fast:.1%} at {tpf:.2f} tokens per forward")
    assert fast >= base - 0.01


def test_answers_are_real_text(llm):
    out = llm.chat(task.messages_for("sort 3 1 2"), SamplingParams())[0]
    assert out.finish_reason == "stop" and out.text.strip() == "1 2 3"
