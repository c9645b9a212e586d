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

import math
import random
from dataclasses import dataclass, fields
from typing import Any

from .constraints.spec import StructuredOutputs
from .errors import RequestError, RequestTooLargeError

REMASKING = ("low_confidence", "random", "margin", "entropy", "origin")
REMASKING_ALIASES = {"maskgit_plus": "low_confidence", "topk_margin": "margin"}
CACHE_MODES = ("none", "prefix", "dual", "block")
ALGORITHMS = ("llada", "dream", "rnd1", "llada2")


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


class SamplingParamsError(RequestError):
    """A SamplingParams field is invalid; `.field` (also `.param`) names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"SamplingParams.{field}: {message}", field)
        self.field = field


class SamplingParamsTooLargeError(SamplingParamsError, RequestTooLargeError):
    """A SamplingParams field asks for more than the model can do (e.g. max_tokens beyond its context length)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    """Generation length: the number of masked positions appended to the prompt."""
    steps: int | None = None
    """Denoising steps over the whole generation (split over blocks). With threshold/factor: an upper bound."""
    block_length: int | None = None
    """Semi-autoregressive block size; blocks are decoded left to right."""
    temperature: float | None = None
    """0 = greedy. >0 samples candidates (Gumbel-max with float64 noise)."""
    top_p: float | None = None
    top_k: int | None = None
    remasking: str | None = None
    """Score that orders commits: low_confidence, random, margin, entropy; origin (Dream algorithm only).
    Dream's names maskgit_plus and topk_margin are accepted as aliases."""
    threshold: float | None = None
    """Parallel decoding: commit every masked position of the block with confidence >= threshold (at least one)."""
    factor: float | None = None
    """Parallel decoding: commit the largest n with (n+1)(1-c_n) < factor over sorted confidences (at least one)."""
    cfg_scale: float = 0.0
    """Classifier-free guidance weight w: un + (w+1)(cond - un), un = the prompt fully masked."""
    seed: int | None = None
    """Seed for sampling noise; None draws a fresh one per request."""
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    """Do not stop at EOS: return the whole generated canvas."""
    cache: str | None = None
    """none (reference semantics), prefix or dual (Fast-dLLM block-wise KV caches), block (block-causal models:
    the exact cache of finished blocks; prefix/dual map to it there). Default: the family's (block for LLaDA2,
    else none)."""
    algorithm: str | None = None
    """Transfer schedule: llada (even split per block), dream (1 - s/t), rnd1 (entropy-ordered), llada2 (block
    diffusion: block-aligned canvas, quota + strict threshold; block-causal models only). Default: family's."""
    alg_temp: float = 0.0
    """Dream: >0 samples the positions to commit from softmax(confidence / alg_temp)."""
    eps: float = 1e-3
    """Dream: final timestep of linspace(1, eps, steps + 1)."""
    editing_threshold: float | None = None
    """LLaDA2.1 token editing (strategy "llada2.1-edit", engine/decoding/editing.py; block diffusion only): a
    committed token of the current block is replaced when the model predicts another token with confidence
    > editing_threshold. None: off (LLaDA2.0 decoding)."""
    max_post_steps: int | None = None
    """With editing: extra steps per block after its last mask is filled, while they still edit (default 16)."""
    structured_outputs: StructuredOutputs | dict | None = None
    """Constrain the output: StructuredOutputs(json=schema | regex=... | choice=[...] | grammar=lark |
    json_object=True), or the same as a dict (vLLM's `structured_outputs` object). See engine/constraints/."""

    def __post_init__(self) -> None:
        def int_in(name: str, lo: int, hi: int, what: str) -> None:
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and lo <= v <= hi):
                raise SamplingParamsError(name, f"must be {what}, got {v!r}")

        def num_in(name: str, lo: float, hi: float, what: str, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if v is not None and not (_is_num(v) and (lo < v if lo_open else lo <= v) and v <= hi):
                raise SamplingParamsError(name, f"must be {what}, got {v!r}")

        int_in("max_tokens", 1, MAX_TOKENS_LIMIT, f"an integer in [1, {MAX_TOKENS_LIMIT}]")
        int_in("block_length", 1, MAX_TOKENS_LIMIT, f"an integer in [1, {MAX_TOKENS_LIMIT}]")
        int_in("steps", 1, MAX_STEPS, f"an integer in [1, {MAX_STEPS}]")
        num_in("temperature", 0, MAX_TEMPERATURE, f"a number in [0, {MAX_TEMPERATURE:g}]")
        num_in("top_p", 0, 1, "in (0, 1]", lo_open=True)
        int_in("top_k", 0, MAX_TOP_K, "an integer >= 0 (0 = off) and at most the vocabulary size")
        if self.remasking is not None:
            r = REMASKING_ALIASES.get(self.remasking, self.remasking) if isinstance(self.remasking, str) else None
            if r not in REMASKING:
                raise SamplingParamsError("remasking", f"must be one of {', '.join(REMASKING)}, got {self.remasking!r}")
            self.remasking = r
        num_in("threshold", 0, 1, "in (0, 1]", lo_open=True)
        num_in("factor", 0, math.inf, "a number > 0", lo_open=True)
        if self.threshold is not None and self.factor is not None:
            raise SamplingParamsError("factor", "threshold and factor are alternatives; set only one")
        if self.cfg_scale is None:
            raise SamplingParamsError("cfg_scale", "must be a number in [0, 100], got None")
        num_in("cfg_scale", 0, MAX_CFG_SCALE, f"a number in [0, {MAX_CFG_SCALE:g}]")
        lo, hi = SEED_RANGE
        if self.seed is not None and not (_is_int(self.seed) and lo <= self.seed < hi):
            raise SamplingParamsError("seed", f"must be a 64-bit integer in [-2**63, 2**64), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if self.stop is not None:
            if not (isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop)):
                raise SamplingParamsError("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
            if len(self.stop) > MAX_STOP_STRINGS:
                raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
            if max(map(len, self.stop), default=0) > MAX_STOP_LENGTH:
                raise SamplingParamsError("stop", f"each stop string must be at most {MAX_STOP_LENGTH} characters")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        if self.cache is not None and (not isinstance(self.cache, str) or self.cache not in CACHE_MODES):
            raise SamplingParamsError("cache", f"must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")
        if self.algorithm is not None and (not isinstance(self.algorithm, str) or self.algorithm not in ALGORITHMS):
            raise SamplingParamsError("algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.alg_temp is None:
            raise SamplingParamsError("alg_temp", "must be a number in [0, 100], got None")
        num_in("alg_temp", 0, MAX_TEMPERATURE, f"a number in [0, {MAX_TEMPERATURE:g}]")
        if self.eps is None:
            raise SamplingParamsError("eps", "must be in (0, 1), got None")
        num_in("eps", 0, 1, "in (0, 1)", lo_open=True)
        if self.eps == 1:
            raise SamplingParamsError("eps", f"must be in (0, 1), got {self.eps!r}")
        num_in("editing_threshold", 0, 1, "in (0, 1]", lo_open=True)
        int_in("max_post_steps", 0, MAX_STEPS, f"an integer in [0, {MAX_STEPS}]")
        if self.remasking == "origin" and self.algorithm not in (None, "dream"):
            raise SamplingParamsError("remasking", "'origin' is Dream's algorithm; it needs algorithm='dream'")
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputs.from_dict(self.structured_outputs)

    def resolve(self, defaults: "GenerationDefaults", limits: "ModelLimits | None" = None) -> "ResolvedParams":
        """Fill unset fields from the model's defaults and derive the block plan. With `limits`, also refuse what
        this model cannot do (top_k beyond its vocabulary, max_tokens beyond its context, stop strings without a
        tokenizer) before anything is allocated. Fields are re-validated, so a SamplingParams mutated after
        construction is caught here too."""
        self.__post_init__()
        get = lambda name: getattr(self, name) if getattr(self, name) is not None else getattr(defaults, name)  # noqa: E731
        max_tokens, steps = get("max_tokens"), get("steps")
        if limits is not None:
            limits.check(self, max_tokens, get("top_k"))
        algorithm = get("algorithm")
        block_diffusion = algorithm == "llada2"
        if block_diffusion != (defaults.algorithm == "llada2"):
            raise SamplingParamsError("algorithm", f"{algorithm!r} does not apply to this model: block-causal "
                                                   f"models (LLaDA2) decode with 'llada2' only, others never")
        # block diffusion: the reference does not clamp block_length to max_tokens (the canvas is block-aligned)
        block_length = get("block_length") if block_diffusion else min(get("block_length"), max_tokens)
        cache = self.cache or defaults.cache
        if block_diffusion:
            _check_block_diffusion(self)
            cache = "none" if cache == "none" else "block"  # prefix / dual are exact here: the block cache
        elif self.editing_threshold is not None or self.max_post_steps is not None:
            field = "editing_threshold" if self.editing_threshold is not None else "max_post_steps"
            raise SamplingParamsError(field, "token editing is LLaDA2.1's: it needs a block-diffusion model")
        elif cache == "block":
            raise SamplingParamsError("cache", "'block' is the exact cache of block-causal models (LLaDA2); use "
                                               "none, prefix or dual")
        remasking = self.remasking or (defaults.remasking if algorithm == defaults.algorithm else "low_confidence")
        if remasking == "origin" and algorithm != "dream":
            raise SamplingParamsError("remasking", "'origin' is Dream's algorithm; it needs algorithm='dream'")
        if self.threshold is not None or self.factor is not None:
            if remasking == "origin":
                raise SamplingParamsError("remasking", "'origin' reveals positions at random; it cannot be "
                                                       "combined with threshold or factor")
        num_blocks = -(-max_tokens // block_length)
        base, extra = divmod(max(steps, num_blocks), num_blocks)
        block_steps = tuple(base + (1 if b < extra else 0) for b in range(num_blocks))
        steps_per_block = 0
        if block_diffusion:  # the plan needs the prompt length: Sequence builds it (engine/block_diffusion.py)
            block_steps, steps = (), self.steps or 0
            steps_per_block = defaults.steps_per_block if self.steps is None else 0
        threshold = self.threshold if self.threshold is not None else defaults.threshold
        seed = self.seed if self.seed is not None else random.getrandbits(62)
        top_k = get("top_k") or 0
        top_p = get("top_p") or 1.0
        return ResolvedParams(
            max_tokens=max_tokens, steps=sum(block_steps) if not block_diffusion else steps,
            block_length=block_length, block_steps=block_steps,
            temperature=float(get("temperature")), top_p=float(top_p), top_k=int(top_k), remasking=remasking,
            threshold=threshold, factor=self.factor, cfg_scale=float(self.cfg_scale), seed=seed,
            stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos, cache=cache, algorithm=algorithm,
            alg_temp=float(self.alg_temp), eps=float(self.eps), structured_outputs=self.structured_outputs,
            steps_per_block=steps_per_block, editing_threshold=self.editing_threshold,
            max_post_steps=16 if self.max_post_steps is None else self.max_post_steps)


@dataclass(frozen=True, slots=True)
class ResolvedParams:
    max_tokens: int
    steps: int
    block_length: int
    block_steps: tuple[int, ...]
    temperature: float
    top_p: float
    top_k: int
    remasking: str
    threshold: float | None
    factor: float | None
    cfg_scale: float
    seed: int
    stop: tuple[str, ...]
    ignore_eos: bool
    cache: str
    algorithm: str
    alg_temp: float
    eps: float
    structured_outputs: StructuredOutputs | None = None
    steps_per_block: int = 0
    """Block diffusion (llada2) without an explicit `steps`: every block gets this many steps (`steps` is then 0;
    the per-block plan is built per request, Sequence.plan)."""
    editing_threshold: float | None = None
    max_post_steps: int = 16

    @property
    def editing(self) -> bool:
        return self.editing_threshold is not None

    @property
    def num_blocks(self) -> int:
        return len(self.block_steps)

    @property
    def adaptive(self) -> bool:
        return self.threshold is not None or self.factor is not None


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

    def check_length(self, prompt_len: int, max_tokens: int, where: str = "prompt") -> None:
        if max_tokens <= 0 and prompt_len > self.max_model_len:  # the prompt alone (max_tokens not known here)
            raise RequestTooLargeError(f"{where}: {prompt_len} prompt tokens exceed the model's context length of "
                                       f"{self.max_model_len} tokens", where)
        if prompt_len + max_tokens > self.max_model_len:
            raise RequestTooLargeError(
                f"{where}: {prompt_len} prompt tokens + max_tokens {max_tokens} exceed the model's context length "
                f"of {self.max_model_len} tokens", "max_tokens" if prompt_len < self.max_model_len else where)


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
    steps_per_block: int = 0
    """Block diffusion (llada2): steps of each block when the request sets no `steps`."""


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
                                     threshold=0.95, cache="block", steps_per_block=32),
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
            v = REMASKING_ALIASES.get(v, v)
            if v not in REMASKING:
                continue
        values[name] = v
    return GenerationDefaults(**values)
