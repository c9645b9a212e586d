"""Schemathesis against the app's own OpenAPI schema, in-process (ASGI), over the real engine serving the bundled
model: every operation, schema-valid and schema-invalid bodies. No 5xx, no hang, every 4xx OpenAI-shaped, every
2xx matching its documented schema. Bounded: UNMASK_FUZZ_EXAMPLES examples per operation (default 12; the longer
run recorded in benchmarks/results/fuzz_schema.md sets it higher).

The server (the bundled model, and a tiny random LLaDA2 checkpoint for the block-diffusion fields) runs with tight
request limits (max_tokens, n, steps) so one generated request costs milliseconds; the
limits are part of what is fuzzed (refusals must be shaped 400s naming the field).
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter, defaultdict
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance
from starlette.testclient import TestClient

from engine.bundled import DEFAULT_MODEL_DIR
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import LocalEngineClient
from server.limits import RequestLimits
from tests.conftest import FAMILY_DIMS

EXAMPLES = int(os.environ.get("UNMASK_FUZZ_EXAMPLES", "12"))
CALL_DEADLINE_S = 60.0
"""A call that has not answered by then is a hang."""
LIMITS = RequestLimits(max_tokens=24, max_n=2, max_choices=4, max_steps=24, max_messages=16)



@pytest.fixture(scope="module", params=["bundled", "llada2_moe"])
def app(request, make_checkpoint):
    """The bundled model, and a tiny block-diffusion one (its fields: block_length rounding the canvas, editing;
    its small context keeps a fuzzed block_length cheap: a huge one once took a server past 19 GiB)."""
    model = DEFAULT_MODEL_DIR if request.param == "bundled" else make_checkpoint(
        request.param, **FAMILY_DIMS[request.param], max_position_embeddings=256)
    engine = LocalEngineClient.from_model(model, dtype="float32", max_num_seqs=8,
                                          kv_cache_memory=1 << 22, page_size=4)
    yield build_app(engine, ServerConfig(served_model_names=["tiny"], limits=LIMITS, max_queue=64))
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")
STATUSES: defaultdict[str, Counter] = defaultdict(Counter)
"""Statuses seen per operation (printed at the end of the module: run with -s to see them)."""


@pytest.fixture(scope="module", autouse=True)
def _report_statuses():
    yield
    for op, counts in sorted(STATUSES.items()):
        print(f"\n{op}: {sum(counts.values())} requests, statuses {dict(sorted(counts.items()))}", end="")


def _is_shaped_error(status: int, body: Any) -> bool:
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return False
    err = body["error"]
    return (set(err) == {"message", "type", "param", "code"} and err["code"] == status
            and isinstance(err["message"], str) and err["message"] != "" and isinstance(err["type"], str)
            and (err["param"] is None or isinstance(err["param"], str)))


@schemathesis.check
def openai_shaped_errors(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx carries {"error": {"message", "type", "param", "code"}} with code = the status."""
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not _is_shaped_error(response.status_code, body):
            raise AssertionError(f"{response.status_code} is not OpenAI-shaped: {response.text[:300]!r}")
    return None


def _call_with_deadline(fn: Any) -> Any:
    """Run fn on a thread; fail (instead of hanging the suite) if it does not return within CALL_DEADLINE_S."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(CALL_DEADLINE_S)
    if t.is_alive():
        raise AssertionError(f"no answer within {CALL_DEADLINE_S:g} s (hang)")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_no_5xx_and_shaped_4xx(case):
    # positive_data_acceptance is off: some schema-valid combinations are refused on purpose with a 400 naming the
    # field (threshold together with factor, block_length that does not divide max_tokens, the limits above);
    # those 400s are still checked to be OpenAI-shaped and never 5xx.
    r = _call_with_deadline(lambda: case.call_and_validate(excluded_checks=[positive_data_acceptance],
                                                           additional_checks=[openai_shaped_errors]))
    STATUSES[case.operation.label][r.status_code] += 1


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
KNOWN = {"/v1/chat/completions": {"POST"}, "/v1/completions": {"POST"}, "/v1/models": {"GET", "HEAD"},
         "/health": {"GET", "HEAD"}, "/version": {"GET", "HEAD"}, "/metrics": {"GET", "HEAD"},
         "/openapi.json": {"GET", "HEAD"}, "/docs": {"GET", "HEAD"},
         "/docs/oauth2-redirect": {"GET", "HEAD"}, "/docs/swagger-ui-bundle.js": {"GET", "HEAD"},
         "/docs/swagger-ui.css": {"GET", "HEAD"}, "/docs/favicon-32x32.png": {"GET", "HEAD"}}
_segment = st.text(st.characters(codec="ascii", categories=("L", "N"), include_characters="-_.~%"), min_size=1,
                   max_size=12)


@given(method=st.sampled_from(METHODS),
       path=st.one_of(st.sampled_from(sorted(KNOWN)), st.lists(_segment, min_size=1, max_size=4).map(
           lambda parts: "/" + "/".join(parts)), st.lists(_segment, min_size=1, max_size=3).map(
           lambda parts: "/v1/" + "/".join(parts))))
@settings(max_examples=max(EXAMPLES * 5, 40), deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_unknown_paths_and_methods_are_shaped_404_405(app, method, path):
    with TestClient(app, raise_server_exceptions=False) as c:
        body = {} if method in ("POST", "PUT", "PATCH") else None
        r = _call_with_deadline(lambda: c.request(method, path, json=body))
    allowed = KNOWN.get(path)
    if allowed is None:
        expected = {404}
    elif method in allowed:
        return  # a real route: the schema test above covers it
    else:
        expected = {405}
    assert r.status_code in expected, (method, path, r.status_code, r.text)
    if method != "HEAD":
        assert _is_shaped_error(r.status_code, r.json()), (method, path, r.text)
    if r.status_code == 405:
        assert r.headers.get("allow"), r.headers
