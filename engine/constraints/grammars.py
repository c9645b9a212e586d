"""Grammar compilation for a model's tokenizer: the llguidance tokenizer (built once per tokenizer), and compiled
grammars in a thread-safe LRU keyed by (grammar text, tokenizer).

A compiled grammar is a pristine llguidance LLMatcher; each request decodes with its own `deep_copy()`.
Compilation is bounded: the grammar text by spec.MAX_SPEC_CHARS, the work by llguidance's parser limits (lexer
fuel, grammar size, Earley items per step: a hostile schema fails with an error instead of running long); the
server additionally compiles off its event loop under a wall-clock timeout (server/structured.py).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import StructuredOutputs, StructuredOutputsError

CACHE_SIZE = 256
"""Compiled grammars kept (least recently used dropped first)."""
PARSER_LIMITS = dict(max_grammar_size=200_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                     step_max_items=50_000, max_lexer_states=100_000)
"""llguidance parser limits for every compiled grammar (see llguidance.LLParserLimits)."""
ENCODE_CACHE = 4096


@dataclass(slots=True)
class Vocab:
    """A model tokenizer as llguidance sees it, plus the order in which the closing rollout tries tokens."""
    lltok: Any  # llguidance.LLTokenizer
    size: int  # model vocabulary size (the logits' width; may exceed the tokenizer's)
    closing_order: np.ndarray  # [K] int64 non-special token ids, best closer first (decoder.py)
    banned: np.ndarray  # [S] int64 special tokens (unk, pad, mask, control tokens): never allowed in a constrained
    # answer (stop tokens are allowed separately, once the grammar accepts)

    def mask(self, matcher: Any) -> np.ndarray:
        """[size] bool: the tokens `matcher` allows next, special tokens removed."""
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        ok = np.unpackbits(bits, bitorder="little")[:self.size].astype(bool)
        if ok.shape[0] < self.size:
            ok = np.concatenate([ok, np.zeros(self.size - ok.shape[0], dtype=bool)])
        ok[self.banned] = False
        return ok


class GrammarCache:
    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._vocabs: dict[int, tuple[Any, Vocab]] = {}
        self.hits = self.misses = 0

    def vocab(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> Vocab:
        """The llguidance view of an HF tokenizer (built once per tokenizer object, ~1 s for 100k tokens)."""
        with self._lock:
            hit = self._vocabs.get(id(tokenizer))
            if hit is not None and hit[0] is tokenizer:
                return hit[1]
        v = _build_vocab(tokenizer, vocab_size, stop_ids)
        with self._lock:
            self._vocabs[id(tokenizer)] = (tokenizer, v)
        return v

    def compile(self, spec: StructuredOutputs, vocab: Vocab) -> Any:
        """The pristine matcher of spec's grammar; raises StructuredOutputsError naming the field when invalid."""
        from llguidance import LLMatcher, LLParserLimits

        try:
            text = spec.grammar_text()
        except (ValueError, TypeError) as e:
            raise StructuredOutputsError(spec.field_param, f"invalid: {e}") from None
        key = (text, id(vocab.lltok))
        with self._lock:
            m = self._compiled.get(key)
            if m is not None:
                self._compiled.move_to_end(key)
                self.hits += 1
                return m
            self.misses += 1
        m = LLMatcher(vocab.lltok, text, log_level=0, limits=LLParserLimits(**PARSER_LIMITS))
        if m.is_error():
            raise StructuredOutputsError(spec.field_param, f"invalid {spec.option}: {_short(m.get_error())}")
        if not m.is_accepting() and not vocab.mask(m).any():
            raise StructuredOutputsError(spec.field_param, f"this model's vocabulary cannot spell any output "
                                                           f"matching this {spec.option}")
        with self._lock:
            self._compiled[key] = m
            while len(self._compiled) > self.size:
                self._compiled.popitem(last=False)
        return m


GRAMMARS = GrammarCache()
"""The process-wide cache (grammars are keyed by tokenizer, so models sharing a process do not collide)."""


def _short(msg: str, limit: int = 500) -> str:
    msg = msg.strip()
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _build_vocab(tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> Vocab:
    import llguidance
    import llguidance.hf

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (stop_ids[0] if stop_ids else None)
    try:
        lltok = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
    except (ValueError, TypeError):  # a decoder llguidance cannot read: give it every token's bytes ourselves
        lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokens(tokenizer, eos)))
    specials = {i for i in range(lltok.vocab_size) if lltok.is_special_token(i)}
    specials |= {i for i in getattr(tokenizer, "all_special_ids", []) if i < vocab_size}
    specials |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special and i < vocab_size}
    banned = np.array(sorted(specials), dtype=np.int64)
    order = _closing_order(lltok, specials | set(stop_ids))
    return Vocab(lltok, vocab_size, order[order < vocab_size], banned)


class _ByteTokens:
    """The interface llguidance.TokenizerWrapper reads: each token's bytes, special ids, and an encoder."""

    def __init__(self, tokenizer: Any, eos: int | None) -> None:
        self._tok = tokenizer
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_token_id
        n = len(tokenizer)
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.special_token_ids = sorted(special)
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        decoder = tokenizer.backend_tokenizer.decoder
        self.tokens = [p.encode() if i in special or decoder is None else decoder.decode([p]).encode()
                       for i, p in enumerate(pieces)]

        self._encoded: OrderedDict[str, list[int]] = OrderedDict()

    def __call__(self, s: str) -> list[int]:
        """Encode (llguidance asks for forced text; the same strings recur, so the last ENCODE_CACHE are kept)."""
        ids = self._encoded.get(s)
        if ids is None:
            ids = self._encoded[s] = self._tok(s, add_special_tokens=False)["input_ids"]
            if len(self._encoded) > ENCODE_CACHE:
                self._encoded.popitem(last=False)
        return list(ids)


_CLOSERS = frozenset(b'"}])')


def _closing_order(lltok: Any, specials: set[int]) -> np.ndarray:
    """Token ids ranked for the closing rollout: pure closers ('"', '}', ']', longest first), then digits, other
    punctuation, letters, whitespace-bearing tokens; specials and empty tokens left out."""
    keys = []
    for i in range(lltok.vocab_size):
        if i in specials:
            continue
        b = lltok.decode_bytes([i])
        if not b:
            continue
        if all(c in _CLOSERS for c in b):
            cls, n = 0, -len(b)
        elif b.isdigit():
            cls, n = 1, len(b)
        elif any(c in b" \t\r\n" for c in b):
            cls, n = 4, len(b)
        elif b.isalpha():
            cls, n = 3, len(b)
        else:
            cls, n = 2, len(b)
        keys.append((cls, n, i))
    keys.sort()
    return np.array([k[2] for k in keys], dtype=np.int64)
