"""kernels/vocab.py against the full-softmax reference, and candidates() with the fused pass vs the torch path."""
from __future__ import annotations

import pytest
import torch

from engine.decoding.candidates import CandidateInputs, candidates
from engine.decoding.registry import remasking as remasking_rule
from kernels.vocab import vocab_scores, vocab_scores_ref
from tests.kernels.tolerance import DEVICE


def vocab_case(N: int, V: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 4
    logits[0, 3] = 50.0  # row 0: the mask token (id 3) is by far the likeliest, so x0 must skip it
    if N > 1:
        logits[1, : V // 2] = float("-inf")  # row 1: half the vocabulary impossible (0 * log 0 terms)
    temperature = torch.rand(N, generator=g) * 1.5
    temperature[::3] = 0.0  # greedy rows among sampled ones
    return dict(logits=logits.to(DEVICE), temperature=temperature.to(DEVICE),
                noise_keys=torch.randint(-2 ** 62, 2 ** 62, (N,), generator=g).to(DEVICE),
                tempered=(torch.rand(N, generator=g) < 0.5).to(DEVICE), mask_id=3)


@pytest.mark.parametrize("N,V", [(7, 211), (5, 5003), (1, 157)], ids=["7x211", "5x5003-multi-tile", "1x157"])
@pytest.mark.parametrize("sampling", [True, False], ids=["sampling", "greedy"])
def test_vocab_scores_match_full_softmax(N, V, sampling):
    c = vocab_case(N, V, seed=N * V)
    if not sampling:
        c["temperature"] = torch.zeros_like(c["temperature"])
    x0, p_x0, margin, neg_h = vocab_scores(**c, sampling=sampling)
    rx0, rp, rmargin, rneg_h = vocab_scores_ref(**c, sampling=sampling)
    assert torch.equal(x0, rx0), (x0, rx0)
    assert (x0 != c["mask_id"]).all()
    for name, got, want in [("p(x0)", p_x0, rp), ("margin", margin, rmargin), ("-H", neg_h, rneg_h)]:
        assert torch.isfinite(got).all(), name
        err = (got - want).abs().max().item()
        print(f"{name}: max err {err:.3g}")
        assert err <= 1e-5 * max(1.0, want.abs().max().item()), f"{name}: max err {err}"


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
def test_candidates_fused_equals_torch_path(remasking):
    """The decoders' candidates() gives the same x0 and scores with the fused pass as with its torch path."""
    N, V = 11, 173
    c = vocab_case(N, V, seed=5)
    code = remasking_rule(remasking).id

    def run(backend: str):
        inp = CandidateInputs(c["temperature"], torch.zeros(N, dtype=torch.long, device=DEVICE),
                              torch.ones(N, device=DEVICE), torch.full((N,), code, device=DEVICE), c["tempered"],
                              c["noise_keys"], c["mask_id"], any_sampling=True, any_filter=False,
                              codes=frozenset({code}), any_tempered=True, backend=backend)
        return candidates(c["logits"].clone(), inp)

    (x0, score, conf), (tx0, tscore, tconf) = run("triton"), run("torch")
    assert torch.equal(x0, tx0)
    torch.testing.assert_close(score, tscore, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conf, tconf, rtol=1e-5, atol=1e-6)
