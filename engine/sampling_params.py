"""SamplingParams: per-request diffusion decoding options, validated on construction.

Fields left as None take the model's defaults (its family's reference `generate` defaults, overridden by the
checkpoint's generation_config.json) when the request is resolved against a model.

Graceful rules where the LLaDA reference would assert:
- max_tokens not a multiple of block_length: the last block is shorter (ceil(max_tokens / block_length) blocks).
- block_length > max_tokens: one block covering the whole generation (pure diffusion).
- steps not a multiple of the number of blocks: the first (steps mod blocks) blocks get one extra step;
  fewer steps than blocks: every block gets one step.
Everything the reference accepts (e.g. more steps than tokens in a block: some steps commit nothing) is matched.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields, make_dataclass
from typing import Any

from .block_diffusion import block_plan, canvas_length
from .constraints.spec import StructuredOutputs
from .decoding import registry
from .errors import RequestTooLargeError
from .param_schema import SamplingParamsError, check_value, param, specs

CACHE_MODES = ("none", "prefix", "dual", "block")


# Limits (README "Limits"): every field is bounded so that any accepted value is one the engine can honour.
SEED_RANGE = (-(1 << 63), 1 << 64)
"""Seeds are 64-bit: any integer in [-2**63, 2**64) (values >= 2**63 are used modulo 2**64)."""
MAX_TOKENS_LIMIT = 1 << 20
"""Hard bound on max_tokens and block_length; the model's context length is the real bound, checked per request."""
MAX_STEPS = 1 << 14
"""Denoising steps per request (each step is one forward pass)."""
MAX_TOP_K = (1 << 31) - 1
"""top_k larger than the vocabulary is refused when the request meets its model."""
MAX_TEMPERATURE = 100.0
MAX_CFG_SCALE = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
"""Stop strings: at most MAX_STOP_STRINGS of at most MAX_STOP_LENGTH characters each."""
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class SamplingParamsTooLargeError(SamplingParamsError, RequestTooLargeError):
    """A SamplingParams field asks for more than the model can do (e.g. max_tokens beyond its context length)."""


