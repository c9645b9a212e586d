"""unmask engine: model layer, loaders, diffusion decoding."""
from .config import ModelConfig
from .errors import CheckpointError, TokenizerMissingError
from .loader import load_model

__all__ = ["CheckpointError", "ModelConfig", "TokenizerMissingError", "load_model"]
