"""Each bad checkpoint or parameter gives one clear error naming the file and the key/tensor at fault;
checkpoints without tokenizer files load; chat templates work from local files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from engine import CheckpointError, TokenizerMissingError, load_model


@pytest.fixture
def copy_of(make_checkpoint, tmp_path):
    """copy_of(family, **overrides) -> a private copy of a session checkpoint, free to corrupt."""
    def make(family: str, **overrides) -> Path:
        dst = tmp_path / "ckpt"
        shutil.copytree(make_checkpoint(family, **overrides), dst)
        return dst
    return make


def edit_tensors(path: Path, fn) -> Path:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def edit_config(path: Path, fn) -> Path:
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    fn(cfg)
    file.write_text(json.dumps(cfg))
    return file


def load_error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kw)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("family,name", [
    ("llada", "model.transformer.blocks.1.up_proj.weight"),
    ("llada", "model.transformer.ff_out.weight"),
    ("llada_moe", "model.layers.0.mlp.experts.3.down_proj.weight"),
    ("dream", "model.layers.1.self_attn.k_proj.bias"),
    ("rnd1", "model.layers.1.self_attn.q_norm.weight"),
])
def test_missing_tensor(copy_of, family, name):
    path = copy_of(family, tokenizer=False)
    edit_tensors(path, lambda t: t.pop(name))
    msg = load_error(path)
    assert "missing tensor" in msg and repr(name) in msg and str(path) in msg


@pytest.mark.parametrize("family,name,shape", [
    ("llada", "model.transformer.blocks.0.extra_proj.weight", (4, 4)),
    ("llada", "model.transformer.blocks.2.q_proj.weight", (48, 48)),  # layer past n_layers
    ("llada_moe", "model.layers.0.mlp.experts.8.gate_proj.weight", (24, 32)),  # expert past num_experts
    ("dream", "model.layers.0.self_attn.o_proj.bias", (48,)),  # Dream has no o_proj bias
    ("rnd1", "model.layers.0.mlp.gate_proj.weight", (20, 32)),  # dense MLP in an all-MoE model
])
def test_unexpected_tensor(copy_of, family, name, shape):
    path = copy_of(family, tokenizer=False)
    file = edit_tensors(path, lambda t: t.__setitem__(name, torch.randn(shape)))
    msg = load_error(path)
    assert "unexpected tensor" in msg and repr(name) in msg and str(file) in msg


@pytest.mark.parametrize("family,name", [
    ("llada", "model.transformer.blocks.0.q_proj.weight"),
    ("llada_moe", "model.layers.1.mlp.experts.0.up_proj.weight"),
    ("dream", "model.layers.0.self_attn.v_proj.bias"),
    ("rnd1", "lm_head.weight"),
])
def test_wrong_shape(copy_of, family, name):
    path = copy_of(family, tokenizer=False)
    shapes = {}

    def shrink(t):
        shapes["old"] = list(t[name].shape)
        t[name] = torch.randn([s + 1 for s in t[name].shape])
    file = edit_tensors(path, shrink)
    msg = load_error(path)
    assert repr(name) in msg and str(file) in msg and str(shapes["old"]) in msg and "shape" in msg


def test_unknown_architecture(copy_of):
    path = copy_of("llada", tokenizer=False)
    file = edit_config(path, lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    msg = load_error(path)
    assert str(file) in msg and "unknown architecture" in msg and "GPT2LMHeadModel" in msg


def test_llada2_config_missing_its_keys_names_file_key_and_family(copy_of):
    # LLaDA2 is a supported family now: a LLaDA-MoE config relabelled as LLaDA2 lacks its keys, and the error
    # names the file, the first missing key and the family it was read as
    path = copy_of("llada_moe", tokenizer=False)
    file = edit_config(path, lambda c: c.update(architectures=["LLaDA2MoeModelLM"], model_type="llada2_moe"))
    msg = load_error(path)
    assert str(file) in msg and "missing required key" in msg and "llada2_moe" in msg


def test_invalid_json_config(copy_of):
    path = copy_of("dream", tokenizer=False)
    (path / "config.json").write_text('{"architectures": ["DreamModel"], "hidden_size": 48,')
    msg = load_error(path)
    assert str(path / "config.json") in msg and "unreadable config" in msg


def test_config_not_an_object(copy_of):
    path = copy_of("dream", tokenizer=False)
    (path / "config.json").write_text("[1, 2, 3]")
    assert str(path / "config.json") in load_error(path)


def test_missing_config(copy_of):
    path = copy_of("rnd1", tokenizer=False)
    (path / "config.json").unlink()
    msg = load_error(path)
    assert str(path / "config.json") in msg and "not found" in msg


@pytest.mark.parametrize("family,key", [
    ("llada", "d_model"), ("llada", "n_layers"), ("llada_moe", "num_experts_per_tok"),
    ("dream", "num_attention_heads"), ("dream", "intermediate_size"), ("rnd1", "moe_intermediate_size"),
])
def test_missing_required_key(copy_of, family, key):
    path = copy_of(family, tokenizer=False)
    file = edit_config(path, lambda c: c.pop(key))
    msg = load_error(path)
    assert str(file) in msg and f"'{key}'" in msg and "missing" in msg


def test_wrong_key_type(copy_of):
    path = copy_of("llada", tokenizer=False)
    file = edit_config(path, lambda c: c.update(n_heads="four"))
    msg = load_error(path)
    assert str(file) in msg and "'n_heads'" in msg


def test_special_id_outside_vocab(copy_of):
    path = copy_of("dream", tokenizer=False)
    file = edit_config(path, lambda c: c.update(mask_token_id=100000))
    msg = load_error(path)
    assert str(file) in msg and "'mask_token_id'" in msg


def test_missing_shard(copy_of):
    path = copy_of("llada_moe", tokenizer=False, shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    msg = load_error(path)
    assert str(path / "model.safetensors.index.json") in msg and "model-00002-of-00003.safetensors" in msg


def test_unreadable_index(copy_of):
    path = copy_of("dream", tokenizer=False, shards=2)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    msg = load_error(path)
    assert str(path / "model.safetensors.index.json") in msg and "weight_map" in msg


def test_corrupt_safetensors(copy_of):
    path = copy_of("llada", tokenizer=False)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    msg = load_error(path)
    assert str(path / "model.safetensors") in msg


def test_no_weight_files(copy_of):
    path = copy_of("llada", tokenizer=False)
    (path / "model.safetensors").unlink()
    msg = load_error(path)
    assert str(path) in msg and "safetensors" in msg


def test_nonexistent_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    msg = load_error(missing)
    assert str(missing) in msg and "does not exist" in msg


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8", torch.float64, None])
def test_bad_dtype(make_checkpoint, dtype):
    with pytest.raises(ValueError, match="dtype") as info:
        load_model(make_checkpoint("llada", tokenizer=False), dtype=dtype)
    assert not isinstance(info.value, CheckpointError)


@pytest.mark.parametrize("device", ["tpu", "cuda:banana", 3.5])
def test_bad_device(make_checkpoint, device):
    with pytest.raises(ValueError, match="device"):
        load_model(make_checkpoint("llada", tokenizer=False), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(make_checkpoint):
    with pytest.raises(ValueError, match="device 'cuda'"):
        load_model(make_checkpoint("llada", tokenizer=False), device="cuda")


# ---------------------------------------------------------------------------------------- tokenizer files


@pytest.mark.parametrize("family", ["llada", "rnd1"])
def test_checkpoint_without_tokenizer(make_checkpoint, family):
    path = make_checkpoint(family, tokenizer=False)
    assert not list(path.glob("tokenizer*"))
    model = load_model(path)
    assert model.tokenizer is None
    assert model.config.stop_ids == (model.config.eos_id,)
    ids = torch.tensor([[3, 17, 42, model.config.mask_id, 99, model.config.mask_id, 5]])
    out = model.logits(ids)
    assert out.shape == (1, 7, model.config.vocab_size) and torch.isfinite(out).all()
    for call in (lambda: model.encode("hi"), lambda: model.decode([1, 2, 3]),
                 lambda: model.apply_chat_template([{"role": "user", "content": "hi"}])):
        with pytest.raises(TokenizerMissingError, match="no tokenizer") as info:
            call()
        assert str(path) in str(info.value)
    assert issubclass(engine.TokenizerMissingError, Exception)


def test_unreadable_tokenizer_json(copy_of):
    path = copy_of("dream")
    (path / "tokenizer.json").write_text("{ not json")
    msg = load_error(path)
    assert str(path / "tokenizer.json") in msg


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+3?\n"}]
EXPECTED_CHAT = {
    "llada": ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llada_moe": ("<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>  What is 2+3?\n<|role_end|>"
                  "<role>ASSISTANT</role>"),
    "dream": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  What is 2+3?\n<|im_end|>\n"
              "<|im_start|>assistant\n"),
}


@pytest.mark.parametrize("family", ["llada", "llada_moe", "dream"])
def test_chat_template_from_local_files(make_checkpoint, family):
    model = load_model(make_checkpoint(family))
    ids = model.apply_chat_template(CHAT)
    assert all(isinstance(i, int) and 0 <= i < model.config.vocab_size for i in ids)
    assert model.decode(ids, skip_special_tokens=False) == EXPECTED_CHAT[family]
    tok = model.tokenizer
    # Chat markers are single special tokens at their declared ids, not spelled out character by character.
    markers = {"llada": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "llada_moe": ["<role>", "</role>", "<|role_end|>"], "dream": ["<|im_start|>", "<|im_end|>"]}[family]
    for m in markers:
        assert tok.convert_tokens_to_ids(m) in ids
    if family == "llada":
        assert ids[0] == model.config.bos_id == tok.bos_token_id
    # Without a system message, LLaDA-MoE and Dream insert their default system prompt.
    plain = model.decode(model.apply_chat_template([{"role": "user", "content": "Hi"}]), skip_special_tokens=False)
    default = {"llada": "<|startoftext|><|start_header_id|>user",
               "llada_moe": "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Hi",
               "dream": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi"}[family]
    assert plain.startswith(default)
    # Text round trip; special tokens are dropped when asked.
    assert model.decode(model.encode("Hello world, 42!\n")) == "Hello world, 42!\n"
    plain_text = model.decode(ids)
    assert "What is 2+3?" in plain_text and not any(m in plain_text for m in markers + ["<|startoftext|>"])


def test_rnd1_has_no_chat_template(make_checkpoint):
    model = load_model(make_checkpoint("rnd1"))
    assert model.tokenizer is not None and model.tokenizer.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        model.apply_chat_template([{"role": "user", "content": "hi"}])
    prompt = model.encode("Question: What is 2+3?\nAnswer:")
    assert model.decode(prompt) == "Question: What is 2+3?\nAnswer:"
    assert model.tokenizer.convert_tokens_to_ids("<|mask|>") == model.config.mask_id
