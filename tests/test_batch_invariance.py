"""Batch invariance: at temperature 0 a request's tokens do not depend on what it is batched with (other
requests' steps, block lengths, thresholds, CFG, prompt lengths, cache modes) nor on when it joins a running
batch, in every cache mode, for a dense family (LLaDA) and a shifted one (Dream).

Tokens, not logits: nothing in the runner depends on the batch, but on CPU float32 the kernels do at the last bit
(a Linear's row differs between 1, 2-3 and 7+ rows in the matmul; SDPA's output moves ~2e-7 with the keys'
padding), so logits are not bitwise batch invariant; tokens agree unless two candidates tie within that noise.
On CPU the runner now bounds those shapes (engine/shape_buckets.py: bucketed Linear rows, SDPA per length-bucket
group), which is what makes bfloat16 (dtype auto on CPUs with native bf16), where that noise is ~1e-2, invariant
too: the bf16 test below failed before it (greedy, prefix cache: token 4 of 8 differed when batched)."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams

CACHES = ("none", "prefix", "dual")


@pytest.fixture(scope="module")
def llms(make_checkpoint):
    return {fam: LLM(make_checkpoint(fam), dtype="float32", kv_cache_memory=1 << 23, page_size=4)
            for fam in ("llada", "dream")}


def random_prompt(rng: random.Random, llm: LLM, n: int) -> list[int]:
    cfg = llm.model.config
    banned = {cfg.mask_id, *cfg.stop_ids}
    return [t for t in (rng.randrange(cfg.vocab_size) for _ in range(3 * n)) if t not in banned][:n]


def random_params(rng: random.Random, family: str, cache: str, temperature: float = 0.0) -> SamplingParams:
    block = rng.choice([2, 4, 5, 8])
    gen = block * rng.randint(1, 3) - rng.choice([0, 0, 1])
    adaptive = rng.random() < 0.35
    remasking = rng.choice(["low_confidence", "margin", "entropy"] + (["origin"] if family == "dream" else []))
    if adaptive and remasking == "origin":
        remasking = "low_confidence"
    kw = dict(max_tokens=gen, block_length=block, steps=rng.choice([gen, max(gen // 2, 1), gen + 3]),
              remasking=remasking, cache=cache, cfg_scale=rng.choice([0.0, 0.0, 0.0, 1.5]),
              temperature=temperature, seed=rng.randrange(1 << 30), ignore_eos=rng.random() < 0.7)
    if adaptive and rng.random() < 0.6:
        kw["threshold"] = rng.choice([0.3, 0.9])
    elif adaptive:
        kw["factor"] = rng.choice([0.5, 1.0])
    if family == "dream" and remasking != "origin" and rng.random() < 0.5:
        kw["algorithm"] = "llada"
    return SamplingParams(**kw)


def run_batched(llm: LLM, target: tuple[list[int], SamplingParams], others: list[tuple[list[int], SamplingParams]],
                rng: random.Random) -> tuple[list[int], int]:
    """Run target among others, which join before it, with it, and while it runs. Returns its tokens and the
    engine steps it shared with at least one other request."""
    eng, resolve = llm.engine, lambda p: p.resolve(llm.defaults)
    arrivals = sorted((rng.randint(0, 6), i) for i in range(len(others)))
    t_arrival = rng.randint(0, 4)
    out, shared, step_no, added = None, 0, 0, set()
    while out is None:
        if step_no == t_arrival:
            eng.add_request("target", target[0], resolve(target[1]))
        for at, i in arrivals:
            if at == step_no:
                eng.add_request(f"other-{i}", others[i][0], resolve(others[i][1]))
                added.add(i)
        shared += "target" in eng.requests and len(eng.requests) > 1
        for o in eng.step():
            if o.request_id == "target":
                out = o
        step_no += 1
    for i in added:
        eng.abort(f"other-{i}")
    assert eng.allocator.num_used == 0 and not eng.has_unfinished()
    return out.token_ids, shared


def assert_alone_equals_batched(llm: LLM, target: tuple, others: list[tuple], rng: random.Random, trial: int,
                                all_at_once: bool = True) -> int:
    """The target (prompt, params) generates the same tokens alone as batched with `others`: all at once through
    generate at a random position (all_at_once), and joining a running batch in which the others arrive before,
    with and after it. Returns the steps the target shared with others."""
    alone = llm.generate([target[0]], target[1])[0].token_ids
    if all_at_once:
        pos = rng.randint(0, len(others))
        batch = others[:pos] + [target] + others[pos:]
        together = llm.generate([p for p, _ in batch], [sp for _, sp in batch])[pos].token_ids
        assert together == alone, (trial, target)
    joined, shared = run_batched(llm, target, others, rng)
    assert joined == alone, (trial, target)
    return shared


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", CACHES)
def test_tokens_do_not_depend_on_the_batch(llms, family, cache):
    llm = llms[family]
    rng = random.Random(f"{family}-{cache}")
    shared_total = 0
    for trial in range(6):
        target = (random_prompt(rng, llm, rng.randint(1, 24)), random_params(rng, family, cache))
        others = [(random_prompt(rng, llm, rng.randint(1, 40)), random_params(rng, family, rng.choice(CACHES)))
                  for _ in range(rng.randint(1, 5))]
        shared_total += assert_alone_equals_batched(llm, target, others, rng, trial)
    assert shared_total > 0


def test_seeded_sampling_does_not_depend_on_the_batch(llms):
    llm, rng = llms["llada"], random.Random(3)
    for trial in range(4):
        cache = CACHES[trial % 3]
        target = (random_prompt(rng, llm, rng.randint(1, 20)), random_params(rng, "llada", cache, temperature=0.8))
        others = [(random_prompt(rng, llm, rng.randint(1, 30)),
                   random_params(rng, "llada", rng.choice(CACHES), temperature=rng.choice([0.0, 1.0])))
                  for _ in range(3)]
        assert_alone_equals_batched(llm, target, others, rng, trial, all_at_once=False)


@pytest.fixture(scope="module")
def llms_bf16(make_checkpoint):
    return {fam: LLM(make_checkpoint(fam), dtype="bfloat16", kv_cache_memory=1 << 23, page_size=4)
            for fam in ("llada", "dream")}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bfloat16_tokens_do_not_depend_on_the_batch(llms_bf16, family):
    """The same checks in bfloat16: greedy and seeded sampling at temperature 0.8, every cache mode, the target
    batched all at once and joining a running batch."""
    bf16_trials(llms_bf16[family], family, random.Random(f"bf16-{family}"))


def bf16_trials(llm: LLM, family: str, rng: random.Random) -> None:
    """Every cache mode x greedy / seeded at 0.8: a target alone equals it batched with 2-4 random others."""
    for trial, (cache, temperature) in enumerate((c, t) for c in CACHES for t in (0.0, 0.8)):
        target = (random_prompt(rng, llm, rng.randint(1, 24)), random_params(rng, family, cache, temperature))
        others = [(random_prompt(rng, llm, rng.randint(1, 40)),
                   random_params(rng, family, rng.choice(CACHES), rng.choice([0.0, 1.0])))
                  for _ in range(rng.randint(2, 4))]
        assert_alone_equals_batched(llm, target, others, rng, trial)


@pytest.fixture(scope="module")
def llms_bf16_kernel(make_checkpoint):
    """Head dims the bf16 CPU attention kernel takes (multiples of 16; the tiny ones above are 12 and 8)."""
    dims = {"llada": dict(hidden_size=64, num_heads=4, num_kv_heads=4),  # head dim 16
            "dream": dict(hidden_size=96, num_heads=3, num_kv_heads=1)}  # head dim 32, one kv head
    return {fam: LLM(make_checkpoint(fam, **d), dtype="bfloat16", kv_cache_memory=1 << 23, page_size=4)
            for fam, d in dims.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bfloat16_kernel_attention_tokens_do_not_depend_on_the_batch(llms_bf16_kernel, family, monkeypatch):
    """The bf16 checks again at head dims where attention runs through the C kernel on AVX512-BF16 CPUs
    (engine/model/attention_cpu.py; SDPA elsewhere): every cache mode, greedy and seeded sampling."""
    import engine.model.attention as attention
    from engine.model import attention_cpu
    ran = []

    def spy(*args, **kwargs):
        out = attention_cpu.cpu_attention(*args, **kwargs)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(attention, "cpu_attention", spy)
    bf16_trials(llms_bf16_kernel[family], family, random.Random(f"bf16-kernel-{family}"))
    assert ran and all(ran) == attention_cpu.cpu_kernel.bf16_dot()  # the kernel ran where the CPU has it