@dataclass
class SamplingParams:
    """Per-request decoding options. Each field's `param(...)` is its schema (engine/param_schema.py): type,
    range or choices, where an unset value comes from, one-line help; the HTTP fields, CLI flags, server
    defaults and SDK options are derived from it."""
    __slots__ = ("__dict__", "_valid")  # the fields live in __dict__ (vars(params) is just them); _valid apart
    max_tokens: int | None = param(
        None, "int", "Generation length: the number of masked positions appended to the prompt.",
        lo=1, hi=MAX_TOKENS_LIMIT, source="model")
    steps: int | None = param(
        None, "int", "Denoising steps over the whole generation, split over the blocks. With threshold / factor: "
        "an upper bound.", lo=1, hi=MAX_STEPS, source="model")
    block_length: int | None = param(
        None, "int", "Semi-autoregressive block size: blocks are decoded left to right, each streamed once "
        "finished. Above max_tokens: one block.", lo=1, hi=MAX_TOKENS_LIMIT, source="model")
    temperature: float | None = param(
        None, "float", "0 = greedy; > 0 samples candidates (Gumbel-max with float64 noise).", lo=0,
        hi=MAX_TEMPERATURE, source="model")
    top_p: float | None = param(
        None, "float", "Nucleus sampling of candidates, in (0, 1].", lo=0, hi=1, lo_open=True, source="model")
    top_k: int | None = param(
        None, "int", "Keep the k most likely candidates; 0 (or -1 over HTTP) = off.", lo=0, hi=MAX_TOP_K,
        source="model", what="an integer >= 0 (0 = off) and at most the vocabulary size", http_lo=-1)
    remasking: str | None = param(
        None, "choice", "Order in which masked positions are committed (engine/decoding/remasking/); Dream's "
        "maskgit_plus / topk_margin name low_confidence / margin.", choices=registry.remasking_names,
        aliases=registry.remasking_aliases, source="model")
    threshold: float | None = param(
        None, "float", "Parallel decoding: commit every masked position of the block with confidence >= "
        "threshold (at least one per step). In (0, 1].", lo=0, hi=1, lo_open=True, source="model")
    factor: float | None = param(
        None, "float", "Parallel decoding, factor rule: commit the largest n with (n + 1)(1 - c_n) < factor over "
        "sorted confidences. Alternative to threshold.", lo=0, hi=float("inf"), lo_open=True)
    cfg_scale: float = param(
        0.0, "float", "Classifier-free guidance weight w: un + (w+1)(cond - un), un = the prompt fully masked "
        "(0 = off; > 0 runs an unconditional twin, doubling the compute).", lo=0, hi=MAX_CFG_SCALE,
        nullable=False)
    seed: int | None = param(
        None, "int", "Seed of the sampling noise (same seed, same output). Unset: a fresh one per request.",
        lo=SEED_RANGE[0], hi=SEED_RANGE[1], hi_open=True, source="random",
        what="a 64-bit integer in [-2**63, 2**64)", http_lo=INT64_MIN, http_hi=INT64_MAX)
    stop: str | list[str] | None = param(
        None, "stop", "Stop string or list of stop strings; the text is cut before the first one found.")
    ignore_eos: bool = param(False, "bool", "Do not stop at EOS: return the whole generated canvas.",
                             nullable=False)
    cache: str | None = param(
        None, "choice", "KV cache mode: none (exact reference semantics), prefix or dual (Fast-dLLM block-wise "
        "caches), block (block-causal models such as LLaDA2: the exact cache of finished blocks, their default; "
        "prefix / dual map to it there).", choices=CACHE_MODES, source="model")
    algorithm: str | None = param(
        None, "choice", "Transfer schedule (engine/decoding/transfer/): llada (even split per block), dream "
        "(1 - s/t), rnd1 (entropy-ordered), llada2 (block diffusion: block-aligned canvas, quota + strict "
        "threshold; block-causal models only). Unset: the model family's.", choices=registry.algorithm_names,
        source="model")
    alg_temp: float = param(
        0.0, "float", "Dream: > 0 samples the positions to commit from softmax(confidence / alg_temp).", lo=0,
        hi=MAX_TEMPERATURE, nullable=False)
    eps: float = param(1e-3, "float", "Dream: final timestep of linspace(1, eps, steps + 1).", lo=0, hi=1,
                       lo_open=True, hi_open=True, nullable=False, api=False)
    editing: str | None = param(
        None, "choice", "Token-editing rule (engine/decoding/editing/): llada2.1-edit (LLaDA2.1, block diffusion "
        "only) replaces committed tokens of the current block. Unset: the rule editing_threshold turns on, else off.",
        choices=registry.editing_names)
    editing_threshold: float | None = param(
        None, "float", "LLaDA2.1 token editing (block diffusion only, engine/decoding/editing/): replace a "
        "committed token of the current block when another is predicted with confidence > this. Unset: off "
        "(0.5 with editing set).", lo=0, hi=1, lo_open=True)
    max_post_steps: int | None = param(
        None, "int", "Token editing: extra steps per block after its last mask is filled, while they still edit "
        "(unset: 16).", lo=0, hi=MAX_STEPS)
    structured_outputs: StructuredOutputs | dict | None = param(
        None, "object", "Constrain the output to exactly one of: json (a JSON schema), regex, choice (a list of "
        "strings), grammar (an llguidance Lark grammar), json_object (true: any JSON object); vLLM's "
        "`structured_outputs` object, in Python also a StructuredOutputs. See engine/constraints/.",
        convert=StructuredOutputs.from_dict, json_schema=StructuredOutputs.json_schema, api=False, http=True)

    def __post_init__(self) -> None:
        self._validate()

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_valid", False)  # a mutated object is validated again when resolved

    def _validate(self) -> None:
        """The one validation pass: every field against its schema, then the rules between fields."""
        limits = {"max_stop_strings": MAX_STOP_STRINGS, "max_stop_length": MAX_STOP_LENGTH}
        for name, (spec, _) in specs(type(self)).items():
            value = check_value(name, spec, getattr(self, name), limits)
            if value is not getattr(self, name):
                object.__setattr__(self, name, value)
        check_rules(self.remasking, self.algorithm, {p: getattr(self, p) for p in registry.param_transfers()})
        object.__setattr__(self, "_valid", True)

    def resolve(self, defaults: "GenerationDefaults", limits: "ModelLimits | None" = None) -> "ResolvedParams":
        """Fill unset fields from the model's defaults and derive the block plan. With `limits`, also refuse what
        this model cannot do (top_k beyond its vocabulary, max_tokens beyond its context, stop strings without a
        tokenizer) before anything is allocated. Validated on construction; checked again only if mutated since."""
        if not getattr(self, "_valid", False):
            self._validate()
        values: dict[str, Any] = {}
        for name, (spec, _) in specs(type(self)).items():
            v = getattr(self, name)
            values[name] = getattr(defaults, name) if v is None and spec.source == "model" else v
        max_tokens, steps = values["max_tokens"], values["steps"]
        if limits is not None:
            limits.check(self, max_tokens, values["top_k"])
        algorithm = values["algorithm"]
        block_diffusion = algorithm == "llada2"
        if block_diffusion != (defaults.algorithm == "llada2"):
            raise SamplingParamsError("algorithm", f"{algorithm!r} does not apply to this model: block-causal "
                                                   f"models (LLaDA2) decode with 'llada2' only, others never")
        # block diffusion: the reference does not clamp block_length to max_tokens (the canvas is block-aligned)
        block_length = values["block_length"] if block_diffusion else min(values["block_length"], max_tokens)
        cache = values["cache"]
        if block_diffusion:
            _check_block_diffusion(self)
            cache = "none" if cache == "none" else "block"  # prefix / dual are exact here: the block cache
        elif cache == "block":
            raise SamplingParamsError("cache", "'block' is the exact cache of block-causal models (LLaDA2); use "
                                               "none, prefix or dual")
        values.update(resolve_editing(self, algorithm))
        remasking = self.remasking or (defaults.remasking if algorithm == defaults.algorithm else "low_confidence")
        active = {p: getattr(self, p) for p in registry.param_transfers()}
        check_rules(remasking, algorithm, active)
        num_blocks = -(-max_tokens // block_length)
        base, extra = divmod(max(steps, num_blocks), num_blocks)
        block_steps = tuple(base + (1 if b < extra else 0) for b in range(num_blocks))
        steps_per_block = 0
        if block_diffusion:  # the plan needs the prompt length: Sequence builds it (engine/block_diffusion.py)
            block_steps, total_steps = (), self.steps or 0
            steps_per_block = defaults.steps_per_block if self.steps is None else 0
            transfer = "llada2"  # quota + strict threshold (engine/decoding/transfer/llada2.py)
        else:
            total_steps = sum(block_steps)
            transfer = (next((p for p, v in active.items() if v is not None), None)
                        or registry.remasking(remasking).transfer or algorithm)
        values.update(
            max_tokens=max_tokens, steps=total_steps, block_length=block_length, remasking=remasking,
            temperature=float(values["temperature"]), top_p=float(values["top_p"] or 1.0),
            top_k=int(values["top_k"] or 0), cfg_scale=float(self.cfg_scale),
            seed=self.seed if self.seed is not None else random.getrandbits(62), stop=tuple(self.stop or ()),
            alg_temp=float(self.alg_temp), eps=float(self.eps), cache=cache)
        return ResolvedParams(**values, block_steps=block_steps, transfer=transfer,
                              adaptive=registry.transfer(transfer).adaptive, steps_per_block=steps_per_block)


def step_budget(params: "ResolvedParams", prompt_len: int) -> int:
    """The most denoising steps (forward passes, CFG aside) one request of these resolved params can take for a
    prompt of prompt_len tokens: its block plan summed (block diffusion: the plan Sequence builds from the prompt
    length, so an unset `steps` counts steps_per_block for every denoised block, and a `steps` below the number of
    blocks still takes one per block), plus, with token editing, max_post_steps + 1 extra steps per block. What
    a server's per-request work bound (n x steps) must count."""
    if params.algorithm == "llada2":
        plan = block_plan(prompt_len, params.max_tokens, params.block_length, params.steps or None,
                          params.steps_per_block)
    else:
        plan = params.block_steps
    post = getattr(params, "max_post_steps", None)
    extra = (post + 1) * len(plan) if params.editing is not None and post is not None else 0
    return sum(plan) + extra


def check_rules(remasking: str | None, algorithm: str | None, active: dict[str, Any]) -> None:
    """The constraints between fields, from the decoding registry: at most one param-activated transfer rule
    (threshold, factor); a remasking rule tied to an algorithm needs it; one that brings its own transfer rule
    excludes the param rules."""
    on = [p for p, v in active.items() if v is not None]
    if len(on) > 1:
        raise SamplingParamsError(on[1], f"{' and '.join(on)} are alternatives; set only one")
    rule = registry.remasking(remasking) if remasking is not None else None
    if rule is None:
        return
    if rule.algorithm is not None and algorithm not in (None, rule.algorithm):
        raise SamplingParamsError("remasking", f"'{rule.name}' {rule.why}; it needs algorithm='{rule.algorithm}'")
    if rule.transfer is not None and on:
        raise SamplingParamsError("remasking", f"'{rule.name}' {rule.transfer_why}; it cannot be combined with "
                                               f"{' or '.join(registry.param_transfers())}")


def resolve_editing(p: SamplingParams, algorithm: str) -> dict[str, Any]:
    """The request's token-editing rule (`editing`: its name or None) and the values of the fields it owns, from the
    registry: a rule is on when named or when its first field is set; its unset fields take its defaults; a field
    set for rules that do not work with this model's algorithm is refused, naming it."""
    rules = registry.editing_rules()
    for f in registry.editing_fields():
        owners = [e for e in rules if f in e.fields]
        if getattr(p, f) is not None and all(e.algorithm not in (None, algorithm) for e in owners):
            raise SamplingParamsError(f, f"token editing ('{owners[0].name}') {owners[0].why}")
    name = p.editing or next((e.name for e in rules if getattr(p, e.fields[0]) is not None), None)
    if name is None:
        return {"editing": None}
    rule = registry.editing(name)
    if rule.algorithm not in (None, algorithm):
        raise SamplingParamsError("editing", f"'{name}' {rule.why}")
    out: dict[str, Any] = {"editing": name}
    for f, v in rule.defaults:
        if getattr(p, f) is None:
            out[f] = v
    return out


ResolvedParams = make_dataclass(
    "ResolvedParams",
    [(f.name, f.type) for f in fields(SamplingParams)] + [
        ("block_steps", "tuple[int, ...]"), ("transfer", "str"), ("adaptive", "bool"), ("steps_per_block", "int")],
    frozen=True, slots=True,
    namespace={"num_blocks": property(lambda self: len(self.block_steps)), "__module__": __name__,
               "__doc__": "A request's parameters resolved against its model: every SamplingParams field set "
                          "(seed drawn, stop a tuple, model defaults filled in), plus the block plan "
                          "(block_steps; block diffusion: built per request from steps_per_block, Sequence.plan), "
                          "the transfer rule that decides its commits and whether that rule is adaptive. Generated from SamplingParams, so a new field needs no edit here."})


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What a model can honour: checked when a request is resolved against it."""
    vocab_size: int
    max_model_len: int
    """Context length (config.json max_position_embeddings / max_sequence_length): prompt + max_tokens."""
    has_tokenizer: bool = True

    def check(self, params: SamplingParams, max_tokens: int, top_k: int | None) -> None:
        if max_tokens > self.max_model_len:
            raise SamplingParamsTooLargeError(
                "max_tokens", f"{max_tokens} exceeds the model's context length of {self.max_model_len} tokens")
        if top_k is not None and top_k > self.vocab_size:
            raise SamplingParamsError("top_k", f"{top_k} exceeds the vocabulary size {self.vocab_size}")
        if params.stop and not self.has_tokenizer:
            raise SamplingParamsError("stop", "stop strings need a tokenizer and this checkpoint has none; "
                                              "use token-id prompts without stop strings")

    def check_length(self, prompt_len: int, max_tokens: int, where: str = "prompt", param: str = "max_tokens"
                     ) -> None:
        check_context(prompt_len, max_tokens, self.max_model_len, where, param)


def check_context(prompt_len: int, max_tokens: int, max_model_len: int, where: str = "prompt",
                  param: str = "max_tokens", block_length: int | None = None) -> None:
    """The one context-length check (engine and server): prompt + max_tokens must fit; the error names the prompt
    (`where`) when the prompt alone fills the context, else the generation length (`param`). block_length (block
    diffusion only): the canvas is rounded up to whole blocks (engine/block_diffusion.py), and that rounded canvas
    must fit too (else a huge block_length on a short request would build a canvas, and block-causal attention
    masks, far beyond the context); the error then names block_length."""
    if prompt_len + max_tokens <= max_model_len:
        if block_length is not None and canvas_length(prompt_len, max_tokens, block_length) > max_model_len:
            canvas = canvas_length(prompt_len, max_tokens, block_length)
            raise RequestTooLargeError(
                f"block_length {block_length}: {where} ({prompt_len} tokens) + {param} ({max_tokens}) rounded up to "
                f"whole blocks make a canvas of {canvas} positions, more than the model's context length of "
                f"{max_model_len} tokens; use a smaller block_length", "block_length")
        return
    if prompt_len >= max_model_len:  # the prompt alone (also when max_tokens is not known yet: 0)
        raise RequestTooLargeError(f"{where}: {prompt_len} prompt tokens exceed the model's context length of "
                                   f"{max_model_len} tokens", where)
    raise RequestTooLargeError(
        f"{where} ({prompt_len} tokens) + {param} ({max_tokens}) exceed the model's context length of "
        f"{max_model_len} tokens; use {param} at most {max_model_len - prompt_len}", param)


@dataclass(slots=True)
class GenerationDefaults:
    """A model's defaults for unset SamplingParams fields."""
    max_tokens: int = 128
    steps: int = 128
    block_length: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    remasking: str = "low_confidence"
    algorithm: str = "llada"
    threshold: float | None = None
    cache: str = "none"

    @property
    def steps_per_block(self) -> int:
        """Block diffusion (llada2): steps of each block when the request sets no `steps` (the family's `steps`
        counts per block, as LLaDA2's generate does); 0 for the other algorithms."""
        return self.steps if self.algorithm == "llada2" else 0


FAMILY_DEFAULTS: dict[str, GenerationDefaults] = {
    # LLaDA generate.py: steps=128, gen_length=128, block_length=128, temperature=0, low_confidence.
    "llada": GenerationDefaults(),
    # LLaDA-MoE uses LLaDA's generate; dInfer and the model card decode in blocks of 32.
    "llada_moe": GenerationDefaults(block_length=32),
    # Dream diffusion_generate / generation_config.json: steps 512, alg origin, temperature 0, one canvas.
    "dream": GenerationDefaults(max_tokens=512, steps=512, block_length=512, remasking="origin", algorithm="dream"),
    # RND1GenerationConfig: 256 new tokens, 256 steps, temperature 0.1, entropy-ordered unmasking.
    "rnd1": GenerationDefaults(max_tokens=256, steps=256, block_length=256, temperature=0.1, remasking="entropy",
                               algorithm="rnd1"),
    # LLaDA2MoeModelLM.generate: gen_length 2048, block_length 32, 32 steps per block, temperature 0,
    # threshold 0.95; the exact block cache by default (block-causal: finished blocks never change).
    "llada2_moe": GenerationDefaults(max_tokens=2048, steps=32, block_length=32, algorithm="llada2",
                                     threshold=0.95, cache="block"),
    # SDAR block_diffusion_generate (JetAstra/SDAR generate.py): gen_length 128, block_length 4, 4 denoising steps
    # per block, temperature 1.0 (it always samples), low_confidence_dynamic = llada2's rule, threshold 0.85.
    "sdar": GenerationDefaults(max_tokens=128, steps=4, block_length=4, temperature=1.0, algorithm="llada2",
                               threshold=0.85, cache="block"),
}


def _check_block_diffusion(p: SamplingParams) -> None:
    """Options the llada2 decoder does not have: refused, naming the field."""
    if p.factor is not None:
        raise SamplingParamsError("factor", "block diffusion (LLaDA2) decodes with threshold, not factor")
    if p.remasking not in (None, "low_confidence"):
        raise SamplingParamsError("remasking", "block diffusion (LLaDA2) commits by confidence (low_confidence) only")
    if p.cfg_scale:
        raise SamplingParamsError("cfg_scale", "classifier-free guidance is not available for block diffusion (LLaDA2)")
    if p.alg_temp:
        raise SamplingParamsError("alg_temp", "alg_temp is Dream's; block diffusion (LLaDA2) does not use it")
    if p.structured_outputs is not None:
        raise SamplingParamsError("structured_outputs", "constrained decoding is not available for block "
                                                        "diffusion (LLaDA2) yet")

_GEN_CONFIG_KEYS = {"max_new_tokens": "max_tokens", "steps": "steps", "num_diffusion_steps": "steps",
                    "block_length": "block_length", "temperature": "temperature", "top_p": "top_p",
                    "top_k": "top_k", "alg": "remasking"}


def model_defaults(family: str, generation_config: dict[str, Any] | None) -> GenerationDefaults:
    """Family defaults overridden by the checkpoint's generation_config.json (known keys only)."""
    base = FAMILY_DEFAULTS[family]
    values = {f.name: getattr(base, f.name) for f in fields(GenerationDefaults)}
    for key, name in _GEN_CONFIG_KEYS.items():
        v = (generation_config or {}).get(key)
        if v is None:
            continue
        if name == "remasking":
            v = registry.remasking_aliases().get(v, v)
            if v not in registry.remasking_names():
                continue
        values[name] = v
    return GenerationDefaults(**values)
