"""Decoding from vocabulary shards: candidates_from_stats over per-shard statistics picks the same tokens (greedy
and Gumbel-sampled, clean and tempered scoring) and the same scores (float64 vs the reference's float32 softmax)
as `candidates` over the full logits."""
from __future__ import annotations

import pytest
import torch

from engine.decoding.candidates import CandidateInputs, ShardDecode, candidates, candidates_from_stats, shard_stats
from engine.decoding.noise import STREAM_GUMBEL, row_keys
from engine.model.parallel import Shard


def inputs(n: int, codes: list[int], mask_id: int, sampling: bool = False) -> CandidateInputs:
    g = torch.Generator().manual_seed(1)
    score = torch.tensor(codes)[torch.randint(0, len(codes), (n,), generator=g)]
    keys = row_keys(torch.full((n,), 7), torch.zeros(n, dtype=torch.long), torch.arange(n), STREAM_GUMBEL)
    temp = torch.where(torch.rand(n, generator=g) < 0.7, torch.rand(n, generator=g) + 0.3, 0.0) if sampling \
        else torch.zeros(n)
    temp[0] = 0.0
    return CandidateInputs(temp, torch.zeros(n, dtype=torch.long), torch.ones(n), score,
                           torch.rand(n, generator=g) < 0.5, keys, mask_id, any_sampling=sampling, any_filter=False,
                           codes=frozenset(codes), any_tempered=True)


def sharded(logits: torch.Tensor, ranks: int, inp: CandidateInputs) -> torch.Tensor:
    V = logits.shape[1]
    dec = ShardDecode(inp.mask_id, inp.temperature, inp.tempered, inp.noise_keys, inp.any_sampling,
                      inp.any_tempered)
    parts = []
    for r in range(ranks):
        v0, v1 = Shard(r, ranks).vocab(V)
        parts.append(shard_stats(logits[:, v0:v1].clone(), v0, dec))
    return torch.stack(parts)


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("ranks, V, mask_id", [(2, 211, 150), (3, 157, 2), (4, 64, 63), (2, 9, 0)])
def test_matches_full_logits(ranks, V, mask_id, sampling):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(37, V, generator=g) * 3
    logits[:, mask_id] += 4  # the mask is often the largest logit, as in real models: excluded from candidates
    logits[0, 5] = logits[0, V - 1] = logits[0].max() + 1  # a tie across shards: the lower id wins, as argmax
    inp = inputs(37, [0, 1, 2, 3], mask_id, sampling)
    x0, score, conf = candidates(logits.clone(), inp)
    x0s, score_s, conf_s = candidates_from_stats(sharded(logits, ranks, inp), inp)
    assert torch.equal(x0, x0s) and x0[0] == (5 if mask_id != 5 else V - 1)
    assert (x0 != mask_id).all()
    if sampling:  # the noise moved some candidates off the argmax: the sampled path is exercised
        assert (x0 != logits.clone().index_fill_(1, torch.tensor([mask_id]), -1e9).argmax(-1)).any()
    torch.testing.assert_close(score_s, score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conf_s, conf, rtol=1e-5, atol=1e-6)
    # not vacuous: the statistics of a single shard (the others dropped) give other scores
    _, wrong, _ = candidates_from_stats(sharded(logits, ranks, inp)[:1], inp)
    assert not torch.allclose(wrong, score, rtol=1e-3, atol=1e-4)


def test_run_batch_statistics_match_its_logits(make_checkpoint):
    """run_batch(vocab_stats=True) on one rank: the statistics decode like the logits it returns otherwise
    (CFG combined in both)."""
    from engine import load_model
    from engine.forward_batch import ForwardBatch, run_batch
    from engine.model.attention import AttnContext
    model = load_model(make_checkpoint("llada"))
    V, mask = model.config.vocab_size, model.config.mask_id
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (2 * 11,), generator=g)
    batch = ForwardBatch(tokens, torch.arange(11).repeat(2), AttnContext.from_lengths([11, 11], "cpu"), max_pos=10,
                         logit_rows=torch.tensor([1, 4, 5, 9]), twin_rows=torch.tensor([15, 20]),
                         cfg_sel=torch.tensor([0, 3]), cfg_w=torch.tensor([[1.5], [0.5]]))
    inp = inputs(4, [0, 2, 3], mask, sampling=True)
    with torch.inference_mode():
        logits = run_batch(model.net, None, batch)
        batch.shard_decode = ShardDecode(mask, inp.temperature, inp.tempered, inp.noise_keys, True, True)
        stats = run_batch(model.net, None, batch)
    assert logits.shape == (4, V) and stats.shape == (1, 4, 8)
    x0, score, conf = candidates(logits.clone(), inp)
    x0s, score_s, conf_s = candidates_from_stats(stats, inp)
    assert torch.equal(x0, x0s)
    torch.testing.assert_close(score_s, score, rtol=1e-5, atol=1e-6)
