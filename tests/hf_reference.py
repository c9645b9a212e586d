"""Reference models from `transformers` with the weights of a checkpoint directory, run with FULL (non-causal)
attention. Used as the ground truth for the engine's logits.

    LLaDA      -> LlamaForCausalLM
    Dream      -> Qwen2ForCausalLM (q/k/v biases)
    RND1       -> Qwen3MoeForCausalLM, norm_topk_prob from config (True)
    LLaDA-MoE  -> Qwen3MoeForCausalLM, norm_topk_prob=False, QK-norm

Config keys and tensor names are read straight from the checkpoint files, written here independently of
engine.families. Qwen3-MoE in transformers 5.x stores experts fused: mlp.experts.gate_up_proj [E, 2I, D]
(gate rows first, then up) and mlp.experts.down_proj [E, D, I].
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _family(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if "LLaDAMoEModelLM" in archs:
        return "llada_moe"
    if "LLaDAModelLM" in archs:
        return "llada"
    if "DreamModel" in archs:
        return "dream"
    if "RND1LM" in archs:
        return "rnd1"
    raise ValueError(f"hf_reference: unknown architectures {archs}")


def read_checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    files = (sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.exists() else sorted(model_dir.glob("*.safetensors")))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).float()
    return out


def _hf_config(family: str, cfg: dict[str, Any]):
    from transformers import LlamaConfig, Qwen2Config, Qwen3MoeConfig

    if family == "llada":
        heads = cfg["n_heads"]
        c = LlamaConfig(hidden_size=cfg["d_model"], intermediate_size=cfg["mlp_hidden_size"],
                        num_hidden_layers=cfg["n_layers"], num_attention_heads=heads,
                        num_key_value_heads=cfg.get("n_kv_heads") or heads, head_dim=cfg["d_model"] // heads,
                        vocab_size=cfg["embedding_size"], rms_norm_eps=cfg["rms_norm_eps"],
                        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
                        max_position_embeddings=cfg["max_sequence_length"], tie_word_embeddings=False,
                        attention_bias=False, mlp_bias=False, hidden_act="silu")
    elif family == "dream":
        c = Qwen2Config(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                        num_key_value_heads=cfg["num_key_value_heads"], vocab_size=cfg["vocab_size"],
                        rms_norm_eps=cfg["rms_norm_eps"],
                        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
                        max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False,
                        use_sliding_window=False, hidden_act="silu")
    else:
        heads = cfg["num_attention_heads"]
        moe_inter = cfg["moe_intermediate_size"] if family == "rnd1" else cfg["expert_intermediate_size"]
        c = Qwen3MoeConfig(hidden_size=cfg["hidden_size"], intermediate_size=cfg.get("intermediate_size") or 1,
                           num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                           num_key_value_heads=cfg["num_key_value_heads"],
                           head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
                           rms_norm_eps=cfg["rms_norm_eps"],
                           rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
                           max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False,
                           num_experts=cfg["num_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                           moe_intermediate_size=moe_inter, decoder_sparse_step=1, mlp_only_layers=[],
                           # LLaDA-MoE's reference code hard-codes no renormalisation; RND1 renormalises.
                           norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) if family == "rnd1" else False,
                           attention_bias=False, use_sliding_window=False, hidden_act="silu")
    c.is_causal = False  # masking_utils builds a bidirectional mask when the config says so
    return c


def _hf_state_dict(family: str, ckpt: dict[str, torch.Tensor], n_layers: int,
                   n_experts: int) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    if family == "llada":
        glob = {"model.transformer.wte.weight": "model.embed_tokens.weight",
                "model.transformer.ln_f.weight": "model.norm.weight",
                "model.transformer.ff_out.weight": "lm_head.weight"}
        layer = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm", "q_proj": "self_attn.q_proj",
                 "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
                 "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
        for name, t in ckpt.items():
            if name in glob:
                sd[glob[name]] = t
                continue
            m = re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.weight", name)
            if not m or m.group(2) not in layer:
                raise ValueError(f"hf_reference: unexpected LLaDA tensor {name}")
            sd[f"model.layers.{m.group(1)}.{layer[m.group(2)]}.weight"] = t
        return sd
    experts: dict[tuple[int, int, str], torch.Tensor] = {}
    for name, t in ckpt.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m:
            experts[(int(m.group(1)), int(m.group(2)), m.group(3))] = t
        else:
            sd[name] = t
    if family in ("llada_moe", "rnd1"):
        for i in range(n_layers):
            sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([experts.pop((i, j, "gate")), experts.pop((i, j, "up"))], 0) for j in range(n_experts)])
            sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
                [experts.pop((i, j, "down")) for j in range(n_experts)])
    if experts:
        raise ValueError(f"hf_reference: leftover expert tensors {sorted(experts)[:3]}")
    return sd


def build_reference(model_dir: str | Path, attn_implementation: str = "eager"):
    """-> (transformers model in float32, eval mode, non-causal, weights of model_dir; family)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3MoeForCausalLM

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    family = _family(cfg)
    hf_cfg = _hf_config(family, cfg)
    hf_cfg._attn_implementation = attn_implementation
    cls = {"llada": LlamaForCausalLM, "dream": Qwen2ForCausalLM}.get(family, Qwen3MoeForCausalLM)
    torch.manual_seed(0)
    model = cls(hf_cfg).float().eval()
    n_layers = hf_cfg.num_hidden_layers
    sd = _hf_state_dict(family, read_checkpoint_tensors(model_dir), n_layers, getattr(hf_cfg, "num_experts", 0))
    params = dict(model.named_parameters())
    missing, unexpected = set(params) - set(sd), set(sd) - set(params)
    if missing or unexpected:
        raise ValueError(f"hf_reference: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"hf_reference: {name} has shape {list(t.shape)}, model wants {list(params[name].shape)}")
    model.load_state_dict(sd, strict=True)
    n_attn = 0
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
            n_attn += 1
    if n_attn < n_layers:
        raise AssertionError(f"hf_reference: found {n_attn} attention modules with is_causal, expected {n_layers}")
    return model.requires_grad_(False), family


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] -> [B, L, V] float32 logits, non-causal."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                is_causal=False)
    return out.logits.float()
