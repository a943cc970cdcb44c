"""Bad requests to `moin-hub serve`, generated: every answer is a 2xx or an OpenAI-style 4xx, never a 5xx."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.reliability._tools import raw_request

pytest.importorskip("fastapi")

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
JSON_HEADERS = {"Content-Type": "application/json"}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=30), st.just("x" * 50_000))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=6)
models = st.one_of(st.sampled_from(["moin:auto", "moin:topk", "moin:adaptive", "moin:base", "cooking", "moin:",
                                    "../../etc/passwd", "test-org/nope", ""]), anything)
messages = st.lists(st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "system",
                                                                                          "assistant"]), anything),
                                                         "content": anything}), max_size=3)
completion = st.fixed_dictionaries({}, optional={
    "model": models, "prompt": st.one_of(anything, st.lists(st.text(max_size=20), max_size=3)),
    "max_tokens": st.one_of(st.integers(-5, 10**6), anything), "temperature": anything, "top_p": anything,
    "stop": anything, "n": anything, "stream": anything, "seed": anything, "messages": messages})
route = st.fixed_dictionaries({}, optional={"input": anything, "mode": anything, "k": anything,
                                            "threshold": anything})
PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/route")


@pytest.fixture(scope="module")
def server(hub, topic_registry):
    from moin_hub.serving.engine import ExpertEngine
    from moin_hub.serving.server import ServeConfig, start_server

    engine = ExpertEngine(topic_registry, endpoint=hub.url, cache_size=2)
    with start_server(engine, ServeConfig(max_tokens_limit=4, max_prompt_chars=2000)) as running:
        yield running


def _check(status: int, content_type: str, payload: bytes) -> dict:
    assert status < 500, payload[:300]
    if status == 200 and content_type.startswith("text/event-stream"):  # stream=true: OpenAI's SSE
        events = [line[len("data: "):] for line in payload.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1]), payload[:300]
        return {"choices": [True], "usage": {"completion_tokens": 0}}
    assert content_type.startswith("application/json"), content_type
    body = json.loads(payload)
    if status >= 400:
        assert set(body["error"]) >= {"message", "type", "code"} and len(body["error"]["message"]) <= 600
    return body


@FUZZ
@given(path=st.sampled_from(PATHS), body=st.one_of(completion, route))
@example(path="/v1/completions", body={"model": "moin:auto", "prompt": "pizza dough", "max_tokens": 2})
@example(path="/v1/chat/completions", body={"messages": [{"role": "user", "content": [{"type": "text",
                                                                                      "text": "stars"}]}]})
@example(path="/v1/completions", body={"prompt": "hi", "temperature": float("nan")})
def test_generated_json_requests_get_answers_or_4xx(server, path, body):
    status, content_type, payload = raw_request(server.url, "POST", path, body=json.dumps(body).encode(),
                                                headers=JSON_HEADERS)
    answer = _check(status, content_type, payload)
    if status == 200 and path != "/v1/route":
        assert answer["choices"] and answer["usage"]["completion_tokens"] <= 4


@FUZZ
@given(path=st.sampled_from(PATHS), raw=st.one_of(st.binary(max_size=200), st.sampled_from(
    [b"", b"{", b"[]", b"null", b'{"prompt": "\\ud800"}', b'{"prompt": 1e999}', b"\xff\xfe"])))
def test_garbage_bodies_get_a_4xx(server, path, raw):
    status, content_type, payload = raw_request(server.url, "POST", path, body=raw, headers=JSON_HEADERS)
    assert 400 <= status < 500
    _check(status, content_type, payload)


def test_oversized_bodies_are_refused_before_they_are_read(server):
    status, content_type, payload = raw_request(server.url, "POST", "/v1/completions", body=b"x" * 2_000_000,
                                                headers=JSON_HEADERS)
    assert status == 413 and json.loads(payload)["error"]["code"] == "request_too_large"
