"""The model-architecture config: one dataclass that describes every supported family."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ModelConfig:
    family: str
    """One of: llada, llada_moe, dream, rnd1, llada2_moe, sdar."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    """Dense SwiGLU width (unused by all-MoE models)."""
    vocab_size: int
    """Rows of the embedding / lm_head (the logits width)."""
    rope_theta: float
    rms_norm_eps: float
    mask_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    qk_norm: bool = False
    """RMSNorm over head_dim on q and k, before RoPE (LLaDA-MoE, RND1)."""
    qkv_bias: bool = False
    """Bias on q/k/v projections (Dream)."""
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    """Renormalise the top-k router weights to sum 1 (RND1: yes, LLaDA-MoE: no)."""
    moe_layers: tuple[bool, ...] = ()
    """Per layer: True where the MLP is a mixture of experts."""
    shift_logits: bool = False
    """Position i is predicted from the output at i-1 (Dream, RND1). The sampler applies the shift."""
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    router: str = "softmax"
    """MoE router: "softmax" (top-k of softmax) or "sigmoid_group" (LLaDA2: sigmoid scores, expert_bias for
    selection only, group-limited top-k, renormalised unbiased weights times routed_scaling_factor)."""
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_size: int = 0
    """Width of the shared-expert SwiGLU added unweighted to every MoE output (0: none)."""
    rotary_dim: int = 0
    """RoPE on the first rotary_dim dims of each head only (partial rotary); 0 = head_dim."""
    fused_qkv: bool = False
    """The checkpoint stores q/k/v as one fused projection (H q heads, then KV k heads, then KV v heads)."""
    block_causal: bool = False
    """Block-diffusion model (LLaDA2): attention is full inside a block and causal across blocks; generation
    uses block-aligned canvases (engine/block_diffusion.py)."""
    stop_ids: tuple[int, ...] = field(default=())
    """Token ids that end a completion (EOS plus the chat template's end-of-turn token when known)."""

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
