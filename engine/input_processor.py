"""The input processor: a request (prompt + SamplingParams) -> a Sequence ready for the scheduler, each step once.

Shared by LLM (generate / chat / iter_steps) and AsyncEngine (so the server): SamplingParams are resolved against
the model once (validated on construction; again only if mutated since), the prompt is tokenised and its ids
checked once (vocabulary, mask token, context length), and `build_sequence` makes the Sequence once, with its
KV-pool fit check, its row of the batched-parameters table (engine/batch_params.py) and its structured-output
state. AsyncEngine runs all of it on the caller's thread, so a bad request raises there and the engine thread only
queues the finished Sequence.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence as Seq

from .batch_params import param_row
from .constraints.build import make_constraint
from .errors import RequestError, RequestTypeError
from .sampling_params import GenerationDefaults, ModelLimits, ResolvedParams, SamplingParams, check_context
from .sequence import Sequence

if TYPE_CHECKING:
    from .loaded_model import DiffusionModel
    from .scheduler import Scheduler

Prompt = str | list[int]


class PromptIds(list):
    """Token ids already checked against the model (in the vocabulary, no mask token): processing them again
    skips the scan (the server tokenises before it submits)."""


def build_sequence(model: "DiffusionModel", scheduler: "Scheduler", request_id: str, prompt_ids: list[int],
                   params: ResolvedParams) -> Sequence:
    """A request's host state: checked to fit the KV pool, its parameter row and constraint built. Reads no
    mutable engine state, so any thread may call it."""
    cfg = model.config
    if cfg.block_causal:  # the block-aligned canvas must fit the context (the plain check ran on the prompt ids)
        check_context(len(prompt_ids), params.max_tokens, cfg.max_position_embeddings,
                      block_length=params.block_length)
    seq = Sequence(request_id, list(prompt_ids), params, shift=1 if cfg.shift_logits else 0,
                   block_causal=cfg.block_causal)
    scheduler.check_fits(seq)
    seq.row = param_row(params)
    seq.constraint = make_constraint(params.structured_outputs, model)
    return seq


class InputProcessor:
    def __init__(self, model: "DiffusionModel", scheduler: "Scheduler", defaults: GenerationDefaults,
                 limits: ModelLimits) -> None:
        self.model, self.scheduler, self.defaults, self.limits = model, scheduler, defaults, limits

    def resolve(self, params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[ResolvedParams]:
        """One SamplingParams, or one per prompt (n of them), resolved against this model's defaults (each prompt
        resolved on its own: unseeded requests draw their own seeds)."""
        if params is None:
            params = SamplingParams()
        plist = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(plist) != n or not all(isinstance(p, SamplingParams) for p in plist):
            raise RequestError(f"params: expected one SamplingParams or a list of {n}, got {len(plist)} items",
                               "params")
        return [p.resolve(self.defaults, self.limits) for p in plist]

    def prompt_ids(self, prompt: Prompt, where: str = "prompt", max_tokens: int = 0) -> PromptIds:
        """Text (tokenised with the checkpoint's tokenizer) or token ids, validated; with max_tokens, also checked
        to fit the model's context (before the ids are scanned)."""
        cfg = self.model.config
        if isinstance(prompt, PromptIds):
            self.limits.check_length(len(prompt), max_tokens, where)
            return prompt
        if isinstance(prompt, str):
            ids = list(self.model.tokenizer_encode(prompt))
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise RequestTypeError(f"{where}: must be a string or a list of token ids, got {type(prompt).__name__}",
                                   where)
        self.limits.check_length(len(ids), max_tokens, where)
        if ids and not (0 <= min(ids) and max(ids) < cfg.vocab_size):
            t = next(t for t in ids if not 0 <= t < cfg.vocab_size)
            raise RequestError(f"{where}: token id {t} is outside the vocabulary (size {cfg.vocab_size})", where)
        if cfg.mask_id in ids:
            raise RequestError(f"{where}: contains the mask token id {cfg.mask_id}; infilling is not supported",
                               where)
        if not ids and cfg.shift_logits:
            raise RequestError(f"{where}: is empty; {cfg.family} predicts each position from the one before it, "
                               f"so it needs at least one prompt token", where)
        return PromptIds(ids)

    def chat_ids(self, messages: list[dict[str, Any]], where: str = "messages", max_tokens: int = 0,
                 **template: Any) -> PromptIds:
        """The checkpoint's chat template (with the generation prompt) applied, then checked as prompt_ids."""
        return self.prompt_ids(self.model.apply_chat_template(list(messages), **template), where, max_tokens)

    def sequence(self, request_id: str, prompt_ids: list[int], params: ResolvedParams) -> Sequence:
        return build_sequence(self.model, self.scheduler, request_id, prompt_ids, params)

    def process(self, request_id: str, prompt: Prompt, params: SamplingParams | None,
                where: str = "prompt") -> Sequence:
        """One request, start to end: resolve, tokenise and check, build its Sequence."""
        resolved = self.resolve(params, 1)[0]
        return self.sequence(request_id, self.prompt_ids(prompt, where, resolved.max_tokens), resolved)
