"""Tiny random checkpoints in each family's real on-disk format (config.json, safetensors, tokenizer files).

Written from the checkpoint-format spec (shared notes, models.md), deliberately independently of
`engine.families`, so tests that load these checkpoints catch name-mapping and config-parsing bugs.
Also used by the benchmarks to make random models of given dimensions.

    from engine.random_checkpoint import write_random_checkpoint
    path = write_random_checkpoint("/tmp/tiny-llada", "llada", hidden_size=64, num_layers=2, vocab_size=256)

Special token ids: with ``special_ids="real"`` the family's real ids are written (needs a vocabulary larger than
them); with ``"compact"`` the special tokens sit at the top of a small vocabulary and every id is written to
config.json; ``"auto"`` (default) picks "real" when the vocabulary is big enough. As in the real LLaDA-MoE
config.json, the "real" layout writes no ``mask_token_id`` for LLaDA-MoE (loaders must know 156895).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

FAMILIES = ("llada", "llada_moe", "dream", "rnd1", "llada2_moe", "sdar")

# Special tokens of each family, ascending by real id: (string, real id, roles). Roles name the config keys
# `<role>_token_id` that point at the token. The LLaDA-MoE role-token ids are placeholders (not confirmed).
_SPECIALS: dict[str, list[tuple[str, int, tuple[str, ...]]]] = {
    "llada": [("<|startoftext|>", 126080, ("bos",)), ("<|endoftext|>", 126081, ("eos", "pad")),
              ("<|mdm_mask|>", 126336, ("mask",)), ("<|start_header_id|>", 126346, ()),
              ("<|end_header_id|>", 126347, ()), ("<|eot_id|>", 126348, ())],
    "llada_moe": [("<|endoftext|>", 156892, ("eos", "pad")), ("<|mask|>", 156895, ("mask",)),
                  ("<role>", 156900, ()), ("</role>", 156901, ()), ("<|role_end|>", 156902, ())],
    "dream": [("<|endoftext|>", 151643, ("eos", "pad", "bos")), ("<|im_start|>", 151644, ()),
              ("<|im_end|>", 151645, ()), ("<|beginoftext|>", 151665, ()), ("<|mask|>", 151666, ("mask",))],
    "rnd1": [("<|endoftext|>", 151643, ("pad",)), ("<|im_start|>", 151644, ()), ("<|im_end|>", 151645, ("eos",)),
             ("<|mask|>", 151669, ("mask",))],
    # LLaDA2.x (Ling tokenizer): eos/pad 156892, mask 156895; role-token ids are placeholders as for LLaDA-MoE.
    "llada2_moe": [("<|endoftext|>", 156892, ("eos", "pad")), ("<|mask|>", 156895, ("mask",)),
                   ("<role>", 156900, ()), ("</role>", 156901, ()), ("<|role_end|>", 156902, ())],
    # SDAR: Qwen3's tokenizer plus <|MASK|> (engine/sdar.py)
    "sdar": [("<|endoftext|>", 151643, ("pad",)), ("<|im_start|>", 151644, ()), ("<|im_end|>", 151645, ("eos",)),
             ("<|MASK|>", 151669, ("mask",))],
}
# Real vocabulary sizes (sanity reference; benchmarks may want them).
REAL_VOCAB_SIZE = {"llada": 126464, "llada_moe": 157184, "dream": 152064, "rnd1": 151936, "llada2_moe": 157184,
                   "sdar": 151936}
# Which `<role>_token_id` keys the real config.json carries.
_REAL_CONFIG_ID_KEYS = {"llada": ("mask", "eos", "pad"), "llada_moe": ("eos", "pad"),
                        "dream": ("mask", "eos", "pad", "bos"), "rnd1": ("mask", "eos", "pad"),
                        "llada2_moe": ("pad",),  # LLaDA2's config.json has only pad_token_id
                        "sdar": ("eos",)}  # Qwen3's config.json: eos (its bos is <|endoftext|> too)
# Tokenizer-side special-token strings (tokenizer_config.json / special_tokens_map.json).
_TOKENIZER_ROLES = {
    "llada": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "mask_token": "<|mdm_mask|>"},
    "llada_moe": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"},
    "dream": {"bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "mask_token": "<|mask|>"},
    "rnd1": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"},
    "llada2_moe": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"},
    "sdar": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "mask_token": "<|MASK|>"},
}

# Chat templates (Jinja) in each family's real format; RND1 ships none.
CHAT_TEMPLATES: dict[str, str | None] = {
    # LLaDA-8B-Instruct: Llama-3 style, BOS before the first message.
    "llada": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # LLaDA-MoE (Ling): <role>SYSTEM</role>...<|role_end|><role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>
    "llada_moe": (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{ '<role>SYSTEM</role>' + messages[0]['content'] + '<|role_end|>' }}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{{ '<role>SYSTEM</role>detailed thinking off<|role_end|>' }}"
        "{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}{%- set role = 'HUMAN' -%}"
        "{%- else -%}{%- set role = message['role'] | upper -%}{%- endif -%}"
        "{{ '<role>' + role + '</role>' + message['content'] + '<|role_end|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<role>ASSISTANT</role>' }}{%- endif -%}"),
    # Dream (Qwen2.5 ChatML) with the default system prompt.
    "dream": (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"),
    "rnd1": None,
    # SDAR-Chat (Qwen3 ChatML, no default system prompt; its tool / thinking branches left out)
    "sdar": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"),
}
CHAT_TEMPLATES["llada2_moe"] = CHAT_TEMPLATES["llada_moe"]  # the same Ling format (<role>HUMAN</role>...)

_CORPUS = """The quick brown fox jumps over the lazy dog. A masked diffusion language model predicts every
masked token at once and commits the most confident ones, step after step, until no mask is left.
Question: What is the capital of France?
Answer: The capital of France is Paris.
Question: What is 12 + 30?
Answer: 12 + 30 = 42.
user: Hello, how are you today? assistant: I am fine, thank you! system: You are a helpful assistant.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Once upon a time there was a little robot who wanted to learn how to write poems about the sea,
the sky, the mountains and the rivers. Every morning it read a book and every evening it wrote a line.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colors: red, green, blue, yellow, black, white.
"""
_ALPHABET = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
_UNK = "<unk>"
_MIN_TOKENIZER_PIECES = len(_ALPHABET) + 1  # the alphabet plus <unk>
_PRETOKENIZE = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+"
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def special_token_ids(family: str, vocab_size: int, special_ids: str | Mapping[str, int] = "auto") -> dict[str, int]:
    """token string -> id for the family's special tokens under the given layout (see module docstring)."""
    specials = _SPECIALS[_check_family(family)]
    layout = special_ids if isinstance(special_ids, str) else "auto"
    if layout == "auto":
        layout = "real" if vocab_size > specials[-1][1] else "compact"
    if layout == "real":
        if vocab_size <= specials[-1][1]:
            raise ValueError(f"special_ids='real' needs vocab_size > {specials[-1][1]} for {family}, got {vocab_size}")
        ids = {tok: real for tok, real, _ in specials}
    elif layout == "compact":
        n = len(specials)
        if vocab_size < n + 1:
            raise ValueError(f"vocab_size {vocab_size} is too small for {n} special tokens")
        ids = {tok: vocab_size - n + i for i, (tok, _, _) in enumerate(specials)}
    else:
        raise ValueError(f"special_ids must be 'auto', 'real', 'compact' or a mapping, got {special_ids!r}")
    if not isinstance(special_ids, str):  # overrides: role ("mask", "eos", ...) or token string -> id
        for key, value in special_ids.items():
            toks = [t for t, _, roles in specials if key == t or key in roles] or None
            if toks is None:
                raise ValueError(f"special_ids: unknown role or token {key!r} for {family}")
            ids[toks[0]] = int(value)
    if len(set(ids.values())) != len(ids) or not all(0 <= i < vocab_size for i in ids.values()):
        raise ValueError(f"special token ids {ids} must be distinct and inside the vocabulary ({vocab_size})")
    return ids


