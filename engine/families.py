"""Checkpoint families: detection from config.json, config parsing, and tensor-name mapping.

Each family maps its checkpoint tensor names onto the one internal layout of `engine.model.Transformer`.
Expert tensors map to (stacked parameter, expert index); the loader stacks them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .config import ModelConfig
from .errors import CheckpointError
from .sdar import sdar_config

FAMILIES = ("llada", "llada_moe", "dream", "rnd1", "llada2_moe", "sdar")

# Special ids used when a real config.json lacks them (notes/models.md).
DEFAULT_SPECIAL_IDS: dict[str, dict[str, int | None]] = {
    "llada": {"mask": 126336, "eos": 126081, "pad": 126081, "bos": 126080},
    "llada_moe": {"mask": 156895, "eos": 156892, "pad": 156892, "bos": None},
    "dream": {"mask": 151666, "eos": 151643, "pad": 151643, "bos": 151643},
    "rnd1": {"mask": 151669, "eos": 151645, "pad": 151643, "bos": None},
    "llada2_moe": {"mask": 156895, "eos": 156892, "pad": 156892, "bos": None},
    # SDAR (Qwen3 tokenizer + <|MASK|>): the mask id is the tokenizer's mask_token (lmdeploy hard-codes 151669)
    "sdar": {"mask": 151669, "eos": 151645, "pad": 151643, "bos": None},
}


def detect_family(cfg: dict[str, Any], path: str) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise CheckpointError(f"{path}: key 'architectures' must be a list, got {type(archs).__name__}")
    model_type = str(cfg.get("model_type", ""))
    mt = model_type.lower()
    if mt == "llada2_moe" or any(a.startswith("LLaDA2") for a in archs):
        return "llada2_moe"
    if any(a.startswith("LLaDAMoE") for a in archs) or (mt in ("llada", "lladamoe", "llada_moe") and "num_experts" in cfg):
        return "llada_moe"
    if "LLaDAModelLM" in archs or (mt == "llada" and "d_model" in cfg):
        return "llada"
    if mt == "dream" or "DreamModel" in archs:
        return "dream"
    if mt == "rnd1" or any(a.startswith("RND1") for a in archs):
        return "rnd1"
    if mt == "sdar" or "SDARForCausalLM" in archs:
        return "sdar"
    raise CheckpointError(
        f"{path}: unknown architecture (architectures={archs}, model_type={model_type!r}); "
        f"supported: LLaDAModelLM, LLaDAMoEModelLM, DreamModel, RND1LM, LLaDA2MoeModelLM, SDARForCausalLM "
        f"(SDAR's MoE, sdar_moe, is not)")


class _Keys:
    """Typed access to config.json keys with errors that name the file and key."""

    def __init__(self, cfg: dict[str, Any], path: str, family: str) -> None:
        self.cfg, self.path, self.family = cfg, path, family

    def _check(self, key: str, value: Any, kind: type) -> Any:
        ok = isinstance(value, kind) and not isinstance(value, bool) if kind in (int, float) else isinstance(value, kind)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise CheckpointError(f"{self.path}: key '{key}' must be {kind.__name__}, got {value!r}")
        return value

    def req(self, key: str, kind: type = int) -> Any:
        if key not in self.cfg or self.cfg[key] is None:
            raise CheckpointError(f"{self.path}: missing required key '{key}' (family {self.family})")
        return self._check(key, self.cfg[key], kind)

    def opt(self, key: str, default: Any, kind: type = int) -> Any:
        value = self.cfg.get(key)
        return default if value is None else self._check(key, value, kind)

    def first(self, keys: tuple[str, ...], default: Any = None, kind: type = int) -> Any:
        for key in keys:
            if self.cfg.get(key) is not None:
                return self._check(key, self.cfg[key], kind)
        if default is None:
            raise CheckpointError(f"{self.path}: missing required key '{keys[0]}' (family {self.family})")
        return default

    def special(self, name: str) -> int | None:
        value = self.cfg.get(f"{name}_token_id")
        if isinstance(value, list):  # some configs list several eos ids; the first is the canonical one
            value = value[0] if value else None
        if value is None:
            return DEFAULT_SPECIAL_IDS[self.family][name]
        return self._check(f"{name}_token_id", value, int)


def parse_config(cfg: dict[str, Any], path: str) -> ModelConfig:
    """config.json (already parsed) -> ModelConfig. Raises CheckpointError naming the file and key."""
    family = detect_family(cfg, path)
    k = _Keys(cfg, path, family)
    if family == "llada":
        if k.opt("block_type", "llama", str) != "llama":
            raise CheckpointError(f"{path}: key 'block_type' = {cfg['block_type']!r} is not supported (only 'llama')")
        if k.opt("attention_layer_norm", False, bool):
            raise CheckpointError(f"{path}: key 'attention_layer_norm' = true is not supported")
        hidden, heads = k.req("d_model"), k.req("n_heads")
        mlp = k.opt("mlp_hidden_size", None) or k.opt("mlp_ratio", 4) * hidden
        out = dict(hidden_size=hidden, num_layers=k.req("n_layers"), num_heads=heads,
                   num_kv_heads=k.opt("n_kv_heads", heads), head_dim=hidden // heads, intermediate_size=mlp,
                   vocab_size=k.first(("embedding_size", "vocab_size")), rope_theta=k.opt("rope_theta", 10000.0, float),
                   rms_norm_eps=k.opt("rms_norm_eps", 1e-5, float),
                   qkv_bias=k.opt("include_bias", False, bool) or k.opt("include_qkv_bias", False, bool),
                   tie_embeddings=k.opt("weight_tying", False, bool),
                   max_position_embeddings=k.opt("max_sequence_length", 4096))
        n_moe = 0
    else:
        hidden, heads = k.req("hidden_size"), k.req("num_attention_heads")
        out = dict(hidden_size=hidden, num_layers=k.req("num_hidden_layers"), num_heads=heads,
                   num_kv_heads=k.opt("num_key_value_heads", heads), head_dim=k.opt("head_dim", hidden // heads),
                   vocab_size=k.req("vocab_size"), rope_theta=k.opt("rope_theta", 10000.0, float),
                   rms_norm_eps=k.opt("rms_norm_eps", 1e-6, float),
                   tie_embeddings=k.opt("tie_word_embeddings", False, bool),
                   max_position_embeddings=k.opt("max_position_embeddings", 4096))
        n_moe = k.req("num_experts") if family in ("llada_moe", "rnd1", "llada2_moe") else 0
    n_layers = out["num_layers"]
    if family == "llada_moe":
        out.update(qk_norm=k.opt("qk_layernorm", True, bool), num_experts=n_moe,
                   num_experts_per_tok=k.req("num_experts_per_tok"),
                   moe_intermediate_size=k.first(("expert_intermediate_size", "moe_intermediate_size")),
                   intermediate_size=k.first(("dense_intermediate_size", "intermediate_size"), 0),
                   norm_topk_prob=False,  # hard-coded False by the reference code, whatever the config says
                   moe_layers=(True,) * n_layers)
    elif family == "rnd1":
        dense = set(k.opt("mlp_only_layers", [], list))
        step = k.opt("decoder_sparse_step", 1)
        out.update(qk_norm=True, num_experts=n_moe, num_experts_per_tok=k.req("num_experts_per_tok"),
                   moe_intermediate_size=k.req("moe_intermediate_size"),
                   intermediate_size=k.opt("intermediate_size", 0),
                   norm_topk_prob=k.opt("norm_topk_prob", True, bool), shift_logits=True,
                   moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers)))
    elif family == "llada2_moe":
        out.update(_llada2_config(k, out, n_layers))
    elif family == "dream":
        out.update(intermediate_size=k.req("intermediate_size"), qkv_bias=True, shift_logits=True,
                   moe_layers=(False,) * n_layers)
    elif family == "sdar":
        out.update(sdar_config(k, n_layers))
    else:
        out.update(moe_layers=(False,) * n_layers)
    if out["num_heads"] % out["num_kv_heads"]:
        raise CheckpointError(f"{path}: num_heads {out['num_heads']} is not a multiple of kv heads {out['num_kv_heads']}")
    ids = {name: k.special(name) for name in ("mask", "eos", "pad", "bos")}
    eos_ids = stop_token_ids(cfg.get("eos_token_id"), path, "eos_token_id", out["vocab_size"])
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    for name in ("mask", "eos", "pad"):
        if not 0 <= ids[name] < out["vocab_size"]:
            raise CheckpointError(f"{path}: key '{name}_token_id' = {ids[name]} is outside the vocabulary "
                                  f"(size {out['vocab_size']})")
    return ModelConfig(family=family, mask_id=ids["mask"], eos_id=ids["eos"], pad_id=ids["pad"], bos_id=ids["bos"],
                       stop_ids=tuple(dict.fromkeys([ids["eos"], *eos_ids])), **out)


def _llada2_config(k: _Keys, out: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Bailing-MoE-V2 / LLaDA2 keys: dense first layers, sigmoid group-limited router, shared experts, partial
    rotary, fused QKV, block-causal attention. The router is always sigmoid with renormalised weights (the
    reference hard-codes it; score_function / norm_topk_prob are not consulted)."""
    path = k.path
    if k.opt("use_qkv_bias", False, bool) or k.opt("use_bias", False, bool):
        raise CheckpointError(f"{path}: key 'use_qkv_bias' / 'use_bias' = true is not supported for llada2_moe")
    experts, n_group = k.req("num_experts"), k.opt("n_group", 1)
    topk_group, top_k = k.opt("topk_group", 1), k.req("num_experts_per_tok")
    if n_group < 1 or experts % n_group or experts // n_group < 2:
        raise CheckpointError(f"{path}: key 'n_group' = {n_group} must divide num_experts {experts} into groups "
                              f"of at least 2 experts")
    if not 1 <= topk_group <= n_group or top_k > topk_group * (experts // n_group):
        raise CheckpointError(f"{path}: key 'topk_group' = {topk_group} must be in [1, n_group] and keep at least "
                              f"num_experts_per_tok = {top_k} experts")
    factor = k.opt("partial_rotary_factor", 1.0, float)
    rotary = k.opt("rotary_dim", None) or int(out["head_dim"] * factor)
    if not 0 < rotary <= out["head_dim"] or rotary % 2:
        raise CheckpointError(f"{path}: key 'partial_rotary_factor' = {factor} gives rotary_dim {rotary}; it must "
                              f"be even and in (0, head_dim={out['head_dim']}]")
    dense = k.opt("first_k_dense_replace", 0)
    shared = k.opt("num_shared_experts", 0)
    moe_inter = k.req("moe_intermediate_size")
    return dict(qk_norm=k.opt("use_qk_norm", True, bool), num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=moe_inter, intermediate_size=k.opt("intermediate_size", 0),
                norm_topk_prob=True, moe_layers=tuple(i >= dense for i in range(n_layers)),
                router="sigmoid_group", n_group=n_group, topk_group=topk_group,
                routed_scaling_factor=k.opt("routed_scaling_factor", 1.0, float),
                shared_expert_size=moe_inter * shared, rotary_dim=rotary, fused_qkv=True, block_causal=True)


def stop_token_ids(value: Any, path: str, key: str, vocab_size: int) -> list[int]:
    """Every id of an `eos_token_id` entry (an int or a list of ints; generation ends at any of them)."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size:
            raise CheckpointError(f"{path}: key '{key}' = {value!r} must be token ids in the vocabulary "
                                  f"(size {vocab_size})")
    return list(values)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    """Internal parameter name."""
    expert: int | None = None
    """Expert index for a stacked expert parameter."""


LLADA_GLOBAL_NAMES = {"model.transformer.wte.weight": "embed.weight", "model.transformer.ln_f.weight": "norm.weight",
                 "model.transformer.ff_out.weight": "lm_head.weight"}
LLADA_LAYER_NAMES = {"attn_norm.weight": "attn_norm.weight", "ff_norm.weight": "mlp_norm.weight",
                "q_proj.weight": "attn.q_proj.weight", "k_proj.weight": "attn.k_proj.weight",
                "v_proj.weight": "attn.v_proj.weight", "q_proj.bias": "attn.q_proj.bias",
                "k_proj.bias": "attn.k_proj.bias", "v_proj.bias": "attn.v_proj.bias",
                "attn_out.weight": "attn.o_proj.weight", "ff_proj.weight": "mlp.gate_proj.weight",
                "up_proj.weight": "mlp.up_proj.weight", "ff_out.weight": "mlp.down_proj.weight"}
_HF_GLOBAL = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
_HF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
             **{f"self_attn.{p}_proj.{w}": f"attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
             "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
             **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
             "mlp.gate.weight": "moe.router.weight"}
_HF_EXPERT = {f"{p}_proj.weight": f"moe.w_{p}" for p in ("gate", "up", "down")}
_LLADA2_GLOBAL = {"model.word_embeddings.weight": "embed.weight", "model.norm.weight": "norm.weight",
                  "lm_head.weight": "lm_head.weight"}
_LLADA2_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
                 "attention.query_key_value.weight": "attn.qkv_proj.weight",
                 "attention.query_layernorm.weight": "attn.q_norm.weight",
                 "attention.key_layernorm.weight": "attn.k_norm.weight",
                 "attention.dense.weight": "attn.o_proj.weight",
                 **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
                 **{f"mlp.shared_experts.{p}_proj.weight": f"moe.shared.{p}_proj.weight" for p in ("gate", "up", "down")},
                 "mlp.gate.weight": "moe.router.weight", "mlp.gate.expert_bias": "moe.expert_bias"}

_LLADA_LAYER_RE = re.compile(r"model\.transformer\.blocks\.(\d+)\.(.+)")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(.+)")


def tensor_mapper(family: str) -> Callable[[str], Target | None]:
    """Returns f(checkpoint_name) -> Target, or None for a name this family does not know."""
    llada = family == "llada"
    glob, layer, layer_re = (LLADA_GLOBAL_NAMES, LLADA_LAYER_NAMES, _LLADA_LAYER_RE) if llada else (_HF_GLOBAL, _HF_LAYER, _HF_LAYER_RE)
    if family == "llada2_moe":
        glob, layer = _LLADA2_GLOBAL, _LLADA2_LAYER

    def mapper(name: str) -> Target | None:
        if name in glob:
            return Target(glob[name])
        m = layer_re.fullmatch(name)
        if not m:
            return None
        i, rest = m.group(1), m.group(2)
        if rest in layer:
            return Target(f"layers.{i}.{layer[rest]}")
        e = None if llada else _HF_EXPERT_RE.fullmatch(rest)
        if e and e.group(2) in _HF_EXPERT:
            return Target(f"layers.{i}.{_HF_EXPERT[e.group(2)]}", int(e.group(1)))
        return None

    return mapper
