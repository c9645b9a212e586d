"""The bundled default model: a tiny LLaDA trained on a synthetic digit task (see task.py, train.py)."""
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "tiny-llada-sort"

__all__ = ["DEFAULT_MODEL_DIR"]
