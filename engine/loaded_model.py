"""DiffusionModel: what load_model returns. The network (engine/model, tensors only) with its config, device, dtype
and kernel backend, the checkpoint's tokenizer (encode / decode / chat template, engine/chat.py) and `logits`, a
full bidirectional forward through an executor (engine/executor): this process, or every tensor-parallel rank."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from .chat import encode_chat
from .config import ModelConfig
from .errors import RequestError, TokenizerMissingError
from .forward_batch import ForwardBatch
from .model.attention import AttnContext
from .model.transformer import Transformer


class DiffusionModel:
    def __init__(self, net: Transformer, config: ModelConfig, tokenizer: Any | None, device: torch.device,
                 dtype: torch.dtype, path: Path, kernels: str = "torch", executor: Any = None) -> None:
        """kernels: the resolved backend, "torch" or "triton" (kernels/dispatch.py). executor: what runs `logits`
        (engine/executor; None: this process, LocalExecutor)."""
        from .executor.local import LocalExecutor
        self.net, self.config, self.tokenizer = net, config, tokenizer
        self.device, self.dtype, self.path, self.kernels = device, dtype, path, kernels
        self._executor = executor if executor is not None else LocalExecutor(net)
        self._encode_lock = threading.Lock()

    def with_executor(self, executor: Any) -> "DiffusionModel":
        """The same model (network, tokenizer) whose `logits` run through `executor` (a tensor-parallel driver)."""
        out = DiffusionModel(self.net, self.config, self.tokenizer, self.device, self.dtype, self.path, self.kernels,
                             executor)
        out._encode_lock = self._encode_lock
        return out

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               block_length: int | None = None) -> torch.Tensor:
        """input_ids [B, L] long -> [B, L, V] float32 logits of a full bidirectional forward, unshifted.

        attention_mask [B, L] (1 = token, 0 = padding) packs each row's tokens at positions 0..n-1; padded
        positions get zero logits. A row's logits do not depend on the rows batched with it.
        block_length B: block-causal attention instead (position i attends j iff j // B <= i // B: full inside a
        block, causal across blocks), as block-diffusion models (LLaDA2) are trained and decoded.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {list(input_ids.shape)}")
        if block_length is not None and not (isinstance(block_length, int) and block_length >= 1):
            raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
        input_ids = input_ids.to(self.device)
        B, L = input_ids.shape
        blocks = None if block_length is None else torch.full((B,), block_length, device=self.device)  # [B]
        if attention_mask is None:
            pos = torch.arange(L, device=self.device).repeat(B)  # [B*L]
            attn = AttnContext.from_lengths([L] * B, self.device, self.kernels, blocks)
            batch = ForwardBatch(input_ids.reshape(-1), pos, attn, max_pos=L - 1)
            return self._executor.run(batch, None).view(B, L, -1)
        mask = attention_mask.to(self.device).bool()  # [B, L]
        lengths = mask.sum(1).tolist()
        pos = (torch.cumsum(mask, 1) - 1)[mask]  # [T]
        attn = AttnContext.from_lengths(lengths, self.device, self.kernels, blocks)
        batch = ForwardBatch(input_ids[mask], pos, attn, max_pos=max(lengths) - 1)
        out = torch.zeros(B, L, self.config.vocab_size, device=self.device)
        out[mask] = self._executor.run(batch, None)
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenise as the checkpoint's tokenizer does by default (e.g. with its BOS)."""
        tok = self._require_tokenizer()
        with self._encode_lock:
            return tok.encode(text, add_special_tokens=add_special_tokens)

    tokenizer_encode = encode

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._require_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of chat messages (validated; content encoded as plain text, special tokens only from the
        template; OpenAI `tools` rendered when the template has a tool format). Raises ChatMessageError naming
        the message index and field."""
        tok = self._require_tokenizer()
        if getattr(tok, "chat_template", None) is None:
            raise RequestError(f"{self.path}: the tokenizer has no chat template; pass a plain prompt instead",
                               "messages")
        return encode_chat(tok, messages, self._encode_lock, tools)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise TokenizerMissingError(
                f"{self.path}: this checkpoint has no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                f"pass prompts as token-id lists", "prompt")
        return self.tokenizer
