"""A plain-torch reference for SDAR (`sdar`), written from reading JetAstra/SDAR's modeling_sdar.py and generate.py
(engine/sdar.py lists what was read), without engine/, so the engine can be tested against it.

Forward: embed_tokens -> per layer x += o_proj(attn(norm(x))), x += mlp(norm(x)) -> norm -> lm_head (or the
embedding when tied); attention: q/k/v projections (+ bias with attention_bias), RMSNorm per head on q and k, then
full rotate-half RoPE, GQA, boolean block mask (query i sees key j iff j // B <= i // B; None: full attention).

block_diffusion_generate at temperature 0 (greedy: argmax, confidence = softmax of the raw logits at it), remasking
'low_confidence_dynamic': canvas of ceil((P + G) / B) blocks, blocks P // B onwards, each forward over the canvas up
to the current block's end (the published loop runs the block on a cache of the earlier blocks: the same numbers),
at most `steps` steps per block (a block ends as soon as no mask is left), quota[s] = B // steps + (s < B % steps);
commit the masked positions with confidence > threshold when at least quota[s] of them, else the quota's most
confident masked ones (never more than the masks left; see engine/sdar.py); after each block, stop if a stop id was
generated. The mask token is never a candidate (as for every family in unmask). Returns the G generated tokens cut
after the first stop id (inclusive), as the engine's API returns them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.reference_llada2 import cut_at_stop


class RefSDAR:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.cfg = c = json.loads((path / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            self.w.update({k: v.float() for k, v in load_file(str(f)).items()})
        self.H, self.KV = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c.get("head_dim") or c["hidden_size"] // self.H
        self.eps = c["rms_norm_eps"]
        tok = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() \
            else {}
        added = {v["content"]: int(k) for k, v in tok.get("added_tokens_decoder", {}).items()}
        self.mask_id = added.get(tok.get("mask_token"), c.get("mask_token_id", 151669))
        self.eos_id = c.get("eos_token_id", 151645)
        self.head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """x [heads, L, hd] at positions 0..L-1."""
        L, hd = x.shape[1], self.hd
        inv = 1.0 / (self.cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))  # [hd / 2]
        ang = torch.outer(torch.arange(L).float(), inv)  # [L, hd / 2]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        half = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + half * sin

    def _proj(self, h: torch.Tensor, name: str) -> torch.Tensor:
        out = h @ self.w[name + ".weight"].T
        return out + self.w[name + ".bias"] if name + ".bias" in self.w else out

    @torch.no_grad()
    def logits(self, ids: list[int], block_length: int | None) -> torch.Tensor:
        """ids [L] -> [L, V] float32; block_length None: full attention, else block-causal."""
        w, L, H, KV, hd = self.w, len(ids), self.H, self.KV, self.hd
        pos = torch.arange(L)
        see = torch.ones(L, L, dtype=torch.bool) if block_length is None else \
            (pos[None, :] // block_length) <= (pos[:, None] // block_length)  # [L(query), L(key)]
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]  # [L, D]
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"])
            q = self._proj(h, p + "self_attn.q_proj").view(L, H, hd).transpose(0, 1)  # [H, L, hd]
            k = self._proj(h, p + "self_attn.k_proj").view(L, KV, hd).transpose(0, 1)  # [KV, L, hd]
            v = self._proj(h, p + "self_attn.v_proj").view(L, KV, hd).transpose(0, 1)
            q = self._rope(self._norm(q, w[p + "self_attn.q_norm.weight"]))
            k = self._rope(self._norm(k, w[p + "self_attn.k_norm.weight"]))
            k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
            scores = (q @ k.transpose(1, 2)) * hd ** -0.5  # [H, L, L]
            att = torch.softmax(scores.masked_fill(~see, float("-inf")), -1) @ v  # [H, L, hd]
            x = x + self._proj(att.transpose(0, 1).reshape(L, H * hd), p + "self_attn.o_proj")
            h = self._norm(x, w[p + "post_attention_layernorm.weight"])
            mlp = p + "mlp."
            x = x + (F.silu(h @ w[mlp + "gate_proj.weight"].T) * (h @ w[mlp + "up_proj.weight"].T)) \
                @ w[mlp + "down_proj.weight"].T
        return self._norm(x, w["model.norm.weight"]) @ self.head.T

    @torch.no_grad()
    def generate(self, prompt: list[int], gen_length: int, block_length: int, steps: int, threshold: float = 0.85,
                 stop_ids: tuple[int, ...] | None = None) -> list[int]:
        stop_ids = (self.eos_id,) if stop_ids is None else stop_ids
        P, B = len(prompt), block_length
        n_blocks = -(-(P + gen_length) // B)
        x = prompt + [self.mask_id] * (n_blocks * B - P)
        quota = [B // steps + (1 if s < B % steps else 0) for s in range(steps)]
        for blk in range(P // B, n_blocks):
            lo, hi = blk * B, (blk + 1) * B
            for s in range(steps + 1):
                masked = [i for i in range(lo, hi) if x[i] == self.mask_id]
                if not masked:
                    break
                assert s < steps, "masks left after the block's steps: the published loop would index past its quota"
                lg = self.logits(x[:hi], B)[lo:hi]  # [B, V]
                probs = torch.softmax(lg, -1)
                lg[:, self.mask_id] = float("-inf")
                x0 = lg.argmax(-1)
                conf = {i: float(probs[i - lo, x0[i - lo]]) for i in masked}
                high = [i for i in masked if conf[i] > threshold]
                q = quota[s]
                chosen = high if len(high) >= q else sorted(masked, key=lambda i: -conf[i])[:q]
                for i in chosen:
                    x[i] = int(x0[i - lo])
            if any(t in stop_ids for t in x[P:hi]):
                break
        return cut_at_stop(x[P:P + gen_length], stop_ids)
