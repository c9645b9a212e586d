"""Tokenizer and chat template from local checkpoint files only (no network, no remote code)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError

END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|role_end|>")


def has_tokenizer_files(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.json").exists() or (
        (model_dir / "vocab.json").exists() and (model_dir / "merges.txt").exists())


def load_tokenizer(model_dir: Path) -> Any | None:
    """Returns a transformers tokenizer, or None when the directory ships no tokenizer files."""
    if not has_tokenizer_files(model_dir):
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable tokenizer config ({e})") from None
    if (model_dir / "tokenizer.json").exists():
        cls, culprit = PreTrainedTokenizerFast, model_dir / "tokenizer.json"
    else:
        cls, culprit = Qwen2Tokenizer, model_dir / "vocab.json"
    try:
        tok = cls.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is reported against the file
        raise CheckpointError(f"{culprit}: cannot load tokenizer ({type(e).__name__}: {e})") from None
    template = model_dir / "chat_template.jinja"
    if getattr(tok, "chat_template", None) is None and template.exists():
        tok.chat_template = template.read_text()
    return tok


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids of the chat templates' end-of-turn tokens that this vocabulary has."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
