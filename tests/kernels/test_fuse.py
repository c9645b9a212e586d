"""Load-time q/k/v and gate/up fusion: same logits (to rounding) and the same tokens as the separate projections."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.bundled import task
from engine.model.fuse import fuse_projections


@pytest.mark.parametrize("family", ["dream", "llada_moe"])
def test_fused_projections_same_logits(make_checkpoint, family):
    """Dream: q/k/v biases and GQA; LLaDA-MoE: QK-norm, experts left alone."""
    plain, fused = LLM(make_checkpoint(family)), LLM(make_checkpoint(family))
    fuse_projections(fused.model.net)
    attn = fused.model.net.layers[0].attn
    assert attn.qkv_proj is not None and attn.q_proj is None
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused.model.logits(ids), plain.model.logits(ids), rtol=1e-5, atol=1e-5)


def test_fused_projections_same_tokens_on_the_bundled_model():
    plain, fused = LLM(page_size=4), LLM(page_size=4)
    fuse_projections(fused.model.net)
    assert fused.model.net.layers[0].mlp.gate_up_proj is not None
    msgs = [task.messages_for(p) for p in ("sort 9 4 6 1", "reverse 2 8 3")]
    params = SamplingParams(cache="dual", threshold=0.9)
    assert [o.token_ids for o in fused.chat(msgs, params)] == [o.token_ids for o in plain.chat(msgs, params)]
