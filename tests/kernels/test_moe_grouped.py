"""LLaDA2's MoE on the kernels: the sigmoid / expert-bias / group-limited router (torch and Triton) against a
per-token plain-Python reading of the published gate, and shared experts fused into the grouped GEMMs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.moe import append_shared, fused_moe_triton, moe_ref, route_grouped, route_grouped_triton, split_shared
from tests.kernels.tolerance import DEVICE, DTYPES, assert_within_rule


def gate_reference(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                   scaling: float) -> tuple[list[list[float]], list[list[int]]]:
    """The gate read literally, one token at a time: sigmoid scores; selection on score + bias; groups of
    E / n_group contiguous experts scored by their two best biased scores; the topk_group best groups kept; the
    top_k best biased experts among them; weights = their unbiased scores / sum (top_k > 1) * scaling."""
    E = logits.shape[1]
    per = E // n_group
    all_w, all_ids = [], []
    for row in logits.double().tolist():
        s = [1 / (1 + math.exp(-x)) for x in row]
        b = [s[e] + float(bias[e]) for e in range(E)]
        gs = [sum(sorted(b[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -gs[g])[:topk_group]
        chosen = sorted([e for e in range(E) if e // per in kept], key=lambda e: -b[e])[:top_k]
        w = [s[e] for e in chosen]
        total = sum(w) if top_k > 1 else 1.0
        all_w.append([x / total * scaling for x in w])
        all_ids.append(chosen)
    return all_w, all_ids


def router_case(T: int, E: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.5  # large enough to change which experts win
    return logits.to(DEVICE), bias.to(DEVICE)


# (tokens, experts, top-k, groups, groups kept, scaling)
ROUTER_CASES = [
    pytest.param(5, 256, 8, 8, 4, 2.5, id="llada2-mini-config"),
    pytest.param(17, 12, 3, 4, 2, 1.7, id="odd-3-experts-per-group"),
    pytest.param(9, 6, 2, 1, 1, 1.0, id="one-group"),
    pytest.param(11, 10, 1, 5, 3, 2.0, id="top-1-no-renormalisation"),
    pytest.param(7, 40, 6, 8, 3, 0.5, id="5-per-group-pad-to-8"),
]


@pytest.mark.parametrize("T,E,k,G,Gk,scaling", ROUTER_CASES)
@pytest.mark.parametrize("impl", [route_grouped, route_grouped_triton], ids=["torch", "triton"])
def test_grouped_router_matches_the_published_gate(impl, T, E, k, G, Gk, scaling):
    logits, bias = router_case(T, E, seed=E + k)
    weights, ids = impl(logits, bias, k, G, Gk, scaling)
    want_w, want_ids = gate_reference(logits.cpu(), bias.cpu(), k, G, Gk, scaling)
    assert weights.dtype == torch.float32 and ids.shape == (T, k)
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in want_ids]
    got = [dict(zip(i, w)) for i, w in zip(ids.tolist(), weights.tolist())]
    want = [dict(zip(i, w)) for i, w in zip(want_ids, want_w)]
    for g_row, w_row in zip(got, want):
        for e in w_row:
            assert abs(g_row[e] - w_row[e]) <= 1e-6 * scaling


def test_bias_changes_the_selection_not_the_weights():
    """The bias is what makes the groups and experts win, but the weights are the unbiased scores."""
    logits, _ = router_case(6, 16, seed=1)
    bias = torch.zeros(16, device=DEVICE)
    bias[13] = 10.0  # expert 13 always chosen, its group always kept
    for impl in (route_grouped, route_grouped_triton):
        w, ids = impl(logits, bias, 4, 4, 2, 1.0)
        assert (ids == 13).any(1).all()
        s = torch.sigmoid(logits.float())
        assert torch.allclose(w, s.gather(1, ids) / s.gather(1, ids).sum(1, keepdim=True), atol=1e-6)


def test_bad_group_settings_are_refused():
    logits, bias = router_case(2, 12, seed=0)
    with pytest.raises(ValueError, match="n_group"):
        route_grouped(logits, bias, 2, 5, 2, 1.0)
    with pytest.raises(ValueError, match="two best"):
        route_grouped_triton(logits, bias, 2, 12, 2, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        route_grouped(logits, bias, 7, 4, 2, 1.0)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


# (tokens, routed experts, top-k, groups, groups kept, hidden, expert width, shared experts)
SHARED_CASES = [
    pytest.param(13, 16, 4, 4, 2, 32, 24, 1, id="one-shared-expert"),
    pytest.param(5, 12, 3, 4, 2, 48, 20, 2, id="two-shared-experts-odd-dims"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,k,G,Gk,D,inter,n_shared", SHARED_CASES)
def test_fused_moe_with_shared_experts_matches_reference(T, E, k, G, Gk, D, inter, n_shared, dtype):
    """routed (group-limited router, scaling 2.5) + shared SwiGLU of width n * I, all in one fused MoE call."""
    g = torch.Generator().manual_seed(T * E)
    x = torch.randn(T, D, generator=g)
    w_gate, w_up = (torch.randn(E, inter, D, generator=g) / D ** 0.5 for _ in range(2))
    w_down = torch.randn(E, D, inter, generator=g) / inter ** 0.5
    s_gate, s_up = (torch.randn(n_shared * inter, D, generator=g) / D ** 0.5 for _ in range(2))
    s_down = torch.randn(D, n_shared * inter, generator=g) / (n_shared * inter) ** 0.5
    logits, bias = torch.randn(T, E, generator=g) * 2, torch.randn(E, generator=g) * 0.5
    weights, ids = route_grouped(logits, bias, k, G, Gk, 2.5)

    def reference(dt: torch.dtype) -> torch.Tensor:
        xs = x.to(dt)
        routed = moe_ref(xs, w_gate.to(dt), w_up.to(dt), w_down.to(dt), weights.to(dt), ids)
        return routed + swiglu(xs, s_gate.to(dt), s_up.to(dt), s_down.to(dt))

    cg, cu, cd = split_shared(s_gate, s_up, s_down, inter)
    all_gate, all_up, all_down = (torch.cat([a, b]) for a, b in ((w_gate, cg), (w_up, cu), (w_down, cd)))
    ext_w, ext_ids = append_shared(weights, ids, E, n_shared)
    out = fused_moe_triton(*(t.to(dtype).to(DEVICE) for t in (x, all_gate, all_up, all_down, ext_w)),
                           ext_ids.to(DEVICE))
    assert out.shape == (T, D) and out.dtype == dtype
    assert_within_rule(out, reference(torch.float32).to(DEVICE), reference(dtype).to(DEVICE), dtype,
                       "fused moe + shared experts")


def test_split_shared_is_exact_in_fp32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 16, generator=g, dtype=torch.float64)
    gate, up = torch.randn(30, 16, generator=g, dtype=torch.float64), torch.randn(30, 16, generator=g,
                                                                                  dtype=torch.float64)
    down = torch.randn(16, 30, generator=g, dtype=torch.float64)
    cg, cu, cd = split_shared(gate, up, down, 10)
    assert cg.shape == (3, 10, 16) and cd.shape == (3, 16, 10)
    torch.testing.assert_close(sum(swiglu(x, cg[i], cu[i], cd[i]) for i in range(3)), swiglu(x, gate, up, down))
