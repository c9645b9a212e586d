"""unmask engine: model layer, loaders, diffusion decoding, caches, scheduling."""
from .async_engine import AsyncEngine, RequestStream
from .config import ModelConfig
from .errors import (ChatMessageError, CheckpointError, EngineError, ParallelError, RequestError, RequestTooLargeError,
                     RequestTypeError, TokenizerMissingError)
from .llm import LLM
from .loader import load_model
from .outputs import RequestOutput
from .sampling_params import SamplingParams, SamplingParamsError

__all__ = ["AsyncEngine", "ChatMessageError", "CheckpointError", "EngineError", "LLM", "ModelConfig", "ParallelError",
           "RequestError", "RequestOutput", "RequestStream", "RequestTooLargeError", "RequestTypeError", "SamplingParams",
           "SamplingParamsError", "TokenizerMissingError", "load_model"]
