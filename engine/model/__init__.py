"""The model layer: the network as tensors in, tensors out (transformer, layers, attention, tensor-parallel shards).
It imports nothing above it; the loaded model with its tokenizer is engine/loaded_model.py."""
from .transformer import Transformer

__all__ = ["Transformer"]
