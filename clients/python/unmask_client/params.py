"""Request options of the unmask server, generated from the engine's request schema (engine/param_schema.py);
tests/test_schema.py checks it is current. Do not edit by hand; regenerate with
    python -c 'import engine.param_schema as s; s.regenerate()'
"""
from __future__ import annotations

from typing import Literal, Union

from typing_extensions import TypedDict

Remasking = Literal['low_confidence', 'random', 'margin', 'entropy', 'origin', 'maskgit_plus', 'topk_margin']
CacheMode = Literal['none', 'prefix', 'dual', 'block']
Algorithm = Literal['llada', 'dream', 'rnd1', 'llada2']
Editing = Literal['llada2.1-edit']


class SamplingOptions(TypedDict, total=False):
    """Sampling and diffusion options (unset: the server's defaults, then the model's)."""
    max_tokens: int | None
    """Generation length: the number of masked positions appended to the prompt."""
    steps: int | None
    """Denoising steps over the whole generation, split over the blocks. With threshold / factor: an upper bound."""
    block_length: int | None
    """Semi-autoregressive block size: blocks are decoded left to right, each streamed once finished. Above
    max_tokens: one block."""
    temperature: float | None
    """0 = greedy; > 0 samples candidates (Gumbel-max with float64 noise)."""
    top_p: float | None
    """Nucleus sampling of candidates, in (0, 1]."""
    top_k: int | None
    """Keep the k most likely candidates; 0 (or -1 over HTTP) = off."""
    remasking: Remasking | None
    """Order in which masked positions are committed (engine/decoding/remasking/); Dream's maskgit_plus /
    topk_margin name low_confidence / margin."""
    threshold: float | None
    """Parallel decoding: commit every masked position of the block with confidence >= threshold (at least one per
    step). In (0, 1]."""
    factor: float | None
    """Parallel decoding, factor rule: commit the largest n with (n + 1)(1 - c_n) < factor over sorted confidences.
    Alternative to threshold."""
    cfg_scale: float | None
    """Classifier-free guidance weight w: un + (w+1)(cond - un), un = the prompt fully masked (0 = off; > 0 runs an
    unconditional twin, doubling the compute)."""
    seed: int | None
    """Seed of the sampling noise (same seed, same output). Unset: a fresh one per request."""
    stop: Union[str, list[str]] | None
    """Stop string or list of stop strings; the text is cut before the first one found."""
    ignore_eos: bool | None
    """Do not stop at EOS: return the whole generated canvas."""
    cache: CacheMode | None
    """KV cache mode: none (exact reference semantics), prefix or dual (Fast-dLLM block-wise caches), block (block-
    causal models such as LLaDA2: the exact cache of finished blocks, their default; prefix / dual map to it
    there)."""
    algorithm: Algorithm | None
    """Transfer schedule (engine/decoding/transfer/): llada (even split per block), dream (1 - s/t), rnd1 (entropy-
    ordered), llada2 (block diffusion: block-aligned canvas, quota + strict threshold; block-causal models only).
    Unset: the model family's."""
    alg_temp: float | None
    """Dream: > 0 samples the positions to commit from softmax(confidence / alg_temp)."""
    editing: Editing | None
    """Token-editing rule (engine/decoding/editing/): llada2.1-edit (LLaDA2.1, block diffusion only) replaces
    committed tokens of the current block. Unset: the rule editing_threshold turns on, else off."""
    editing_threshold: float | None
    """LLaDA2.1 token editing (block diffusion only, engine/decoding/editing/): replace a committed token of the
    current block when another is predicted with confidence > this. Unset: off (0.5 with editing set)."""
    max_post_steps: int | None
    """Token editing: extra steps per block after its last mask is filled, while they still edit (unset: 16)."""


SAMPLING_OPTIONS = (
    'max_tokens', 'steps', 'block_length', 'temperature', 'top_p', 'top_k', 'remasking', 'threshold', 'factor',
    'cfg_scale', 'seed', 'stop', 'ignore_eos', 'cache', 'algorithm', 'alg_temp', 'editing', 'editing_threshold',
    'max_post_steps')