def write_random_checkpoint(
    out_dir: str | Path,
    family: str,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    num_experts: int = 8,
    top_k: int = 2,
    moe_intermediate_size: int | None = None,
    norm_topk_prob: bool = True,
    rope_theta: float | None = None,
    rms_norm_eps: float | None = None,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype | str = torch.float32,
    tokenizer: bool = True,
    init_std: float | None = None,
    special_ids: str | Mapping[str, int] = "auto",
    write_special_ids: bool = True,
    first_k_dense_replace: int = 1,
    n_group: int = 1,
    topk_group: int = 1,
    num_shared_experts: int = 1,
    partial_rotary_factor: float = 0.5,
    routed_scaling_factor: float = 2.5,
    byte_level: bool = False,
    tie_word_embeddings: bool = False,
    weights: bool = True,
) -> Path:
    """Write a random checkpoint of `family` (one of FAMILIES) to out_dir; returns the path.

    num_kv_heads: default num_heads (MHA) for LLaDA / LLaDA-MoE, num_heads // 2 for Dream / RND1 (GQA).
    head_dim: only RND1 (and LLaDA-MoE) can express head_dim != hidden_size // num_heads.
    intermediate_size: dense SwiGLU width (LLaDA, Dream); moe_intermediate_size: expert width (MoE families).
    norm_topk_prob: RND1's config key (LLaDA-MoE's reference code ignores it; written as false there).
    shards > 1: model-0000k-of-0000N.safetensors + model.safetensors.index.json.
    init_std: std of every projection matrix; None = 1/sqrt(fan_in). Norm weights are 1 + 0.1 * randn.
    special_ids: "auto" | "real" | "compact", or a mapping role ("mask", "eos", ...) or token string -> id.
    write_special_ids=False: config.json gets no *_token_id keys (loaders must fall back to family defaults).
    tokenizer: also write tokenizer.json / tokenizer_config.json / special_tokens_map.json (needs
        vocab_size >= ~105: the printable-ASCII alphabet plus the special tokens).
    llada2_moe only: first_k_dense_replace dense layers first, then MoE layers with a sigmoid router over
        n_group groups (topk_group kept), num_shared_experts shared experts (width moe_intermediate_size each),
        routed_scaling_factor, partial_rotary_factor (rotary_dim = head_dim * factor); fused query_key_value.
    tie_word_embeddings (sdar only): the head is the embedding (SDAR-1.7B/4B), no lm_head.weight is written.
    weights=False: config, generation config and tokenizer only, no tensors (benchmarks/gpu_step.py draws an 8B
        model's weights on the device instead).
    byte_level: write the tokenizer as GPT-2 style byte-level BPE (pieces spelled through the byte-to-unicode
        table, e.g. " the" as "Ġthe"): same pieces and merges, so the same ids for the same text, in the form
        llama.cpp's converter and its "gpt2" tokenizer expect (benchmarks/vs_llamacpp.py).
    Deterministic in `seed`; weights are drawn in fp32, so a bf16 checkpoint is the rounded fp32 one.
    """
    family = _check_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = _resolve_dtype(dtype)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    moe = family in ("llada_moe", "rnd1", "llada2_moe")
    if num_kv_heads is None:
        num_kv_heads = num_heads // 2 if family in ("dream", "rnd1") and num_heads % 2 == 0 else num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
        head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if family in ("llada", "dream") and head_dim * num_heads != hidden_size:
        raise ValueError(f"{family} configs cannot express head_dim {head_dim} != hidden_size / num_heads")
    if intermediate_size is None:
        intermediate_size = (8 * hidden_size // 3 + 15) // 16 * 16 if not moe else 3 * hidden_size
    if moe_intermediate_size is None:
        moe_intermediate_size = max(16, hidden_size // 2)
    if moe and not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    ids = special_token_ids(family, vocab_size, special_ids)
    if tokenizer and vocab_size - len(ids) < _MIN_TOKENIZER_PIECES:
        raise ValueError(f"a tokenizer needs vocab_size >= {_MIN_TOKENIZER_PIECES + len(ids)} for {family} "
                         f"(got {vocab_size}); pass tokenizer=False for smaller vocabularies")
    if family == "llada2_moe":
        if num_experts % n_group or not 1 <= topk_group <= n_group or top_k > topk_group * num_experts // n_group:
            raise ValueError(f"n_group {n_group} must divide num_experts {num_experts}, topk_group in [1, n_group] "
                             f"and top_k {top_k} at most the experts of topk_group groups")
        if num_experts // n_group < 2:
            raise ValueError("each expert group needs >= 2 experts (group score = sum of its top 2)")
        if int(head_dim * partial_rotary_factor) % 2:
            raise ValueError(f"rotary_dim = int(head_dim * partial_rotary_factor) must be even")
    dims = dict(hidden=hidden_size, layers=num_layers, heads=num_heads, kv_heads=num_kv_heads, head_dim=head_dim,
                inter=intermediate_size, vocab=vocab_size, experts=num_experts, top_k=top_k,
                moe_inter=moe_intermediate_size, dense=first_k_dense_replace, n_group=n_group,
                topk_group=topk_group, shared=num_shared_experts, tie=int(tie_word_embeddings and family == "sdar"))
    dims_f = dict(partial_rotary_factor=partial_rotary_factor, routed_scaling_factor=routed_scaling_factor)
    config = _config(family, dims, ids, special_ids, write_special_ids, torch_dtype, norm_topk_prob,
                     rope_theta, rms_norm_eps, max_position_embeddings)
    if family == "llada2_moe":
        config.update(dims_f)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(family, ids), indent=2) + "\n")
    if weights:
        _save(out, _random_tensors(family, dims, seed, init_std, torch_dtype), shards, torch_dtype)
    if tokenizer:
        write_tokenizer(out, family, vocab_size, ids, byte_level=byte_level)
    return out


