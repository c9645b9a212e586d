"""Token editing is a decoding plug-in (engine/decoding/editing/, the registry): LLaDA2.1's rule is chosen by name
(`editing`) or turned on by its first field (editing_threshold), its defaults come from its registration, its
model check names the field; a rule registered at run time (as a new file would register) decodes through LLM
exactly as the plain-torch reference loop with that rule's condition, batched with llada2.1-edit and plain rows."""
from __future__ import annotations

import pytest
import torch

from engine.decoding import registry
from engine.decoding.registry import Editing
from engine.llm import LLM
from engine.sampling_params import SamplingParams, SamplingParamsError
from tests.reference_llada2 import RefLLaDA2

DIMS = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, vocab_size=173, num_experts=8,
            top_k=2, n_group=4, topk_group=2, moe_intermediate_size=16, first_k_dense_replace=1, seed=5)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("llada2_moe", **DIMS)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32")


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def lower_only(ctx):
    """Toy rule: replace a committed token only by a lower token id (confidence > editing_threshold)."""
    return (ctx.current != ctx.mask_id) & (ctx.x0 < ctx.current) & (ctx.conf > ctx.threshold[:, None])


@pytest.fixture
def toy_rule():
    base = registry.editing("llada2.1-edit")
    registry.register_editing(Editing("lower-only", lower_only, base.advance, "toy: only to lower ids",
                                      fields=base.fields, algorithm="llada2", why="toy"))
    try:
        yield
    finally:
        registry.unregister("lower-only", "editing")


def test_registry_lists_llada2_1_edit_and_its_fields():
    assert "llada2.1-edit" in registry.editing_names()
    assert registry.editing_fields()[:2] == ("editing_threshold", "max_post_steps")
    assert "`llada2.1-edit`" in registry.markdown_table()
    with pytest.raises(SamplingParamsError, match="llada2.1-edit") as e:
        SamplingParams(editing="no-such-rule")
    assert e.value.field == "editing"


def test_editing_by_name_takes_its_registered_defaults(llm, ckpt):
    """editing='llada2.1-edit' alone = editing_threshold 0.5, max_post_steps 16 (its registration's defaults)."""
    ref = RefLLaDA2(ckpt)
    prompt, d = _prompt(6, 11), llm.defaults
    r = SamplingParams(editing="llada2.1-edit").resolve(d)
    assert (r.editing, r.editing_threshold, r.max_post_steps) == ("llada2.1-edit", 0.5, 16)
    assert SamplingParams(editing_threshold=0.3).resolve(d).editing == "llada2.1-edit"
    assert SamplingParams(max_post_steps=3).resolve(d).editing is None  # its first field turns it on, not this
    sp = SamplingParams(max_tokens=10, block_length=4, steps=9, threshold=0.4, temperature=0.0, ignore_eos=True,
                        editing="llada2.1-edit")
    assert llm.generate([prompt], sp)[0].token_ids == ref.generate(prompt, 10, 4, 3, 0.4, stop_ids=(),
                                                                   editing_threshold=0.5, max_post_steps=16)


def test_editing_refused_off_block_diffusion(make_checkpoint):
    llm = LLM(make_checkpoint("llada"), dtype="float32")
    with pytest.raises(SamplingParamsError) as e:
        llm.generate([[1, 2]], SamplingParams(max_tokens=4, editing="llada2.1-edit"))
    assert e.value.field == "editing" and "block-diffusion" in str(e.value)


def test_a_registered_editing_rule_decodes_like_its_reference(llm, ckpt, toy_rule):
    ref = RefLLaDA2(ckpt)
    assert "lower-only" in registry.editing_names()
    cases = [(_prompt(5, 1), 11, 4, 3, 0.5, 0.05, 4, "lower-only"), (_prompt(9, 2), 7, 8, 2, 0.4, 0.1, 2, "llada2.1-edit"),
             (_prompt(3, 3), 9, 4, 2, 0.6, None, 0, None), (_prompt(7, 4), 12, 4, 3, 0.3, 0.1, 3, "lower-only")]
    params, want = [], []
    for prompt, g, b, spb, t, e, post, rule in cases:
        nblocks = -(-(len(prompt) + g) // b) - len(prompt) // b
        params.append(SamplingParams(max_tokens=g, block_length=b, steps=spb * nblocks, threshold=t, temperature=0.0,
                                     ignore_eos=True, editing=rule, editing_threshold=e, max_post_steps=post))
        cond = (lambda cur, cand, c, e=e: cand < cur and c > e) if rule == "lower-only" else None
        want.append(ref.generate(prompt, g, b, spb, t, stop_ids=(), editing_threshold=e, max_post_steps=post,
                                 edit_if=cond))
    outs = llm.generate([c[0] for c in cases], params)  # one batch: the toy rule, llada2.1-edit and a plain row
    assert [o.token_ids for o in outs] == want
    # not vacuous: the toy rule decodes differently from llada2.1-edit with the same threshold on these prompts
    differs = [ref.generate(p, g, b, spb, t, stop_ids=(), editing_threshold=e, max_post_steps=post) != w
               for (p, g, b, spb, t, e, post, rule), w in zip(cases, want) if rule == "lower-only"]
    assert any(differs)
