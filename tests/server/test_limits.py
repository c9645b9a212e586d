"""Request limits (server/limits.py): each refused with a shaped 400 naming the field before the engine sees the
request (and, for field counts, before tokenizing); the defaults accept everything the model's context can hold;
each limit is an `unmask serve` flag."""
from __future__ import annotations

import dataclasses
import random

import pytest

from server.cli import build_parser
from server.app import build_app
from server.config import ServerConfig
from server.limits import (MAX_N, MAX_STEPS, MAX_STOP_CHARS, MAX_STOP_STRINGS, PROMPT_CHARS_SLACK, RequestLimits,
                           limits_from_args)

from .fakes import FakeEngine
from .helpers import assert_error, client, run

CTX = 64  # FakeEngine's max_model_len


class CountingEngine(FakeEngine):
    def __init__(self, max_token_chars: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.encoded = 0
        self.info = dataclasses.replace(self.info, max_token_chars=max_token_chars)

    def encode(self, prompt, where):
        self.encoded += 1
        return super().encode(prompt, where)

    def encode_chat(self, messages):
        self.encoded += 1
        return super().encode_chat(messages)


def post_all(limits: RequestLimits | None, bodies: list[tuple[str, dict]],
             max_token_chars: int | None = None) -> tuple[list, CountingEngine]:
    engine = CountingEngine(max_token_chars)
    cfg = ServerConfig(served_model_names=["fake"], **({"limits": limits} if limits else {}))
    app = build_app(engine, cfg)

    async def main():
        async with client(app) as c:
            return [await c.post(path, json=body) for path, body in bodies]

    return run(main()), engine


def chat(n_messages: int = 1, **fields) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * n_messages, **fields}


def completion(prompt=None, **fields) -> tuple[str, dict]:
    return "/v1/completions", {"prompt": prompt if prompt is not None else [1, 2], **fields}


LIMITS = RequestLimits(max_messages=3, max_prompt_tokens=10, max_tokens=5, max_n=2, max_choices=3, max_steps=7,
                       max_stop=2, max_stop_chars=4)
# (request over one limit, the param the 400 names, whether it may be refused before tokenizing)
OVER = [
    (chat(4), "messages", True),
    (chat(1, n=3), "n", True),
    (completion([[1], [2]], n=2), "prompt", True),
    (chat(1, max_tokens=6), "max_tokens", True),
    (chat(1, max_completion_tokens=6), "max_completion_tokens", True),
    (completion(max_tokens=6), "max_tokens", True),
    (completion(steps=8), "steps", True),
    (completion(stop=["a", "b", "c"]), "stop", True),
    (chat(1, stop="abcde"), "stop", True),
    (completion(list(range(11))), "prompt", True),
    (completion("x" * 11), "prompt", False),
    (chat(3, messages=[{"role": "user", "content": "abcd"}] * 3), "messages", False),
]


@pytest.mark.parametrize("req,param,before_tokenizing", OVER, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(OVER)])
def test_each_limit_is_a_400_naming_the_field_before_the_engine(req, param, before_tokenizing):
    (r,), engine = post_all(LIMITS, [req])
    err = assert_error(r, 400, param)
    assert "unmask serve --" in err["message"], err  # says which flag raises it
    assert engine.added == [], "a refused request reached the engine"
    if before_tokenizing:
        assert engine.encoded == 0, "a count limit should be checked before tokenizing"


def test_at_each_limit_is_accepted():
    bodies = [chat(3), chat(1, n=2), completion([[1], [2], [3]]), chat(1, max_tokens=5),
              completion(steps=5, max_tokens=5), completion(stop=["a", "abcd"]),
              completion(list(range(10)), max_tokens=1), completion("x" * 10, max_tokens=1)]
    rs, engine = post_all(LIMITS, bodies)
    assert [r.status_code for r in rs] == [200] * len(bodies), [r.text for r in rs if r.status_code != 200]
    assert len(engine.added) == 1 + 2 + 3 + 1 + 1 + 1 + 1 + 1


