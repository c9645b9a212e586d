"""Security properties of the server, in-process over the real engine on the bundled model:
- the API key is compared in constant time (HMAC compare of fixed-length digests, whatever the length sent);
- neither the configured key nor a presented one ever reaches a log record, at DEBUG, on any path (401, 200, 400,
  500 with its traceback);
- no endpoint opens, lists or writes a file named by a request (Python audit events watched while hostile paths
  ride in every field, in unknown fields such as chat_template, and in the URL);
- CORS answers only the configured origins; the server binds 127.0.0.1 unless told otherwise;
- the chat template is rendered in jinja's sandbox: template syntax in a message is literal text, a request
  cannot supply a template, and even a hostile template in a checkpoint cannot reach Python internals."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import jinja2.sandbox
import pytest

from engine.bundled import DEFAULT_MODEL_DIR, task
from server.cli import build_parser
from server import app as app_module
from server.app import build_app
from server.config import ServerConfig

from .helpers import assert_error, client, local_engine, run

KEY = "sk-unmask-7f3a9c2e1d"


@pytest.fixture(scope="module")
def engine():
    with local_engine(DEFAULT_MODEL_DIR, dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 22) as eng:
        yield eng


def chat(q: str = "sort 2 1", **kw: Any) -> dict[str, Any]:
    return {"messages": task.messages_for(q), **kw}


# --- API keys -------------------------------------------------------------------------------------------------
def test_key_compare_is_constant_time_on_fixed_length_digests(engine, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = app_module.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], api_key=KEY))
    sent = ["", "s", KEY[:-1], KEY + "x", "x" * 5000, KEY]

    async def main():
        async with client(app) as c:
            return [await c.get("/v1/models", headers={"Authorization": f"Bearer {k}"}) for k in sent]

    rs = run(main())
    assert [r.status_code for r in rs] == [401] * 5 + [200]
    assert len(calls) >= len(sent) - 1  # (the empty key may be refused before comparing)
    assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in calls), [(len(a), len(b)) for a, b in calls]


def test_keys_never_logged_even_at_debug(engine, caplog):
    wrong = "sk-wrong-4b1e8d"
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], api_key=KEY))

    class Boom(Exception):
        pass

    def broken(messages):
        raise Boom("chat template exploded")

    async def main():
        async with client(app) as c:
            out = [await c.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {wrong}"}),
                   await c.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {KEY}"}),
                   await c.post("/v1/chat/completions", json=chat(steps=0),
                                headers={"Authorization": f"Bearer {KEY}"}),
                   await c.get("/v1/models", headers={"Authorization": KEY})]
            engine.encode_chat = broken  # an unexpected exception: logged with its traceback
            try:
                out.append(await c.post("/v1/chat/completions", json=chat(),
                                        headers={"Authorization": f"Bearer {KEY}"}))
            finally:
                del engine.encode_chat
            return out

    with caplog.at_level(logging.DEBUG):
        rs = run(main())
    assert [r.status_code for r in rs] == [401, 200, 400, 401, 500]
    assert any("exploded" in (r.exc_text or "") or r.exc_info for r in caplog.records)  # the 500 was logged
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    logged += caplog.text
    assert KEY not in logged and wrong not in logged
    for r in rs:
        assert KEY not in r.text and wrong not in r.text


# --- files named by requests --------------------------------------------------------------------------------------
class FileWatch:
    """Records audit events (open, os.listdir, os.remove, ...) whose arguments mention a marker directory."""

    installed: "FileWatch | None" = None

    def __init__(self, marker: str) -> None:
        self.marker, self.events, self.active = marker, [], False

    def __call__(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        for a in args:
            s = a.decode(errors="replace") if isinstance(a, bytes) else a if isinstance(a, str) else \
                str(a) if isinstance(a, Path) else None
            if s is not None and self.marker in s:
                self.events.append((event, s))


@pytest.fixture(scope="module")
def watch(tmp_path_factory):
    marker_dir = tmp_path_factory.mktemp("requestnamed")
    secret = marker_dir / "secret.txt"
    secret.write_text("top secret")
    w = FileWatch(str(marker_dir))
    sys.addaudithook(w)  # audit hooks cannot be removed: this one records only while active
    yield w, marker_dir
    w.active = False


def test_no_endpoint_touches_files_named_by_a_request(engine, watch):
    w, d = watch
    secret, out = str(d / "secret.txt"), str(d / "written.txt")
    hostile = {"model": secret, "user": secret, "stop": [secret[:40]], "chat_template_kwargs": {"path": secret},
               "chat_template": "{% include '" + secret + "' %}", "tokenizer": secret, "download_dir": str(d),
               "output_file": out, "response_format": {"type": "json_schema", "json_schema": {"$ref": secret}},
               "tools": [{"type": "function",
                          "function": {"name": "read", "parameters": {"$ref": "file://" + secret}}}]}
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))

    async def main():
        async with client(app) as c:
            rs = [await c.post("/v1/chat/completions", json={**chat(secret), **hostile}),
                  await c.post("/v1/chat/completions", json={**chat(), **{k: v for k, v in hostile.items()
                                                                          if k != "model"}}),
                  await c.post("/v1/completions", json={"prompt": [secret, out], **hostile}),
                  await c.post("/v1/completions", json={"prompt": "sort 1 2", "suffix": secret, "echo": out})]
            for path in (f"/v1/..{secret}", f"/..{secret}", f"/docs/..%2f..{secret}", f"/static{secret}",
                         f"/{secret}", f"/v1/files?path={secret}", f"/openapi.json?file={secret}"):
                rs.append(await c.get(path))
                rs.append(await c.post(path, json={"file": secret}))
            return rs

    w.active = True
    try:
        rs = run(main())
        events = list(w.events)
        Path(secret).read_text()  # positive control: the watch sees an open of the file
        assert w.events[len(events):] and w.events[-1][0] == "open"
    finally:
        w.active = False
    assert events == [], events
    assert not Path(out).exists() and sorted(p.name for p in d.iterdir()) == ["secret.txt"]
    assert all(r.status_code < 500 for r in rs), [(r.status_code, r.text) for r in rs if r.status_code >= 500]
    assert all("top secret" not in r.text for r in rs)
    assert_error(rs[0], 404, "model")  # an unknown model name is just a name
    # response_format and tools are real request fields since structured outputs: a json_schema or tool
    # parameters naming a file are refused as bad schemas (a 400 naming the field), and the file is never
    # opened (events == [] above)
    assert rs[1].status_code == 400, rs[1].text
    assert rs[1].json()["error"]["param"].startswith(("response_format", "tools")), rs[1].text


def test_schema_has_no_path_parameters_or_file_fields(engine):
    spec = build_app(engine, ServerConfig(served_model_names=["tiny"])).openapi()
    assert not any("{" in p for p in spec["paths"]), list(spec["paths"])
    text = str(spec).lower()
    for word in ("filename", "file_path", "filepath", "directory", "upload"):
        assert word not in text, word


# --- CORS and binding ---------------------------------------------------------------------------------------------
def test_cors_answers_only_the_configured_origins(engine):
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], allowed_origins=["http://ui.example"]))
    pre = {"Access-Control-Request-Method": "POST"}

    async def main():
        async with client(app) as c:
            return (await c.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **pre}),
                    await c.get("/v1/models", headers={"Origin": "http://evil.example"}),
                    await c.get("/v1/models", headers={"Origin": "http://ui.example"}))

    evil_pre, evil_get, ok = run(main())
    assert "access-control-allow-origin" not in evil_get.headers
    assert evil_pre.headers.get("access-control-allow-origin") != "http://evil.example"
    assert evil_pre.status_code >= 400
    assert ok.headers["access-control-allow-origin"] == "http://ui.example"


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    assert build_parser().parse_args(["serve", "--host", "0.0.0.0"]).host == "0.0.0.0"  # only when told


# --- chat template sandbox ------------------------------------------------------------------------------------------
PAYLOADS = ["{{ 7*7 }}", "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
            "{{ cycler.__init__.__globals__.os.popen('id').read() }}", "{% raw %}", "{{", "{% endfor %}"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_template_code_in_a_message_is_literal_text(engine, payload):
    tok = engine.engine.llm.model.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": payload}], add_generation_prompt=True,
                                       tokenize=False)
    assert payload.strip() in rendered and "49" not in rendered and "uid=" not in rendered
    # the same messages through the engine's path: the template's tokens around the literal text
    assert engine.encode_chat([{"role": "user", "content": payload}]) == tok.encode(rendered,
                                                                                    add_special_tokens=False)


def test_a_request_cannot_supply_its_own_template(engine):
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))

    async def main():
        async with client(app) as c:
            plain = await c.post("/v1/chat/completions", json=chat("reverse 1 2 3"))
            hostile = await c.post("/v1/chat/completions", json=chat(
                "reverse 1 2 3", chat_template="{{ 'sort 9 9' }}", chat_template_kwargs={"x": 1},
                add_generation_prompt=False))
            return plain, hostile

    plain, hostile = run(main())
    assert plain.status_code == hostile.status_code == 200
    assert hostile.json()["choices"] == plain.json()["choices"]
    assert plain.json()["choices"][0]["message"]["content"] == "3 2 1"


def test_even_a_hostile_checkpoint_template_runs_sandboxed(engine, tmp_path):
    """The engine renders with the tokenizer's jinja environment, which is jinja2's ImmutableSandboxedEnvironment:
    attribute walks to Python internals raise SecurityError instead of running."""
    model = engine.engine.llm.model
    tok = model.tokenizer
    flag = tmp_path / "pwned"
    saved = tok.chat_template
    tok.chat_template = "{{ cycler.__init__.__globals__.os.popen('touch " + str(flag) + "').read() }}"
    try:
        with pytest.raises(jinja2.sandbox.SecurityError):
            model.apply_chat_template([{"role": "user", "content": "x"}])
        tok.chat_template = "{{ messages.append(1) }}"  # immutable sandbox: no mutation of the inputs
        with pytest.raises(jinja2.sandbox.SecurityError):
            model.apply_chat_template([{"role": "user", "content": "x"}])
    finally:
        tok.chat_template = saved
    assert not flag.exists()
