"""Structured outputs over HTTP, driven by the official `openai` client (in-process over the ASGI app) against a
random-weight LLaDA checkpoint: response_format, extra_body structured_outputs, tools / tool_choice (blocking and
streamed), and the 400s that name the field before anything is queued. Validity is checked with `jsonschema`."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from server.app import build_app
from server.config import ServerConfig

from .helpers import local_engine, run

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
TOOL_TEMPLATE = ("{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                 "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: ")
OPTS = {"max_tokens": 48, "extra_body": {"block_length": 16, "steps": 24}}


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    with local_engine(make_checkpoint("llada"), dtype="float32", max_num_seqs=8, kv_cache_memory=1 << 23) as eng:
        yield eng


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, ServerConfig(served_model_names=["tiny"]))


def oai(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)
    return openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


MSGS = [{"role": "user", "content": "who?"}]


def test_response_format_json_schema_and_json_object(app):
    async def main():
        c = oai(app)
        a = await asyncio.gather(*(c.chat.completions.create(
            model="tiny", messages=MSGS, temperature=1.0, seed=s, **OPTS,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                     "strict": True}}) for s in range(3)))
        b = await c.chat.completions.create(model="tiny", messages=MSGS, response_format={"type": "json_object"},
                                            **OPTS)
        return a, b

    a, b = run(main())
    for r in a:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert isinstance(json.loads(b.choices[0].message.content), dict)


def test_structured_outputs_extra_body_on_completions(app):
    async def main():
        c = oai(app)
        rx = await c.completions.create(model="tiny", prompt="code:", max_tokens=24, temperature=0.8, seed=4,
                                        extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{3}"}})
        ch = await c.completions.create(model="tiny", prompt="mood:", max_tokens=12,
                                        extra_body={"structured_outputs": {"choice": ["happy", "sad"]}})
        js = await c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=48,
                                             extra_body={"structured_outputs": {"json": PERSON}})
        return rx, ch, js

    rx, ch, js = run(main())
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", rx.choices[0].text) and rx.choices[0].finish_reason == "stop"
    assert ch.choices[0].text in ("happy", "sad")
    jsonschema.validate(json.loads(js.choices[0].message.content), PERSON)


def test_tool_calls_named_and_required(app):
    async def main():
        c = oai(app)
        named = await c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, ADD], **OPTS,
                                                tool_choice={"type": "function", "function": {"name": "add"}})
        req = await asyncio.gather(*(c.chat.completions.create(
            model="tiny", messages=MSGS, tools=[WEATHER, ADD], tool_choice="required", temperature=1.0, seed=s,
            max_tokens=64) for s in range(3)))
        none = await c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="none",
                                               max_tokens=8)
        return named, req, none

    named, req, none = run(main())
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    ch = named.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), params["add"])
    for r in req:
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        call = ch.message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)


def test_streams_equal_the_blocking_answer_and_stream_tool_calls(app):
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    kw = dict(model="tiny", messages=MSGS, temperature=1.0, seed=9, max_tokens=48,
              extra_body={"block_length": 8, "steps": 24})

    async def main():
        c = oai(app)
        full = await c.chat.completions.create(response_format=rf, **kw)
        parts, finish = [], None
        async for chunk in await c.chat.completions.create(response_format=rf, stream=True, **kw):
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
        streamed = []
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            tk = dict(tools=[WEATHER, ADD], tool_choice=choice, model="tiny", messages=MSGS, max_tokens=64,
                      temperature=1.0, seed=5, extra_body={"block_length": 8})
            blocking = await c.chat.completions.create(**tk)
            calls, frags, tfinish = {}, 0, None
            async for chunk in await c.chat.completions.create(stream=True, **tk):
                for ch in chunk.choices:
                    for tc in ch.delta.tool_calls or []:
                        cur = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                        cur["name"] += tc.function.name or ""
                        cur["arguments"] += tc.function.arguments or ""
                        frags += bool(tc.function.arguments)
                    tfinish = ch.finish_reason or tfinish
            streamed.append((blocking, calls, frags, tfinish))
        return full, parts, finish, streamed

    full, parts, finish, streamed = run(main())
    assert "".join(parts) == full.choices[0].message.content and finish == full.choices[0].finish_reason == "stop"
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for blocking, calls, frags, tfinish in streamed:
        want = blocking.choices[0].message.tool_calls[0].function
        assert tfinish == "tool_calls" and list(calls) == [0] and frags >= 2  # arguments arrive in pieces
        assert calls[0] == {"name": want.name, "arguments": want.arguments}
        jsonschema.validate(json.loads(want.arguments), params[want.name])


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": PERSON}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "tools[0]"),
])
def test_invalid_requests_are_400s_naming_the_field(app, engine, body, param):
    async def main():
        c = oai(app)
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, extra_body=body)
        return e.value

    err = run(main())
    assert err.status_code == 400 and err.body["param"] == param, err.body
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_tools_are_rendered_when_the_chat_template_supports_them(engine):
    tok = engine.engine.llm.model.tokenizer
    plain = tok.decode(engine.encode_chat(MSGS, tools=[WEATHER]))
    assert "get_weather" not in plain  # this template has no tool format: tools are left out
    saved = tok.chat_template
    tok.chat_template = TOOL_TEMPLATE
    try:
        rendered = tok.decode(engine.encode_chat(MSGS, tools=[WEATHER, ADD]))
    finally:
        tok.chat_template = saved
    assert rendered.startswith("TOOLS: get_weather add")


def test_sdk_structured_options(app):
    """unmask_client's AsyncClient sends response_format / structured_outputs / tools and parses tool_calls."""
    from unmask_client import AsyncClient

    async def main():
        async with AsyncClient("http://testserver", model="tiny", transport=httpx.ASGITransport(app=app)) as c:
            js = await c.chat(MSGS, max_tokens=48, response_format={"type": "json_schema",
                                                                    "json_schema": {"name": "p", "schema": PERSON}})
            rx = await c.complete("x", max_tokens=16, structured_outputs={"regex": "[0-9]{4}"})
            tc = await c.chat(MSGS, max_tokens=48, tools=[ADD], tool_choice="required")
            return js, rx, tc

    js, rx, tc = run(main())
    jsonschema.validate(json.loads(js.text), PERSON)
    assert re.fullmatch("[0-9]{4}", rx.choices[0].text)
    call = tc.choices[0].message.tool_calls[0]
    assert tc.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])


def test_a_grammar_that_compiles_too_long_is_a_400(app, engine, monkeypatch):
    """Compilation runs off the event loop under COMPILE_TIMEOUT_S; past it the request is refused, naming the
    field, and the server keeps answering."""
    import time

    from server import structured

    real = engine.compile_structured
    monkeypatch.setattr(structured, "COMPILE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(engine, "compile_structured", lambda spec: (time.sleep(1.0), real(spec)), raising=False)

    async def main():
        c = oai(app)
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8,
                                            extra_body={"structured_outputs": {"regex": "[a-z]{3}"}})
        ok = await c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4)
        return e.value, ok

    err, ok = run(main())
    assert err.body["param"] == "structured_outputs.regex" and "exceeded" in err.body["message"]
    assert ok.choices[0].finish_reason in ("stop", "length")