# ---------------------------------------------------------------------------------------------- config.json


def _config(family: str, d: dict[str, int], ids: dict[str, int], special_ids: Any, write_ids: bool,
            dtype: torch.dtype, norm_topk_prob: bool, rope_theta: float | None, eps: float | None,
            max_pos: int) -> dict[str, Any]:
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    if family == "llada":
        cfg: dict[str, Any] = {
            "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
            "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": d["hidden"],
            "embedding_dropout": 0.0, "embedding_size": d["vocab"], "flash_attention": False,
            "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
            "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
            "layer_norm_with_affine": True, "max_sequence_length": max_pos, "mlp_hidden_size": d["inter"],
            "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": d["heads"],
            "n_kv_heads": d["kv_heads"], "n_layers": d["layers"], "precision": "amp_bf16", "residual_dropout": 0.0,
            "rms_norm_eps": 1e-5 if eps is None else eps, "rope": True, "rope_full_precision": True,
            "rope_theta": 500000.0 if rope_theta is None else rope_theta, "scale_logits": False,
            "torch_dtype": dtype_name, "transformers_version": "4.46.3", "use_cache": False,
            "vocab_size": d["vocab"], "weight_tying": False,
        }
    elif family == "llada_moe":
        cfg = {
            "architectures": ["LLaDAMoEModelLM"],
            "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                         "AutoModel": "modeling_lladamoe.LLaDAModel",
                         "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
            "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
            "dense_intermediate_size": d["inter"], "expert_intermediate_size": d["moe_inter"],
            "hidden_act": "silu", "hidden_size": d["hidden"], "initializer_range": 0.02,
            "intermediate_size": d["inter"], "max_position_embeddings": max_pos, "model_type": "llada",
            "moe_layer_freq": [1] * d["layers"], "norm_topk_prob": False, "num_attention_heads": d["heads"],
            "num_experts": d["experts"], "num_experts_per_tok": d["top_k"], "num_hidden_layers": d["layers"],
            "num_key_value_heads": d["kv_heads"], "output_router_logits": False, "partial_rotary_factor": 1.0,
            "qk_layernorm": True, "rms_norm_eps": 1e-5 if eps is None else eps, "rope_scaling": None,
            "rope_theta": 50000.0 if rope_theta is None else rope_theta, "router_aux_loss_coef": 0.01,
            "shared_expert_intermediate_size": None, "tie_word_embeddings": False, "torch_dtype": dtype_name,
            "transformers_version": "4.46.3", "use_cache": False, "vocab_size": d["vocab"],
        }
        if d["head_dim"] * d["heads"] != d["hidden"]:
            cfg["head_dim"] = d["head_dim"]
    elif family == "dream":
        cfg = {
            "architectures": ["DreamModel"], "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
            "hidden_act": "silu", "hidden_size": d["hidden"], "initializer_range": 0.02,
            "intermediate_size": d["inter"], "max_position_embeddings": max_pos,
            "max_window_layers": d["layers"], "model_type": "Dream", "num_attention_heads": d["heads"],
            "num_hidden_layers": d["layers"], "num_key_value_heads": d["kv_heads"],
            "rms_norm_eps": 1e-6 if eps is None else eps, "rope_scaling": None,
            "rope_theta": 1000000.0 if rope_theta is None else rope_theta, "sliding_window": None,
            "tie_word_embeddings": False, "torch_dtype": dtype_name, "transformers_version": "4.46.2",
            "use_cache": True, "use_sliding_window": False, "vocab_size": d["vocab"],
        }
    elif family == "llada2_moe":  # LLaDA2.0/2.1-mini's config.json keys (notes/models.md section 5)
        cfg = {
            "architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                         "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                         "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
            "embedding_dropout": 0.0, "first_k_dense_replace": d["dense"], "head_dim": d["head_dim"],
            "hidden_act": "silu", "hidden_size": d["hidden"], "initializer_range": 0.02,
            "intermediate_size": d["inter"], "max_position_embeddings": max_pos, "max_window_layers": d["layers"],
            "model_type": "llada2_moe", "moe_intermediate_size": d["moe_inter"], "moe_router_enable_expert_bias": True,
            "n_group": d["n_group"], "norm_topk_prob": True, "num_attention_heads": d["heads"],
            "num_experts": d["experts"], "num_experts_per_tok": d["top_k"], "num_hidden_layers": d["layers"],
            "num_key_value_heads": d["kv_heads"], "num_shared_experts": d["shared"], "output_dropout": 0.0,
            "output_router_logits": False, "rms_norm_eps": 1e-6 if eps is None else eps, "rope_scaling": None,
            "rope_theta": 600000.0 if rope_theta is None else rope_theta, "rotary_dim": None,
            "router_dtype": "fp32", "score_function": "sigmoid", "tie_word_embeddings": False,
            "topk_group": d["topk_group"], "torch_dtype": dtype_name, "transformers_version": "4.52.3",
            "use_bias": False, "use_cache": False, "use_qk_norm": True, "use_qkv_bias": False,
            "use_rmsnorm": True, "vocab_size": d["vocab"],
        }
    elif family == "sdar":  # SDARConfig = Qwen3's keys (engine/sdar.py)
        cfg = {
            "architectures": ["SDARForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                         "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
            "fuse_cross_entropy": True, "head_dim": d["head_dim"], "hidden_act": "silu", "hidden_size": d["hidden"],
            "initializer_range": 0.02, "intermediate_size": d["inter"], "max_position_embeddings": max_pos,
            "max_window_layers": d["layers"], "model_type": "sdar", "num_attention_heads": d["heads"],
            "num_hidden_layers": d["layers"], "num_key_value_heads": d["kv_heads"],
            "rms_norm_eps": 1e-6 if eps is None else eps, "rope_scaling": None,
            "rope_theta": 1000000.0 if rope_theta is None else rope_theta, "sliding_window": None,
            "tie_word_embeddings": bool(d["tie"]), "torch_dtype": dtype_name, "transformers_version": "4.52.4",
            "use_cache": True, "use_sliding_window": False, "vocab_size": d["vocab"],
        }
    else:  # rnd1
        cfg = {
            "architectures": ["RND1LM"], "attention_bias": False, "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_rnd.RND1Config", "AutoModel": "modeling_rnd.RND1Model",
                         "AutoModelForMaskedLM": "modeling_rnd.RND1LM"},
            "decoder_sparse_step": 1, "head_dim": d["head_dim"], "hidden_act": "silu", "hidden_size": d["hidden"],
            "initializer_range": 0.02, "intermediate_size": d["inter"], "is_causal": False,
            "max_position_embeddings": max_pos, "max_window_layers": d["layers"], "mlp_only_layers": [],
            "model_type": "rnd1", "moe_backend": "hf", "moe_intermediate_size": d["moe_inter"],
            "norm_topk_prob": norm_topk_prob, "num_attention_heads": d["heads"], "num_diffusion_steps": 256,
            "num_experts": d["experts"], "num_experts_per_tok": d["top_k"], "num_hidden_layers": d["layers"],
            "num_key_value_heads": d["kv_heads"], "output_router_logits": False,
            "rms_norm_eps": 1e-6 if eps is None else eps, "rope_scaling": None,
            "rope_theta": 1000000.0 if rope_theta is None else rope_theta, "router_aux_loss_coef": 0.001,
            "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": dtype_name,
            "transformers_version": "4.56.1", "use_cache": False, "use_sliding_window": False,
            "vocab_size": d["vocab"],
        }
    if write_ids:
        real = isinstance(special_ids, str) and (special_ids == "real" or (
            special_ids == "auto" and d["vocab"] > _SPECIALS[family][-1][1]))
        keys = _REAL_CONFIG_ID_KEYS[family] if real else ("mask", "eos", "pad", "bos")
        for tok, _, roles in _SPECIALS[family]:
            for role in roles:
                if role in keys:
                    cfg[f"{role}_token_id"] = ids[tok]
    return dict(sorted(cfg.items()))


