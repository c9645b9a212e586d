"""A request's Constraint for a model: its grammar compiled (cached) for the model's tokenizer."""
from __future__ import annotations

from typing import Any

from .decoder import Constraint
from .grammars import GRAMMARS, Vocab
from .spec import StructuredOutputs, StructuredOutputsError


def compile_for(spec: StructuredOutputs, model: Any) -> tuple[Any, Vocab]:
    """Compile spec for model's tokenizer (cached); raises StructuredOutputsError for an invalid spec or a model
    without a tokenizer."""
    tok = model.tokenizer
    if tok is None:
        raise StructuredOutputsError(spec.param, "structured outputs need a tokenizer and this checkpoint has none")
    cfg = model.config
    vocab = GRAMMARS.vocab(tok, cfg.vocab_size, list(cfg.stop_ids))
    return GRAMMARS.compile(spec, vocab), vocab


def make_constraint(spec: StructuredOutputs | None, model: Any) -> Constraint | None:
    """A request's Constraint (None for an unconstrained request)."""
    if spec is None:
        return None
    matcher, vocab = compile_for(spec, model)
    return Constraint(matcher, vocab, list(model.config.stop_ids), model.config.mask_id)
