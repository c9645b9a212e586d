"""kernels/moe.py: the device-side expert alignment and the Triton fused MoE against moe_ref."""
from __future__ import annotations

import pytest
import torch

from kernels.moe import align_by_expert, fused_moe, fused_moe_triton, moe_ref, route
from tests.kernels.tolerance import DEVICE, DTYPES, assert_within_rule


def moe_case(T: int, E: int, k: int, D: int, inter: int, renormalize: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w_gate = torch.randn(E, inter, D, generator=g) / D ** 0.5
    w_up = torch.randn(E, inter, D, generator=g) / D ** 0.5
    w_down = torch.randn(E, D, inter, generator=g) / inter ** 0.5
    weights, ids = route(torch.randn(T, E, generator=g) * 2, k, renormalize)
    return {n: t.to(DEVICE) for n, t in dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, weights=weights,
                                            ids=ids).items()}


def cast(c: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    return [c[n].to(dtype) for n in ("x", "w_gate", "w_up", "w_down", "weights")] + [c["ids"]]


# (tokens, experts, top-k, hidden, expert width, renormalise)
CASES = [
    pytest.param(1, 64, 8, 32, 24, False, id="llada-moe-routing-1-token"),
    pytest.param(33, 64, 8, 48, 40, False, id="llada-moe-routing-33-tokens", marks=pytest.mark.slow),
    pytest.param(13, 128, 8, 16, 24, True, id="rnd1-routing-13-tokens", marks=pytest.mark.slow),
    pytest.param(97, 6, 3, 32, 20, True, id="few-experts-many-tokens"),
    pytest.param(7, 5, 2, 48, 72, False, id="expert-width-over-one-tile"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,k,D,inter,renorm", CASES)
def test_fused_moe_triton_matches_reference(T, E, k, D, inter, renorm, dtype):
    c = moe_case(T, E, k, D, inter, renorm)
    out = fused_moe_triton(*cast(c, dtype))
    assert out.dtype == dtype and out.shape == (T, D)
    assert_within_rule(out, moe_ref(*cast(c, torch.float32)), moe_ref(*cast(c, dtype)), dtype, "fused moe")


def test_torch_fused_moe_matches_reference():
    c = moe_case(29, 7, 3, 24, 16, True, seed=4)
    torch.testing.assert_close(fused_moe(*cast(c, torch.float32)), moe_ref(*cast(c, torch.float32)))


@pytest.mark.parametrize("T,E,k,block_m", [(1, 64, 8, 16), (41, 8, 2, 16), (200, 5, 3, 64), (3, 128, 8, 32)])
def test_align_by_expert_groups_and_pads_every_assignment(T, E, k, block_m):
    g = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEVICE)  # [T, k] distinct per token
    sorted_ids, block_expert, num_padded = align_by_expert(ids, E, block_m)
    n, used = T * k, int(num_padded)
    counts = torch.bincount(ids.flatten().cpu(), minlength=E)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert used % block_m == 0 and sorted_ids.numel() >= used and sorted_ids.numel() % block_m == 0
    sid = sorted_ids.cpu().long()
    real = sid[:used][sid[:used] < n]
    assert sorted(real.tolist()) == list(range(n)), "every assignment exactly once"
    assert (sid[used:] == n).all(), "past the end only sentinels"
    flat = ids.flatten().cpu()
    tile_expert = block_expert.cpu().long()[torch.arange(used) // block_m]  # [used]
    is_real = sid[:used] < n
    assert torch.equal(flat[sid[:used][is_real]], tile_expert[is_real]), "each id sits in a tile of its expert"
    assert (tile_expert.diff() >= 0).all(), "tiles ordered by expert"
    # within one expert the assignments keep their original order (stable sort)
    for e in range(E):
        run = sid[:used][is_real & (tile_expert == e)]
        assert (run.diff() > 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fused_moe_under_cuda_graph_capture():
    """No host sync anywhere: the whole MoE can be captured."""
    c = cast(moe_case(33, 64, 8, 256, 128, False), torch.bfloat16)
    eager = fused_moe_triton(*c)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe_triton(*c)
    graph.replay()
    torch.testing.assert_close(captured, eager)
