"""The engine's logits equal a transformers reference (same weights, full non-causal attention) for every family.

Error metric: rel(a, ref) = max|a - ref| / max|ref| over the compared logits.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine import load_model
from engine.families import parse_config
from tests.conftest import FAMILIES, FAMILY_DIMS
from tests.hf_reference import build_reference, reference_logits

FP32_TOL = 1e-4  # engine fp32 vs reference fp32
ROW_TOL = 1e-5  # a row in a padded batch vs the same row alone (same engine, same dtype)
BF16_TOL = 3e-2  # engine bf16 vs engine fp32; observed ~1e-2 (bf16 has an 8-bit mantissa, ~4e-3 per rounding)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def rand_ids(vocab: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # Random, never constant, never including the top (special) ids by accident being all the same.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


@pytest.fixture(scope="module")
def pair(make_checkpoint):
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = make_checkpoint(family)
            ref, fam = build_reference(path)
            assert fam == family
            cache[family] = (load_model(path), ref, path)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_non_causal(family, pair, make_checkpoint):
    """Guard against vacuous parity: changing the LAST token must change the logits at position 0."""
    model, ref, path = pair(family)
    V = model.config.vocab_size
    ids = rand_ids(V, (1, 9), seed=1)
    ids2 = ids.clone()
    ids2[0, -1] = (ids2[0, -1] + 7) % V
    base, changed = reference_logits(ref, ids), reference_logits(ref, ids2)
    assert (changed[0, 0] - base[0, 0]).abs().max() > 1e-3 * base.abs().max()
    # Same for the engine.
    ours, ours2 = model.logits(ids), model.logits(ids2)
    assert (ours2[0, 0] - ours[0, 0]).abs().max() > 1e-3 * ours.abs().max()
    # And the check itself is able to fail: a stock (causal) transformers model leaves position 0 unchanged.
    causal, _ = build_reference(path)
    causal.config.is_causal = True
    for m in causal.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = True
    with torch.no_grad():
        c1 = causal(input_ids=ids, use_cache=False).logits
        c2 = causal(input_ids=ids2, use_cache=False).logits
    assert (c1[0, 0] - c2[0, 0]).abs().max() < 1e-5 * c1.abs().max()  # equal up to summation-order noise


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [7, 13, 31])
def test_logits_match_reference(family, length, pair):
    model, ref, _ = pair(family)
    ids = rand_ids(model.config.vocab_size, (2, length), seed=100 + length)
    ours = model.logits(ids)
    theirs = reference_logits(ref, ids)
    assert ours.dtype == torch.float32 and ours.shape == (2, length, model.config.vocab_size)
    assert theirs.abs().max() > 1.0  # logits are not degenerate
    assert theirs.std(-1).min() > 0.1
    assert rel(ours, theirs) < FP32_TOL, f"{family} L={length}: rel err {rel(ours, theirs):.2e}"


VARIANTS = [
    ("llada", dict(num_kv_heads=2)),  # GQA through LLaDA's n_kv_heads
    ("llada_moe", dict(head_dim=12)),  # explicit head_dim != hidden / heads
    ("llada_moe", dict(top_k=1, num_layers=3)),
    ("dream", dict(hidden_size=32, num_heads=4, num_kv_heads=1, intermediate_size=40)),  # MQA
    ("rnd1", dict(norm_topk_prob=False)),
    ("rnd1", dict(num_experts=5, top_k=5, head_dim=None)),
]


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()))
def test_variants_match_reference(family, overrides, make_checkpoint):
    path = make_checkpoint(family, tokenizer=False, seed=5, **overrides)
    model, (ref, _) = load_model(path), build_reference(path)
    for key, value in overrides.items():
        attr = {"top_k": "num_experts_per_tok"}.get(key, key)
        if value is not None and hasattr(model.config, attr):
            assert getattr(model.config, attr) == value, key
    ids = rand_ids(model.config.vocab_size, (2, 31), seed=31)
    assert rel(model.logits(ids), reference_logits(ref, ids)) < FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_long_sequence_after_short(family, pair):
    """Positions beyond the initial RoPE table (256) after a short call: the table grows correctly."""
    model, ref, _ = pair(family)
    short = rand_ids(model.config.vocab_size, (1, 5), seed=1)
    assert rel(model.logits(short), reference_logits(ref, short)) < FP32_TOL
    ids = rand_ids(model.config.vocab_size, (1, 301), seed=2)
    assert rel(model.logits(ids), reference_logits(ref, ids)) < FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_equal_rows_alone(family, side, pair):
    model, ref, _ = pair(family)
    V = model.config.vocab_size
    lengths = [7, 31, 13]
    L = max(lengths)
    ids = rand_ids(V, (len(lengths), L), seed=7)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, L - n:] = 1
        else:
            mask[b, :n] = 1
    ids = torch.where(mask.bool(), ids, model.config.pad_id)
    batched = model.logits(ids, attention_mask=mask)
    assert batched.shape == (len(lengths), L, V)
    for b, n in enumerate(lengths):
        row = ids[b][mask[b].bool()][None]  # [1, n]
        alone = model.logits(row)[0]  # [n, V]
        got = batched[b][mask[b].bool()]
        assert rel(got, alone) < ROW_TOL, f"{family} row {b}: rel err {rel(got, alone):.2e}"
        assert rel(got, reference_logits(ref, row)[0]) < FP32_TOL
        assert torch.all(batched[b][~mask[b].bool()] == 0)  # padded positions get zero logits
    # The same padded batch through the reference (key-padding mask, positions counted from each row's start).
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    theirs = reference_logits(ref, ids, attention_mask=mask, position_ids=pos)
    valid = mask.bool()
    assert rel(batched[valid], theirs[valid]) < FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_do_not_depend_on_batch_mates(family, pair):
    model, _, _ = pair(family)
    ids = rand_ids(model.config.vocab_size, (3, 13), seed=5)
    batched = model.logits(ids)
    for b in range(3):
        assert rel(batched[b], model.logits(ids[b:b + 1])[0]) < ROW_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint(family, make_checkpoint, pair):
    """shards=3 holds the same tensors as one file: same logits, index covers every tensor, shards all used."""
    single, ref, _ = pair(family)
    path = make_checkpoint(family, shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (path / "model.safetensors").exists()
    sharded = load_model(path)
    ids = rand_ids(single.config.vocab_size, (2, 13), seed=9)
    assert torch.equal(sharded.logits(ids), single.logits(ids))
    assert rel(sharded.logits(ids), reference_logits(build_reference(path)[0], ids)) < FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_checkpoint_file(family, make_checkpoint):
    """Weights stored as bf16 on disk (like the real checkpoints) load and match the reference in fp32."""
    path = make_checkpoint(family, dtype=torch.bfloat16, tokenizer=False, seed=12)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_model(path)
    assert next(model.net.parameters()).dtype == torch.float32
    ids = rand_ids(model.config.vocab_size, (1, 13), seed=3)
    assert rel(model.logits(ids), reference_logits(build_reference(path)[0], ids)) < FP32_TOL


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bfloat16_close_to_float32_dense(family, pair):
    fp32, _, path = pair(family)
    bf16 = load_model(path, dtype="bfloat16")
    assert next(bf16.net.parameters()).dtype == torch.bfloat16
    ids = rand_ids(fp32.config.vocab_size, (3, 31), seed=21)
    out = bf16.logits(ids)
    assert out.dtype == torch.float32
    err = rel(out, fp32.logits(ids))
    assert 0 < err < BF16_TOL, f"{family}: bf16 vs fp32 rel err {err:.2e}"


@pytest.mark.parametrize("family", ["llada_moe", "rnd1"])
def test_bfloat16_close_to_float32_moe(family, pair, make_checkpoint):
    # top_k == num_experts: no discrete routing decisions, so the whole tensor must be within BF16_TOL.
    path = make_checkpoint(family, num_experts=4, top_k=4, tokenizer=False)
    fp32, bf16 = load_model(path), load_model(path, dtype="bfloat16")
    ids = rand_ids(fp32.config.vocab_size, (3, 31), seed=22)
    err = rel(bf16.logits(ids), fp32.logits(ids))
    assert 0 < err < BF16_TOL, f"{family}: bf16 vs fp32 rel err {err:.2e}"
    # Sparse top-k routing: bf16 rounding may flip a near-tied expert choice for a few tokens, which changes
    # those tokens' outputs by O(1). Per position: the median is well inside the tolerance, >= 90% are within.
    fp32, _, path = pair(family)
    bf16 = load_model(path, dtype="bfloat16")
    a, b = fp32.logits(ids), bf16.logits(ids)
    per_pos = (a - b).abs().amax(-1) / a.abs().amax(-1)  # [B, L]
    assert per_pos.median() < BF16_TOL / 2
    assert (per_pos < BF16_TOL).float().mean() >= 0.9


EXPECTED_CONFIG = {
    # family: (shift_logits, qk_norm, qkv_bias, norm_topk_prob, is_moe)
    "llada": (False, False, False, False, False),
    "llada_moe": (False, True, False, False, True),
    "dream": (True, False, True, False, False),
    "rnd1": (True, True, False, True, True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_per_family(family, pair):
    model, _, path = pair(family)
    cfg, dims = model.config, FAMILY_DIMS[family]
    assert cfg.family == family
    shift, qk_norm, qkv_bias, norm_topk, is_moe = EXPECTED_CONFIG[family]
    assert (cfg.shift_logits, cfg.qk_norm, cfg.qkv_bias, cfg.norm_topk_prob, cfg.is_moe) == \
        (shift, qk_norm, qkv_bias, norm_topk, is_moe)
    assert cfg.vocab_size == dims["vocab_size"] and cfg.hidden_size == dims["hidden_size"]
    assert cfg.num_layers == dims["num_layers"] and cfg.num_heads == dims["num_heads"]
    assert cfg.num_kv_heads == dims["num_kv_heads"]
    assert cfg.head_dim == dims.get("head_dim", dims["hidden_size"] // dims["num_heads"])
    if is_moe:
        assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == \
            (dims["num_experts"], dims["top_k"], dims["moe_intermediate_size"])
        assert cfg.moe_layers == (True,) * dims["num_layers"]
    # Special ids: compact layout (small vocab) -> the tokenizer's special tokens sit at the config's ids.
    raw = json.loads((path / "config.json").read_text())
    assert cfg.mask_id == raw["mask_token_id"] and cfg.eos_id == raw["eos_token_id"]
    assert cfg.pad_id == raw["pad_token_id"]
    tok = model.tokenizer
    assert tok.mask_token_id == cfg.mask_id
    assert tok.pad_token_id == cfg.pad_id
    assert tok.eos_token_id == cfg.eos_id
    assert len({cfg.mask_id, cfg.eos_id}) == 2 and all(0 <= i < cfg.vocab_size for i in (cfg.mask_id, cfg.eos_id))
    if family == "rnd1":
        assert cfg.pad_id != cfg.eos_id
    else:
        assert cfg.pad_id == cfg.eos_id
    # The chat template's end-of-turn token also stops generation.
    eot = {"llada": "<|eot_id|>", "llada_moe": "<|role_end|>", "dream": "<|im_end|>", "rnd1": "<|im_end|>"}[family]
    assert tok.convert_tokens_to_ids(eot) in cfg.stop_ids and cfg.eos_id in cfg.stop_ids


REAL_IDS = {  # family: (mask, eos, pad)  -- notes/models.md
    "llada": (126336, 126081, 126081),
    "llada_moe": (156895, 156892, 156892),
    "dream": (151666, 151643, 151643),
    "rnd1": (151669, 151645, 151643),
}


def test_llada_moe_real_config_has_no_mask_id_and_default_applies(make_checkpoint):
    """Real LLaDA-MoE config.json lacks mask_token_id; the loader must fall back to 156895."""
    path = make_checkpoint("llada_moe", hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, num_experts=2,
                           top_k=1, moe_intermediate_size=8, vocab_size=157184, tokenizer=False)
    raw = json.loads((path / "config.json").read_text())
    assert "mask_token_id" not in raw and raw["vocab_size"] == 157184
    model = load_model(path)
    assert (model.config.mask_id, model.config.eos_id, model.config.pad_id) == REAL_IDS["llada_moe"]
    ids = torch.tensor([[5, 156895, 17, 156892, 1000, 156895, 3]])
    out = model.logits(ids)
    assert out.shape == (1, 7, 157184) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_default_special_ids_when_config_lacks_them(family, tmp_path):
    """parse_config on a real-layout config.json with every *_token_id key removed -> the family defaults."""
    from engine.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path, family, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                                   num_experts=2, top_k=1, moe_intermediate_size=8, intermediate_size=8,
                                   vocab_size=160000, tokenizer=False, write_special_ids=False)
    raw = json.loads((path / "config.json").read_text())
    assert not [k for k in raw if k.endswith("_token_id")]
    cfg = parse_config(raw, str(path / "config.json"))
    assert (cfg.mask_id, cfg.eos_id, cfg.pad_id) == REAL_IDS[family]
    # With the real layout written, the config's ids are the real ones too.
    raw_real = dict(raw, **{f"{k}_token_id": v for k, v in zip(("mask", "eos", "pad"), REAL_IDS[family])})
    if family == "llada_moe":
        raw_real.pop("mask_token_id")
    cfg2 = parse_config(raw_real, "config.json")
    assert (cfg2.mask_id, cfg2.eos_id, cfg2.pad_id) == REAL_IDS[family]


def test_real_layout_config_written_like_the_real_ones(tmp_path):
    from engine.random_checkpoint import write_random_checkpoint

    small = dict(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, num_experts=2, top_k=1,
                 moe_intermediate_size=8, intermediate_size=8, vocab_size=160000, tokenizer=False)
    for family in FAMILIES:
        path = write_random_checkpoint(tmp_path / family, family, special_ids="real", **small)
        raw = json.loads((path / "config.json").read_text())
        cfg = parse_config(raw, str(path))
        assert (cfg.mask_id, cfg.eos_id, cfg.pad_id) == REAL_IDS[family]
        assert ("mask_token_id" in raw) == (family != "llada_moe")


# ---------------------------------------------------------------------------------------- the writer itself


def test_writer_is_deterministic_and_bf16_is_rounded_fp32(tmp_path):
    from safetensors.torch import load_file

    from engine.random_checkpoint import write_random_checkpoint

    kw = dict(FAMILY_DIMS["rnd1"], tokenizer=False, seed=4)
    a = load_file(str(write_random_checkpoint(tmp_path / "a", "rnd1", **kw) / "model.safetensors"))
    b = load_file(str(write_random_checkpoint(tmp_path / "b", "rnd1", **kw) / "model.safetensors"))
    c = load_file(str(write_random_checkpoint(tmp_path / "c", "rnd1", dtype="bfloat16", **kw) / "model.safetensors"))
    d = load_file(str(write_random_checkpoint(tmp_path / "d", "rnd1", **dict(kw, seed=5)) / "model.safetensors"))
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(c[k].dtype == torch.bfloat16 and torch.equal(c[k], a[k].to(torch.bfloat16)) for k in a)
    assert not torch.equal(a["lm_head.weight"], d["lm_head.weight"])
    norm = a["model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.min() and norm.max() < 1.5 and norm.std() > 0.01  # around 1, not all ones
    assert len([k for k in a if ".mlp.experts." in k]) == 3 * kw["num_experts"] * kw["num_layers"]


def test_writer_rejects_bad_arguments(tmp_path):
    from engine.random_checkpoint import write_random_checkpoint

    bad = [dict(family="gpt2"), dict(family="llada", num_heads=5), dict(family="dream", num_kv_heads=4, num_heads=6),
           dict(family="rnd1", top_k=9), dict(family="llada", dtype="float64"), dict(family="llada", shards=0),
           dict(family="llada", vocab_size=64), dict(family="dream", special_ids="real"),
           dict(family="llada", head_dim=16, num_heads=2)]
    for kw in bad:
        with pytest.raises(ValueError):
            write_random_checkpoint(tmp_path / "x", **kw)
