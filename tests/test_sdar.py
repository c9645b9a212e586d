"""SDAR (`sdar`, JetAstra/SDAR): tiny random checkpoints in the real on-disk format (SDARForCausalLM config.json
keys, Qwen3 tensor names, Qwen3-style tokenizer with <|MASK|> and a ChatML template), loaded by the engine and
checked against the independent plain-torch reference written from the published modelling and generate code
(tests/reference_sdar.py): the forward (full and block-causal), generation through the public API token for token at
temperature 0 (prompts that are and are not multiples of the block, generation lengths that are not, batched),
the exact block cache, the family's defaults, the chat template, and refused config options."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.errors import CheckpointError
from engine.llm import LLM
from engine.loader import load_model
from engine.sampling_params import SamplingParams
from tests.reference_sdar import RefSDAR
from tests.test_llada2 import _denoised_blocks, _prompt

# GQA (4 q heads over 2 kv heads), head_dim 12 != 32 / 4; the tied variant has no lm_head.weight (SDAR-1.7B/4B).
BASE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=48,
            vocab_size=173, seed=7)
VARIANTS = {"base": {}, "tied-mha": dict(tie_word_embeddings=True, num_kv_heads=4, head_dim=8, num_layers=3)}


@pytest.fixture(scope="module")
def ckpts(make_checkpoint):
    return {name: make_checkpoint("sdar", **{**BASE, **kw}) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def llms(ckpts):
    return {name: LLM(path, dtype="float32") for name, path in ckpts.items()}



def test_checkpoint_format(ckpts):
    cfg = json.loads((ckpts["base"] / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["tie_word_embeddings"]) == ("sdar", ["SDARForCausalLM"], False)
    tok = json.loads((ckpts["base"] / "tokenizer_config.json").read_text())
    assert tok["mask_token"] == "<|MASK|>" and tok["eos_token"] == "<|im_end|>"
    tied = json.loads((ckpts["tied-mha"] / "config.json").read_text())
    assert tied["tie_word_embeddings"] is True


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(ckpts, variant):
    model, ref = load_model(ckpts[variant]), RefSDAR(ckpts[variant])
    ids = torch.tensor([_prompt(11, 1)])
    for block in (None, 4, 3):
        got = model.logits(ids, block_length=block)[0]
        assert torch.allclose(got, ref.logits(ids[0].tolist(), block), atol=1e-4, rtol=1e-4), (variant, block)
    assert model.config.mask_id == ref.mask_id and model.config.eos_id == ref.eos_id


CASES = [(5, 11, 4, 4, 0.85), (8, 8, 4, 2, 0.1), (9, 13, 8, 3, 0.05), (3, 6, 4, 1, 0.85), (12, 10, 4, 4, 1.0),
         (7, 9, 3, 2, 0.02)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_matches_reference(llms, ckpts, variant):
    """Through LLM.generate at temperature 0, one batch of every case (each prompt with its own settings), token
    for token equal to the reference's generate of each alone; the exact block cache and no cache agree."""
    llm, ref = llms[variant], RefSDAR(ckpts[variant])
    prompts, params, want = [], [], []
    for k, (p, g, b, spb, t) in enumerate(CASES):
        prompts.append(_prompt(p, 20 + k))
        params.append(SamplingParams(max_tokens=g, block_length=b, steps=spb * _denoised_blocks(p, g, b),
                                     threshold=t, temperature=0.0, ignore_eos=True))
        want.append(ref.generate(prompts[-1], g, b, spb, t, stop_ids=()))
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    params[0].cache = "none"
    assert llm.generate([prompts[0]], params[0])[0].token_ids == want[0]
    # not vacuous: the threshold changes the answer of some case (the tied variant's head is sharp: all agree)
    assert variant != "base" or any(ref.generate(pr, g, b, spb, 1.0, stop_ids=()) != w
               for pr, (p, g, b, spb, t), w in zip(prompts, CASES, want) if t < 1.0)


def test_eos_stops_like_the_reference(ckpts, tmp_path):
    """With a frequent token as eos (config.json eos_token_id), generation stops where the reference stops."""
    path = tmp_path / "sdar-eos"
    shutil.copytree(ckpts["base"], path)
    ref = RefSDAR(path)
    prompt = _prompt(6, 3)
    free = ref.generate(prompt, 16, 4, 4, 0.85, stop_ids=())
    eos = free[5]  # a token the model produces here
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (path / "config.json").write_text(json.dumps(cfg))
    want = RefSDAR(path).generate(prompt, 16, 4, 4, 0.85)
    assert want[-1] == eos and len(want) < 16
    sp = SamplingParams(max_tokens=16, block_length=4, steps=4 * _denoised_blocks(6, 16, 4), threshold=0.85,
                        temperature=0.0)
    got = LLM(path, dtype="float32").generate([prompt], sp)[0]
    assert got.token_ids == want[:-1] and got.finish_reason == "stop"  # the engine cuts the EOS (as always)


def test_family_defaults_and_chat_template(llms):
    llm = llms["base"]
    d = llm.defaults
    assert (d.block_length, d.steps_per_block, d.threshold, d.temperature, d.cache, d.algorithm, d.max_tokens) == (
        4, 4, 0.85, 1.0, "block", "llada2", 128)
    ids = llm.model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert llm.model.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_config_is_refused(ckpts, tmp_path):
    for key, value in (("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("use_sliding_window", True)):
        path = tmp_path / key
        shutil.copytree(ckpts["base"], path)
        cfg = json.loads((path / "config.json").read_text())
        cfg[key] = value
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=key):
            load_model(path)


@pytest.mark.slow
def test_tensor_parallel_matches_one_process(llms, ckpts):
    """Two tensor-parallel ranks (heads, MLP and the vocabulary split; the tied head shares the split embedding)
    give the single process's tokens."""
    variant = "tied-mha"
    prompts = [_prompt(n, n) for n in (5, 9, 3)]
    sp = SamplingParams(max_tokens=13, block_length=4, threshold=0.1, temperature=0.0, ignore_eos=True)
    one = [o.token_ids for o in llms[variant].generate(prompts, sp)]
    with LLM(ckpts[variant], dtype="float32", tensor_parallel_size=2, parallel_timeout=60) as tp:
        assert [o.token_ids for o in tp.generate(prompts, sp)] == one
