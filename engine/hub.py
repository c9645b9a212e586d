"""Model references: a checkpoint directory, or a Hugging Face repo id resolved through huggingface_hub.

    resolve_model_path("GSAI-ML/LLaDA-8B-Instruct")   # -> .../models--GSAI-ML--LLaDA-8B-Instruct/snapshots/<hash>
    resolve_model_path("./my-checkpoint")              # -> Path("./my-checkpoint"), untouched

A reference that is an existing directory is used as is. Otherwise a reference shaped like a repo id (`org/name`,
optionally `org/name@revision`) is looked up in the local Hugging Face cache first (HF_HOME / HF_HUB_CACHE are
honoured by huggingface_hub), then downloaded with progress bars when the hub may be reached (HF_HUB_OFFLINE unset).
Offline and not cached, or not found on the hub, is a CheckpointError naming the repo id and what to do. Only the
files a checkpoint needs are fetched (configs, safetensors weights, tokenizer files, chat templates).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}")
"""Hugging Face repo ids: `namespace/name` of letters, digits, '-', '_', '.'."""
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
"""What a checkpoint needs; .bin / .pth / .gguf duplicates of the weights are not downloaded."""


def is_repo_id(ref: str) -> bool:
    repo, _, revision = ref.partition("@")
    return bool(REPO_ID.fullmatch(repo)) and ".." not in repo and not repo.endswith(".") and (
        not revision or bool(re.fullmatch(r"[\w.\-/]{1,128}", revision)))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_model_path(model: str | Path) -> Path:
    """The local directory of a model reference (see the module docstring)."""
    path = Path(model)
    if path.is_dir() or isinstance(model, Path) or not is_repo_id(str(model)) or path.exists():
        return path
    repo_id, _, revision = str(model).partition("@")
    return _from_hub(repo_id, revision or None)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise CheckpointError(f"{repo_id!r} is not a directory, and huggingface_hub (needed to resolve Hugging Face "
                              f"repo ids) is not installed") from None
    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass  # not (fully) cached
    if hub_offline() or constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"model {repo_id!r}: no such directory, and this Hugging Face repo is not in the local cache ({cache}) "
            f"while offline (HF_HUB_OFFLINE=1): download it once online (`hf download {repo_id}`), set HF_HOME to "
            f"the cache that holds it, or pass a checkpoint directory") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except GatedRepoError as e:
        raise CheckpointError(f"model {repo_id!r}: the Hugging Face repo is gated; accept its terms on the hub and "
                              f"log in (`hf auth login` or HF_TOKEN) ({type(e).__name__})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"model {repo_id!r}: no such directory, and no such Hugging Face repo"
                              f"{' revision ' + repr(revision) if revision else ''} ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - network and hub failures, named against the repo id
        raise CheckpointError(f"model {repo_id!r}: cannot download it from the Hugging Face hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); set "
                              f"HF_HUB_OFFLINE=1 to use the local cache ({cache}) only") from None
