"""The block-pass graph path (padded static buffers, bucketed rows) gives the same tokens as the plain forward.

On CPU it runs uncaptured (capture=False) through the interpreted Triton kernels; on CUDA the same test captures."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.block_graphs import BlockGraphs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_block_graphs_same_tokens(make_checkpoint, family):
    """Three requests (padded to a bucket of 4 rows) with different prompt lengths; Dream shifts (L = block + 1)."""
    plain = LLM(make_checkpoint(family), device=DEVICE, kernels="triton", page_size=4)
    graphed = LLM(make_checkpoint(family), device=DEVICE, kernels="triton", page_size=4)
    plain.engine.runner.graphs = None  # on CUDA the runner would capture by default
    runner = graphed.engine.runner
    runner.graphs = BlockGraphs(runner.net, runner.pool, runner.device, capture=DEVICE == "cuda")
    prompts = [[5, 17, 23, 9, 41, 2, 7], [11, 3], [8, 8, 30, 1]]
    params = SamplingParams(max_tokens=8, steps=4, block_length=4, cache="dual", ignore_eos=True, seed=2)
    want = plain.generate(prompts, params)
    got = graphed.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert runner.graphs.replays > 0 and list(runner.graphs.graphs)[0][0] == 4  # the padded bucket was used


def test_eligibility():
    assert BlockGraphs.eligible([False, False], [5, 5])
    assert not BlockGraphs.eligible([False, True], [5, 5])  # a refresh pass in the batch
    assert not BlockGraphs.eligible([False, False], [5, 9])  # mixed query lengths (prefix cache suffixes)