def test_defaults_never_refuse_what_the_context_holds():
    """Default limits against random requests that fit the context (prompt + max_tokens <= CTX): all accepted; one
    token more is refused by the context check (naming max_tokens), not by a limit."""
    rng = random.Random(0)
    fits, over = [], []
    for _ in range(20):
        p = rng.randint(1, CTX - 1)
        m = CTX - p
        fits.append(completion(list(range(p)), max_tokens=m))
        fits.append(chat(p, max_tokens=m))  # FakeEngine renders one token per one-character message
        over.append(completion([1] * p, max_tokens=m + 1))
    fits.append(completion([1], n=MAX_N, max_tokens=1))
    fits.append(completion([1], stop=["s" * MAX_STOP_CHARS] * MAX_STOP_STRINGS, max_tokens=1))
    rs, _ = post_all(None, fits + over)
    assert all(r.status_code == 200 for r in rs[:len(fits)]), [r.text for r in rs[:len(fits)] if r.status_code != 200]
    for r in rs[len(fits):]:
        assert "unmask serve" not in assert_error(r, 400, "max_tokens")["message"]


def test_resolved_defaults_follow_the_context():
    lim = RequestLimits().resolve(512)
    assert (lim.max_messages, lim.max_prompt_tokens, lim.max_tokens) == (512, 511, 511)
    assert (lim.max_n, lim.max_choices, lim.max_steps) == (MAX_N, 16 * MAX_N, MAX_STEPS)
    assert RequestLimits(max_tokens=8).resolve(512).max_tokens == 8
    with pytest.raises(ValueError, match="max_n"):
        RequestLimits(max_n=0)


def test_serve_flags_set_every_limit():
    args = build_parser().parse_args(["serve", "--max-messages", "9", "--max-prompt-tokens", "100",
                                      "--max-tokens-limit", "50", "--max-n", "4", "--max-choices", "12",
                                      "--max-steps", "64", "--max-stop", "3", "--max-stop-chars", "20"])
    assert limits_from_args(args) == RequestLimits(max_messages=9, max_prompt_tokens=100, max_tokens=50, max_n=4,
                                                   max_choices=12, max_steps=64, max_stop=3, max_stop_chars=20)
    assert limits_from_args(build_parser().parse_args(["serve"])) == RequestLimits()


@pytest.mark.parametrize("flag", ["--max-n", "--max-steps", "--max-messages"])
def test_bad_limit_flag_is_a_clear_cli_error(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", flag, "0"])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_text_too_long_for_any_tokenization_is_refused_untokenized():
    """FakeEngine spells one token per character (max_token_chars=1): a text over max_prompt_tokens x 1 x
    PROMPT_CHARS_SLACK characters cannot fit and is refused before the tokenizer runs; a shorter one that still
    tokenizes too long is refused after it, by the token count."""
    bound = LIMITS.max_prompt_tokens * PROMPT_CHARS_SLACK
    for body, param, tokenized in [(completion("x" * (bound + 1)), "prompt", 0),
                                   (chat(1, messages=[{"role": "user", "content": "y" * (bound + 1)}]), "messages", 0),
                                   (completion("x" * bound), "prompt", 1)]:
        (r,), engine = post_all(LIMITS, [body], max_token_chars=1)
        assert "unmask serve --max-prompt-tokens" in assert_error(r, 400, param)["message"]
        assert engine.encoded == tokenized and engine.added == []


def test_max_token_chars_bounds_every_token_of_the_bundled_vocabulary():
    from engine.bundled import DEFAULT_MODEL_DIR
    from server.engine_client import LocalEngineClient

    client = LocalEngineClient.from_model(DEFAULT_MODEL_DIR, dtype="float32", kv_cache_memory=1 << 20)
    try:
        tok = client.engine.llm.tokenizer
        longest = max(len(tok.decode([i], skip_special_tokens=False)) for i in range(len(tok)))
        assert client.info.max_token_chars is not None and client.info.max_token_chars >= longest
    finally:
        run(client.shutdown())
