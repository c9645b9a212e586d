"""Greedy decoding from vocabulary shards: candidates_from_stats over per-shard statistics picks the same tokens
and the same scores (float64 vs the reference's float32 softmax) as `candidates` over the full logits."""
from __future__ import annotations

import pytest
import torch

from engine.decoding.candidates import CandidateInputs, candidates, candidates_from_stats, shard_stats
from engine.decoding.noise import STREAM_GUMBEL, row_keys
from engine.model.parallel import Shard


def inputs(n: int, codes: list[int], mask_id: int) -> CandidateInputs:
    g = torch.Generator().manual_seed(1)
    score = torch.tensor(codes)[torch.randint(0, len(codes), (n,), generator=g)]
    keys = row_keys(torch.full((n,), 7), torch.zeros(n, dtype=torch.long), torch.arange(n), STREAM_GUMBEL)
    return CandidateInputs(torch.zeros(n), torch.zeros(n, dtype=torch.long), torch.ones(n), score,
                           torch.rand(n, generator=g) < 0.5, keys, mask_id, any_sampling=False, any_filter=False,
                           codes=frozenset(codes), any_tempered=True)


def sharded(logits: torch.Tensor, ranks: int, mask_id: int) -> torch.Tensor:
    V = logits.shape[1]
    parts = []
    for r in range(ranks):
        v0, v1 = Shard(r, ranks).vocab(V)
        chunk = Shard(r, ranks).vocab_chunk(V)
        local = torch.zeros(logits.shape[0], chunk)  # padded columns are zeros, as the lm_head's padding rows give
        local[:, :v1 - v0] = logits[:, v0:v1]
        parts.append(shard_stats(local[:, :v1 - v0], v0, mask_id))
    return torch.stack(parts)


@pytest.mark.parametrize("ranks, V, mask_id", [(2, 211, 150), (3, 157, 2), (4, 64, 63), (2, 9, 0)])
def test_matches_full_logits(ranks, V, mask_id):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(37, V, generator=g) * 3
    logits[:, mask_id] += 4  # the mask is often the largest logit, as in real models: excluded from candidates
    logits[0, 5] = logits[0, V - 1] = logits[0].max() + 1  # a tie across shards: the lower id wins, as argmax
    inp = inputs(37, [0, 1, 2, 3], mask_id)
    x0, score, conf = candidates(logits.clone(), inp)
    x0s, score_s, conf_s = candidates_from_stats(sharded(logits, ranks, mask_id), inp)
    assert torch.equal(x0, x0s) and x0[0] == (5 if mask_id != 5 else V - 1)
    assert (x0 != mask_id).all()
    torch.testing.assert_close(score_s, score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conf_s, conf, rtol=1e-5, atol=1e-6)
    # not vacuous: the statistics of a single shard (the others dropped) give other scores
    _, wrong, _ = candidates_from_stats(sharded(logits, ranks, mask_id)[:1], inp)
    assert not torch.allclose(wrong, score, rtol=1e-3, atol=1e-4)


def test_run_batch_statistics_match_its_logits(make_checkpoint):
    """run_batch(vocab_stats=True) on one rank: the statistics decode like the logits it returns otherwise
    (CFG combined in both)."""
    from engine import load_model
    from engine.forward_batch import ForwardBatch, run_batch
    model = load_model(make_checkpoint("llada"))
    V, mask = model.config.vocab_size, model.config.mask_id
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (2 * 11,), generator=g)
    batch = ForwardBatch(tokens, torch.arange(11).repeat(2), [11, 11], max_pos=10,
                         logit_rows=torch.tensor([1, 4, 5, 9]), twin_rows=torch.tensor([15, 20]),
                         cfg_sel=torch.tensor([0, 3]), cfg_w=torch.tensor([[1.5], [0.5]]), mask_id=mask)
    with torch.inference_mode():
        logits = run_batch(model.net, None, batch)
        batch.vocab_stats = True
        stats = run_batch(model.net, None, batch)
    assert logits.shape == (4, V) and stats.shape == (1, 4, 7)
    inp = inputs(4, [0, 2, 3], mask)
    x0, score, conf = candidates(logits.clone(), inp)
    x0s, score_s, conf_s = candidates_from_stats(stats, inp)
    assert torch.equal(x0, x0s)
    torch.testing.assert_close(score_s, score, rtol=1e-5, atol=1e-6)
