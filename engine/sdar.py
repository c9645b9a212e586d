"""SDAR (JetAstra/SDAR; JetLM/SDAR-{1.7B,4B,8B}-Chat): a family adapter onto the block-diffusion machinery built for
LLaDA2 (block-causal attention, the exact block cache, the llada2 transfer rule, engine/block_diffusion.py).

What was read where (the published code, read and re-implemented, nothing pasted):
- github.com/JetAstra/SDAR, training/model/SDAR-4B-Chat/modeling_sdar.py (transformers' Qwen3 modelling with a
  block-diffusion cache): SDARForCausalLM -> model.embed_tokens, per layer input_layernorm -> self_attn
  ({q,k,v}_proj with bias iff attention_bias, q_norm / k_norm = RMSNorm over head_dim applied per head BEFORE RoPE,
  full rotate-half RoPE over head_dim with rope_theta, GQA, scale head_dim**-0.5, o_proj) -> residual ->
  post_attention_layernorm -> SwiGLU mlp.{gate,up,down}_proj -> residual; model.norm; lm_head (tied to the
  embedding when tie_word_embeddings). Inference attention takes the 4-D 0/1 mask as a boolean SDPA mask (True =
  attend). Logits are not shifted: position i's logits predict position i (training scores labels in place; the
  generate loop samples x0 at the block's own positions).
- github.com/JetAstra/SDAR, generate.py, block_diffusion_generate: canvas num_blocks = ceil((P + G) / B) blocks,
  mask tril(num_blocks) repeated to B x B tiles (query i sees key j iff j // B <= i // B), prefill of the
  P // B whole prompt blocks, then blocks P // B .. num_blocks - 1, each denoised over the prefix up to its end
  (cache of earlier blocks, stored once the block has no mask left: exact, as engine's block cache),
  num_transfer_tokens = even split of B over denoising_steps (remainder first), remasking
  'low_confidence_dynamic' (default): the masked positions with confidence strictly > confidence_threshold when
  there are at least the step's quota of them, else the top-quota: the llada2 transfer rule
  (engine/decoding/transfer/llada2.py); stop after a block once a stop id (generation_config eos) is generated.
  Defaults: gen_length 128, block_length 4, denoising_steps 4, temperature 1.0, threshold 0.85.
- Special ids: the tokenizer's mask_token <|MASK|> (generate.py reads it there; lmdeploy's SDAR config builder
  hard-codes 151669), eos <|im_end|> 151645 / pad <|endoftext|> 151643 (Qwen3's tokenizer); config ids win.
- Config keys: Qwen3's (SDARConfig: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
  num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope_theta, rope_scaling, attention_bias,
  tie_word_embeddings, use_sliding_window, ...), model_type "sdar", architectures ["SDARForCausalLM"].

Deviations, as for every family: at temperature 0 the candidate is the argmax and its confidence the softmax of
the raw logits (the published sampler divides by the temperature and always draws; 0 is its greedy limit); the
mask token is never a candidate; when a step's quota exceeds the block's masks only masked positions are committed
(the published top-k would then pick already-filled positions, overwriting prompt or committed tokens); each
block's steps are capped at max_tokens (LLaDA2's cap; SDAR has none: it differs only when steps per block exceed
max_tokens). Not supported: SDAR's MoE (sdar_moe), rope_scaling, sliding windows; remasking 'sequential' and
'low_confidence_static' (the latter is threshold=1.0).
"""
from __future__ import annotations

from typing import Any

from .errors import CheckpointError


def sdar_config(k: Any, n_layers: int) -> dict[str, Any]:
    """ModelConfig fields of an SDAR config.json (k: families._Keys); options its inference path does not use are
    refused, naming the key."""
    if k.cfg.get("rope_scaling") is not None:
        raise CheckpointError(f"{k.path}: key 'rope_scaling' = {k.cfg['rope_scaling']!r} is not supported for sdar "
                              f"(only plain RoPE)")
    if k.opt("use_sliding_window", False, bool):
        raise CheckpointError(f"{k.path}: key 'use_sliding_window' = true is not supported for sdar")
    return dict(intermediate_size=k.req("intermediate_size"), qkv_bias=k.opt("attention_bias", False, bool),
                qk_norm=True, moe_layers=(False,) * n_layers, block_causal=True)
