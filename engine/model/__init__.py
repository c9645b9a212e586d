from .diffusion_model import DiffusionModel
from .transformer import Transformer

__all__ = ["DiffusionModel", "Transformer"]