def _generation_config(family: str, ids: dict[str, int]) -> dict[str, Any]:
    by_role = {role: ids[tok] for tok, _, roles in _SPECIALS[family] for role in roles}
    out: dict[str, Any] = {"_from_model_config": True, "transformers_version": "4.46.3"}
    out.update({f"{r}_token_id": by_role[r] for r in ("bos", "eos", "pad") if r in by_role})
    return out


# ---------------------------------------------------------------------------------------------- weights


def _tensor_specs(family: str, d: dict[str, int]) -> list[tuple[str, tuple[int, ...], str]]:
    """(checkpoint name, shape, kind) in checkpoint order. kind: embed | norm | linear | head | bias | router."""
    D, V, H, Hkv, hd = d["hidden"], d["vocab"], d["heads"], d["kv_heads"], d["head_dim"]
    q, kv, inter = H * hd, Hkv * hd, d["inter"]
    specs: list[tuple[str, tuple[int, ...], str]] = []
    if family == "llada":
        specs.append(("model.transformer.wte.weight", (V, D), "embed"))
        for i in range(d["layers"]):
            p = f"model.transformer.blocks.{i}."
            specs += [(p + "attn_norm.weight", (D,), "norm"), (p + "q_proj.weight", (q, D), "linear"),
                      (p + "k_proj.weight", (kv, D), "linear"), (p + "v_proj.weight", (kv, D), "linear"),
                      (p + "attn_out.weight", (D, q), "linear"), (p + "ff_norm.weight", (D,), "norm"),
                      (p + "ff_proj.weight", (inter, D), "linear"),  # the gate
                      (p + "up_proj.weight", (inter, D), "linear"),
                      (p + "ff_out.weight", (D, inter), "linear")]  # down
        specs += [("model.transformer.ln_f.weight", (D,), "norm"), ("model.transformer.ff_out.weight", (V, D), "head")]
        return specs
    if family == "llada2_moe":
        return _llada2_specs(d)
    specs.append(("model.embed_tokens.weight", (V, D), "embed"))
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", (D,), "norm"))
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            specs.append((p + f"self_attn.{name}_proj.weight", (rows, D), "linear"))
            if family == "dream":
                specs.append((p + f"self_attn.{name}_proj.bias", (rows,), "bias"))
        specs.append((p + "self_attn.o_proj.weight", (D, q), "linear"))
        if family in ("llada_moe", "rnd1", "sdar"):
            specs += [(p + "self_attn.q_norm.weight", (hd,), "norm"), (p + "self_attn.k_norm.weight", (hd,), "norm")]
        specs.append((p + "post_attention_layernorm.weight", (D,), "norm"))
        if family in ("dream", "sdar"):
            specs += [(p + "mlp.gate_proj.weight", (inter, D), "linear"),
                      (p + "mlp.up_proj.weight", (inter, D), "linear"),
                      (p + "mlp.down_proj.weight", (D, inter), "linear")]
        else:
            mi = d["moe_inter"]
            specs.append((p + "mlp.gate.weight", (d["experts"], D), "router"))
            for j in range(d["experts"]):
                e = f"{p}mlp.experts.{j}."
                specs += [(e + "gate_proj.weight", (mi, D), "linear"), (e + "up_proj.weight", (mi, D), "linear"),
                          (e + "down_proj.weight", (D, mi), "linear")]
    specs.append(("model.norm.weight", (D,), "norm"))
    if not d.get("tie"):
        specs.append(("lm_head.weight", (V, D), "head"))
    return specs


