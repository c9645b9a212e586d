"""benchmarks/serve.py's statistics and parsing, against independent references (numpy percentiles, a real
prometheus_client exposition, the Poisson process's known moments)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from benchmarks import serve


def test_percentiles_and_summary_match_numpy():
    rng = random.Random(3)
    results = []
    for _ in range(37):
        ttft = rng.uniform(0.01, 0.5)
        itls = [rng.uniform(0.001, 0.1) for _ in range(rng.randint(0, 5))]
        n = rng.randint(1, 40)
        results.append(serve.RequestResult(success=True, ttft=ttft, itls=itls, e2el=ttft + sum(itls) + 0.001,
                                           output_tokens=n, prompt_tokens=rng.randint(1, 9)))
    results.append(serve.RequestResult(success=False, error="boom", e2el=0.2))
    s = serve.summarize(results, 4.0, [50, 90, 99])
    ok = results[:-1]
    ttft_ms = np.array([r.ttft for r in ok]) * 1000
    itl_ms = np.array([x for r in ok for x in r.itls]) * 1000
    tpot_ms = np.array([(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]) * 1000
    for p in (50, 90, 99):
        assert s[f"p{p}_ttft_ms"] == pytest.approx(np.percentile(ttft_ms, p))
        assert s[f"p{p}_itl_ms"] == pytest.approx(np.percentile(itl_ms, p))
    assert s["mean_tpot_ms"] == pytest.approx(tpot_ms.mean()) and s["std_ttft_ms"] == pytest.approx(ttft_ms.std())
    assert s["median_e2el_ms"] == pytest.approx(np.median([r.e2el * 1000 for r in ok]))
    assert s["completed"] == 37 and s["failed"] == 1
    assert s["output_throughput"] == pytest.approx(sum(r.output_tokens for r in ok) / 4.0)
    assert s["request_throughput"] == pytest.approx(37 / 4.0)


def test_poisson_arrivals_have_the_requested_rate():
    gaps = serve.arrival_gaps(20000, 8.0, seed=1)
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    assert mean == pytest.approx(1 / 8, rel=0.03) and math.sqrt(var) == pytest.approx(1 / 8, rel=0.05)  # exponential
    assert serve.arrival_gaps(5, float("inf"), 0) == [0.0] * 5


def test_counters_parsed_from_a_prometheus_exposition():
    reg = CollectorRegistry()
    steps = Counter("unmask:denoising_steps", "steps", ["model_name"], registry=reg)
    committed = Counter("unmask:tokens_committed", "tokens", ["model_name"], registry=reg)
    steps.labels("a").inc(40)
    steps.labels("b").inc(2)
    committed.labels("a").inc(7.5)
    parsed = serve.parse_counters(generate_latest(reg).decode())
    assert parsed == {"denoising_steps": 42.0, "tokens_committed": 7.5}
    d = serve.diffusion_section({"denoising_steps": 2.0, "tokens_committed": 1.5}, parsed, 2.0)
    assert d["denoising_steps"] == 40 and d["committed_per_step"] == pytest.approx(6 / 40)
    assert d["committed_tokens_per_s"] == pytest.approx(3.0)


def test_random_requests_respect_lengths_and_token_range():
    reqs = serve.random_requests(200, 40, 16, 0.25, (5, 50), seed=2)
    lens = [r.input_len for r in reqs]
    assert min(lens) >= 30 and max(lens) <= 50 and len(set(lens)) > 10
    assert all(5 <= t < 50 for r in reqs for t in r.prompt) and all(len(r.prompt) == r.input_len for r in reqs)
    assert serve.random_requests(3, 40, 16, 0.25, (5, 50), seed=2)[0].prompt == reqs[0].prompt  # seeded


def test_task_requests_are_held_out_problems():
    task = serve.load_task_module()
    reqs = serve.task_requests(20, None, seed=0)
    assert all(task.split_of(r.question) == "held_out" for r in reqs)
    assert reqs[0].messages == task.messages_for(reqs[0].question)


def test_shared_prefix_requests_share_their_system_prompts():
    reqs = serve.shared_prefix_requests(9, 24, 2, 6, 16, 0.5, (5, 50), seed=4)
    heads = [tuple(r.prompt[:24]) for r in reqs]
    assert heads[0::2] == [heads[0]] * 5 and heads[1::2] == [heads[1]] * 4 and heads[0] != heads[1]
    tails = [r.prompt[24:] for r in reqs]
    assert all(3 <= len(t) <= 9 for t in tails) and len({tuple(t) for t in tails}) == 9
    assert all(len(r.prompt) == r.input_len and r.max_tokens == 16 for r in reqs)
    assert all(5 <= t < 50 for r in reqs for t in r.prompt)
    args = serve.parse_args(["--dataset-name", "shared-prefix", "--shared-prefix-len", "24", "--num-prompts", "3",
                             "--num-warmups", "0", "--random-input-len", "6"])
    assert [len(r.prompt) for r in serve.make_requests(args)] == [30, 30, 30]


def test_prefix_cache_counters_and_hit_rate():
    reg = CollectorRegistry()
    q = Counter("unmask:prefix_cache_queries", "q", ["model_name"], registry=reg)
    h = Counter("unmask:prefix_cache_hits", "h", ["model_name"], registry=reg)
    q.labels("m").inc(300)
    h.labels("m").inc(120)
    parsed = serve.parse_counters(generate_latest(reg).decode())
    assert parsed == {"prefix_cache_queries": 300.0, "prefix_cache_hits": 120.0}
    d = serve.diffusion_section({"prefix_cache_queries": 100.0, "prefix_cache_hits": 20.0}, parsed, 1.0)
    assert d["prefix_cache_hit_rate"] == pytest.approx(100 / 200)
