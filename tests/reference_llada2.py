"""A plain-torch reference for LLaDA2 (`llada2_moe`): the model forward read straight from the checkpoint's
config.json and safetensors, and the published `generate` loop (shared/notes/llada2.md), written without
engine/ so the engine can be tested against it.

Forward: word_embeddings -> per layer x += dense(attn(norm(x))), x += mlp(norm(x)) -> norm -> lm_head, with the
fused query_key_value split into H q / KV k / KV v heads, per-head QK RMSNorm, partial NeoX RoPE on the first
int(head_dim * partial_rotary_factor) dims, GQA, an additive block-causal mask (0 / -inf), dense first layers, and
MoE layers with the sigmoid group-limited router (expert_bias for selection only) plus shared experts, computed
expert by expert over a python loop (the HF `moe_infer` way).

generate (temperature 0): canvas ceil((P + G) / B) * B, blocks from P // B, each forward over the prefix up to the
current block's end, quota = even split of B over the block's steps, "all confidences > threshold if at least the
quota, else the top-quota", stop after the block holding the first EOS. As everywhere in unmask, the mask token is
never a candidate (the published code could "commit" [MASK]; the engine documents that deviation for every family).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class RefLLaDA2:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.cfg = json.loads((path / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            self.w.update({k: v.float() for k, v in load_file(str(f)).items()})
        c = self.cfg
        self.H, self.KV, self.hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.rd = int(self.hd * c.get("partial_rotary_factor", 1.0))
        self.eps = c["rms_norm_eps"]
        self.mask_id = c.get("mask_token_id", 156895)
        self.eos_id = c.get("eos_token_id", 156892)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, x: torch.Tensor, L: int) -> torch.Tensor:
        """x [H, L, hd]: rotate-half RoPE on the first rd dims."""
        inv = 1.0 / (self.cfg["rope_theta"] ** (torch.arange(0, self.rd, 2).float() / self.rd))
        freqs = torch.outer(torch.arange(L).float(), inv)
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos(), emb.sin()
        rot, rest = x[..., :self.rd], x[..., self.rd:]
        half = self.rd // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
        return torch.cat([rot * cos + rotated * sin, rest], -1)

    def _swiglu(self, x: torch.Tensor, pre: str) -> torch.Tensor:
        w = self.w
        return F.silu(x @ w[pre + "gate_proj.weight"].T) * (x @ w[pre + "up_proj.weight"].T) @ w[pre + "down_proj.weight"].T

    def _moe(self, x: torch.Tensor, p: str) -> torch.Tensor:
        c, w = self.cfg, self.w
        E, k, G, TG = c["num_experts"], c["num_experts_per_tok"], c["n_group"], c["topk_group"]
        scores = torch.sigmoid(x @ w[p + "mlp.gate.weight"].T)  # [L, E]
        biased = scores + w[p + "mlp.gate.expert_bias"]
        L = x.shape[0]
        gscore = biased.view(L, G, E // G).topk(2, dim=-1).values.sum(-1)  # [L, G]
        keep = torch.zeros(L, G, dtype=torch.bool)
        keep[torch.arange(L)[:, None], gscore.topk(TG, dim=-1).indices] = True
        cand = biased.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))  # [L, E]
        chosen = cand.topk(k, dim=-1).indices  # [L, k]
        wts = scores.gather(1, chosen)
        if k > 1:
            wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
        combine = torch.zeros_like(scores)  # [L, E] weight of each expert for each token (0: not chosen)
        combine[torch.arange(L)[:, None], chosen] = wts * c["routed_scaling_factor"]
        out = sum(combine[:, e:e + 1] * self._swiglu(x, f"{p}mlp.experts.{e}.") for e in range(E))
        if c.get("num_shared_experts"):
            out = out + self._swiglu(x, p + "mlp.shared_experts.")
        return out

    @torch.no_grad()
    def logits(self, ids: list[int], block_length: int | None) -> torch.Tensor:
        """ids [L] -> [L, V] float32; block_length None: full attention, else block-causal."""
        c, w = self.cfg, self.w
        L = len(ids)
        x = w["model.word_embeddings.weight"][torch.tensor(ids)]
        pos = torch.arange(L)
        if block_length is None:
            bias = torch.zeros(L, L)
        else:
            allowed = (pos[None, :] // block_length) <= (pos[:, None] // block_length)
            bias = torch.zeros(L, L).masked_fill(~allowed, float("-inf"))
        H, KV, hd = self.H, self.KV, self.hd
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"])
            qkv = (h @ w[p + "attention.query_key_value.weight"].T).view(L, H + 2 * KV, hd).transpose(0, 1)
            q, k, v = qkv[:H], qkv[H:H + KV], qkv[H + KV:]
            q = self._rope(self._norm(q, w[p + "attention.query_layernorm.weight"]), L)
            k = self._rope(self._norm(k, w[p + "attention.key_layernorm.weight"]), L)
            k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
            att = torch.softmax(q @ k.transpose(1, 2) * hd ** -0.5 + bias, -1) @ v  # [H, L, hd]
            x = x + att.transpose(0, 1).reshape(L, H * hd) @ w[p + "attention.dense.weight"].T
            h = self._norm(x, w[p + "post_attention_layernorm.weight"])
            x = x + (self._swiglu(h, p + "mlp.") if i < c.get("first_k_dense_replace", 0) else self._moe(h, p))
        return self._norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T

    @torch.no_grad()
    def generate(self, prompt: list[int], gen_length: int, block_length: int, steps: int,
                 threshold: float = 0.95, stop_ids: tuple[int, ...] | None = None,
                 editing_threshold: float | None = None, max_post_steps: int = 16,
                 edit_if: "Callable[[int, int, float], bool] | None" = None) -> list[int]:
        """LLaDA2MoeModelLM.generate at temperature 0 (steps = per block). Returns the G-token continuation cut
        after the first stop token (inclusive), as the reference returns it.

        editing_threshold (LLaDA2.1 token editing, diffusers' LLaDA2Pipeline loop): every step also replaces a
        committed generated token of the block whose candidate differs with confidence > editing_threshold; after
        the block's last mask, post steps run while they edit, at most max_post_steps + 1; a block filled by its
        last step ends there. Generation stops once a stop token is present with everything before it filled.
        edit_if(current, candidate, conf): another editing rule's condition (default: candidate != current and
        conf > editing_threshold)."""
        if edit_if is None:
            def edit_if(cur: int, cand: int, c: float) -> bool:
                return cand != cur and c > editing_threshold
        stop_ids = (self.eos_id,) if stop_ids is None else stop_ids
        steps = min(steps, gen_length)
        P, B = len(prompt), block_length
        nb = (P + gen_length + B - 1) // B
        x = prompt + [self.mask_id] * (nb * B - P)
        quota = [B // steps + (1 if s < B % steps else 0) for s in range(steps)]
        for blk in range(P // B, nb):
            end = (blk + 1) * B
            gen_pos = [i for i in range(end - B, end) if i >= P]
            step = post = 0
            while True:
                masked = [i for i in gen_pos if x[i] == self.mask_id]
                if not masked and editing_threshold is None:
                    break
                if not masked:
                    post += 1
                lg = self.logits(x[:end], B)
                probs = torch.softmax(lg, -1)
                lg[:, self.mask_id] = float("-inf")  # never a candidate (see module docstring)
                x0 = lg.argmax(-1)
                conf = {i: float(probs[i, x0[i]]) for i in gen_pos}
                chosen = []
                if masked:
                    q = quota[min(step, steps - 1)]
                    high = [i for i in masked if conf[i] > threshold]
                    chosen = high if len(high) >= q else sorted(masked, key=lambda i: -conf[i])[:min(q, len(masked))]
                edited = [] if editing_threshold is None else [
                    i for i in gen_pos if x[i] != self.mask_id and edit_if(x[i], int(x0[i]), conf[i])]
                for i in chosen + edited:
                    x[i] = int(x0[i])
                if masked:
                    step += 1
                    if step >= steps:
                        break
                elif not edited or post > max_post_steps:
                    break
                if self._stopped(x, P, stop_ids) and editing_threshold is not None:
                    break
            if self._stopped(x, P, stop_ids):
                break
        return cut_at_stop(x[P:P + gen_length], stop_ids)

    def _stopped(self, x: list[int], P: int, stop_ids: tuple[int, ...]) -> bool:
        """A stop token is present in the generated region with every position before it filled."""
        for t in x[P:]:
            if t in stop_ids:
                return True
            if t == self.mask_id:
                return False
        return False


def cut_at_stop(out: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """The generated tokens up to and including the first stop token (the reference loops return it)."""
    for j, t in enumerate(out):
        if t in stop_ids:
            return out[:j + 1]
    return out