def _llada2_specs(d: dict[str, int]) -> list[tuple[str, tuple[int, ...], str]]:
    """Bailing-MoE-V2 names: fused query_key_value, query/key_layernorm, dense first layers, then MoE with a
    router, its expert_bias buffer, routed experts and shared_experts."""
    D, V, H, Hkv, hd = d["hidden"], d["vocab"], d["heads"], d["kv_heads"], d["head_dim"]
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.word_embeddings.weight", (V, D), "embed")]
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (D,), "norm"),
                  (p + "attention.query_key_value.weight", ((H + 2 * Hkv) * hd, D), "linear"),
                  (p + "attention.query_layernorm.weight", (hd,), "norm"),
                  (p + "attention.key_layernorm.weight", (hd,), "norm"),
                  (p + "attention.dense.weight", (D, H * hd), "linear"),
                  (p + "post_attention_layernorm.weight", (D,), "norm")]
        mlps: list[tuple[str, int]] = []
        if i < d["dense"]:
            mlps.append((p + "mlp.", d["inter"]))
        else:
            specs += [(p + "mlp.gate.weight", (d["experts"], D), "router"),
                      (p + "mlp.gate.expert_bias", (d["experts"],), "expert_bias")]
            mlps += [(f"{p}mlp.experts.{j}.", d["moe_inter"]) for j in range(d["experts"])]
            if d["shared"]:
                mlps.append((p + "mlp.shared_experts.", d["moe_inter"] * d["shared"]))
        for pre, width in mlps:
            specs += [(pre + "gate_proj.weight", (width, D), "linear"), (pre + "up_proj.weight", (width, D), "linear"),
                      (pre + "down_proj.weight", (D, width), "linear")]
    specs += [("model.norm.weight", (D,), "norm"), ("lm_head.weight", (V, D), "head")]
    return specs


def _random_tensors(family: str, d: dict[str, int], seed: int, init_std: float | None,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound elementwise work; intra-op threads only add contention here
    try:
        for name, shape, kind in _tensor_specs(family, d):
            out[name] = _random_tensor(shape, kind, g, init_std, dtype)
    finally:
        torch.set_num_threads(threads)
    return out


def _random_tensor(shape: tuple[int, ...], kind: str, g: torch.Generator, init_std: float | None,
                   dtype: torch.dtype) -> torch.Tensor:
    t = torch.randn(shape, generator=g)  # fp32 draws, so a bf16 checkpoint is the rounded fp32 one
    if kind == "norm":
        t.mul_(0.1).add_(1.0)
    elif kind == "bias":
        t.mul_(0.5)
    elif kind == "expert_bias":
        t.mul_(0.1)  # comparable to sigmoid score gaps: it changes some selections
    elif kind == "router":
        t.mul_(3.0 / math.sqrt(shape[1]))  # sharp-ish routing: clear top-k gaps, still input dependent
    elif kind == "head":
        t.mul_(2.0 / math.sqrt(shape[1]) if init_std is None else init_std)
    elif kind == "linear":
        t.mul_(1.0 / math.sqrt(shape[1]) if init_std is None else init_std)
    # embed: std 1 (the first RMSNorm rescales anyway)
    return t if dtype == torch.float32 else t.to(dtype)


def _save(out: Path, tensors: dict[str, torch.Tensor], shards: int, dtype: torch.dtype) -> None:
    for old in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    names = list(tensors)
    if shards > len(names):
        raise ValueError(f"shards={shards} is more than the {len(names)} tensors")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    # Contiguous split into `shards` groups of about total/shards bytes; by tensor count if one would be empty.
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for name, size in zip(names, sizes):
        groups[min(shards - 1, acc * shards // max(total, 1))].append(name)
        acc += size
    if any(not g for g in groups):
        per, extra = divmod(len(names), shards)
        bounds = [k * per + min(k, extra) for k in range(shards + 1)]
        groups = [names[bounds[k]:bounds[k + 1]] for k in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / fname), metadata=meta)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- tokenizer


def write_tokenizer(out_dir: str | Path, family: str, vocab_size: int, ids: dict[str, int],
                    byte_level: bool = False) -> None:
    """tokenizer.json (BPE over printable ASCII, trained on a small built-in corpus; every id below vocab_size is
    a token), tokenizer_config.json (special tokens, chat template) and special_tokens_map.json.
    byte_level: the same vocabulary spelled as GPT-2 byte-level BPE (see write_random_checkpoint)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    budget = vocab_size - len(ids)
    if budget < _MIN_TOKENIZER_PIECES:
        raise ValueError(f"a tokenizer needs vocab_size >= {_MIN_TOKENIZER_PIECES + len(ids)} for {family} "
                         f"(got {vocab_size}); pass tokenizer=False for smaller vocabularies")
    pre = pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated")
    trained = Tokenizer(models.BPE(unk_token=_UNK))
    trained.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=budget, special_tokens=[_UNK], initial_alphabet=_ALPHABET,
                                  min_frequency=1, show_progress=False)
    trained.train_from_iterator([_CORPUS], trainer)
    model = json.loads(trained.to_str())["model"]
    pieces = [tok for tok, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Fill the rest of the vocabulary with word-like pieces, so any id decodes to something readable.
    taken = set(pieces) | set(ids)
    n = 0
    while len(pieces) < budget:
        word, m = "", n
        while True:
            word += _CONSONANTS[m % len(_CONSONANTS)] + _VOWELS[(m // len(_CONSONANTS)) % len(_VOWELS)]
            m //= len(_CONSONANTS) * len(_VOWELS)
            if m == 0:
                break
        n += 1
        if " " + word not in taken:
            pieces.append(" " + word)
            taken.add(" " + word)
    special = set(ids.values())
    free = (i for i in range(vocab_size) if i not in special)
    if byte_level:
        table = _byte_to_unicode()
        spell = lambda piece: "".join(table[b] for b in piece.encode())  # noqa: E731
        pieces = [p if p == _UNK else spell(p) for p in pieces]
        merges = [(spell(a), spell(b)) for a, b in merges]
    vocab = {tok: next(free) for tok in pieces}
    vocab.update(ids)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=_UNK))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre
        tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in sorted(ids, key=ids.get)])
    tok.save(str(out / "tokenizer.json"))

    roles = dict(_TOKENIZER_ROLES[family])
    tok_cfg: dict[str, Any] = {
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for s, i in sorted(ids.items(), key=lambda kv: kv[1])},
        **roles,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    for key in ("bos_token", "eos_token", "pad_token", "mask_token"):
        tok_cfg.setdefault(key, None)
    if CHAT_TEMPLATES[family] is not None:
        tok_cfg["chat_template"] = CHAT_TEMPLATES[family]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(roles, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- helpers


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: bytes that print as themselves keep their character, the others
    (space, control bytes, ...) take the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    if dtype not in names.values():
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype
