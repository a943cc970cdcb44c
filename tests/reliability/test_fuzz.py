"""Bad input, generated: registry rows, repo ids, queries, card YAML and raw HTTP to the local Hub.

Each gets a clear error (a typed exception, or a 4xx from the server), never a crash or a 5xx, and never a
change of state.
"""

from __future__ import annotations

import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moin_hub import LocalHub, Router, push_expert
from moin_hub._validators import validate_query, validate_repo_id
from moin_hub.errors import EmptyQueryError, InvalidRegistryError, MoinHubError
from moin_hub.hub.registry import experts_from_parquet
from tests.reliability._tools import raw_request

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
SHA = "a" * 40
huge = st.just("x" * 200_000)
text = st.one_of(st.text(max_size=40), huge, st.just(""), st.just("../etc/passwd"), st.just("a/b"))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
row = st.fixed_dictionaries(
    {},
    optional={
        "expert_id": text, "repo_id": st.one_of(text, st.just("org/expert")),
        "revision": st.one_of(text, st.just(SHA)),
        "centroid": st.lists(floats, min_size=0, max_size=6),
        "keywords": st.lists(text, max_size=3), "n_docs": st.integers(-5, 2**40),
        "perplexity": floats, "lora_rank": st.integers(-3, 64),
    },
)


@FUZZ
@given(rows=st.lists(row, max_size=4))
@example(rows=[{"expert_id": "x" * 200_000, "centroid": []}])  # once echoed whole into the error message
def test_registry_rows_parse_or_fail_with_invalid_registry_error(rows):
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, ValueError, TypeError):  # pyarrow itself cannot mix these values: not our input
        return
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    try:
        records = experts_from_parquet(buffer.getvalue(), registry_id="org/reg", dim=4)
    except InvalidRegistryError as err:
        assert "org/reg" in str(err) and len(str(err)) < 2000  # clear and bounded, never the whole row
        return
    for record in records:  # whatever is accepted is sound
        assert len(record.centroid) == 4 and all(math.isfinite(v) for v in record.centroid)
        assert len(record.revision) == 40


@FUZZ
@given(data=st.binary(max_size=2000))
def test_garbage_parquet_is_an_invalid_registry(data):
    with pytest.raises(InvalidRegistryError):
        experts_from_parquet(data, registry_id="org/reg", dim=4)


@FUZZ
@given(repo_id=st.one_of(st.text(max_size=200), huge))
def test_repo_ids_are_valid_or_refused_with_value_error(repo_id):
    try:
        assert validate_repo_id(repo_id) == repo_id
    except ValueError as err:
        assert len(str(err)) < 1000 or "x" * 1000 in repo_id


@FUZZ
@given(query=st.one_of(st.text(max_size=300), st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs"]),
                                                      max_size=50)))
def test_queries_are_validated(query):
    try:
        assert validate_query(query) == query.strip()
    except EmptyQueryError:
        assert not query.strip()
    except ValueError as err:
        assert "UTF-8" in str(err) or "limit" in str(err)


@pytest.fixture(scope="module")
def router(hub, tmp_path_factory, tiny_base, embedder):
    from moin_hub import init_registry
    from tests import _helpers
    from tests.conftest import BASE_REPO, EMBEDDER_REPO

    registry_id = "test-org/fuzz-registry"
    init_registry(registry_id, base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url, exist_ok=True)
    folder = tmp_path_factory.mktemp("fuzz-expert")
    for topic in ("cooking", "football"):
        push_expert(_helpers.write_expert(folder / topic, tiny_base, embedder, topic, base_repo=BASE_REPO),
                    registry=registry_id, repo_id=f"test-org/fuzz-{topic}", endpoint=hub.url)
    from moin_hub import Registry

    return Router(Registry.load(registry_id, endpoint=hub.url), embedder=embedder)


@pytest.mark.parametrize("query", ["", " \n\t ", "\x00\x01\x02", "a" * 1_000_000, "caf\udce9", "\u202e\u200b",
                                   "😀" * 50, "<script>alert(1)</script>"])
def test_odd_queries_route_or_fail_clearly(router, query):
    try:
        result = router.route(query)
    except (EmptyQueryError, ValueError) as err:
        assert isinstance(err, MoinHubError) or "query" in str(err)
        return
    assert result.best.expert.expert_id in ("cooking", "football")


# ------------------------------------------------------------------------------------- raw HTTP


@pytest.fixture(scope="module")
def small_hub(tmp_path_factory):
    """A hub with a 64 KiB body limit and one repo, to throw raw HTTP at."""
    with LocalHub(tmp_path_factory.mktemp("fuzz-hub"), max_body_bytes=64 * 1024) as server:
        from huggingface_hub import HfApi

        HfApi(endpoint=server.url).create_repo("org/repo")
        yield server


def _state(hub) -> list:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    return sorted((m.id, api.model_info(m.id).sha) for m in api.list_models())


METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
PATHS = st.one_of(
    st.sampled_from(["/api/repos/create", "/api/models/org/repo/commit/main", "/api/models/org/repo/preupload/main",
                     "/api/validate-yaml", "/api/models/org/repo/paths-info/main", "/org/repo/resolve/main/x",
                     "/api/repos/delete", "/api/models/org/repo/tree/main/..%2F..", "/org/repo/resolve/main/..%2F.."]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(lambda p: "/" + p),
)
BODIES = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                   st.sampled_from([b"{", b"[]", b"null", b'{"name": 5}', b'{"key": "header"}\n{"key": "file", "value":'
                                    b' {"path": "../../x", "content": "eA=="}}', b'{"content": 12, "repoType": "model"}']))


@FUZZ
@given(method=METHODS, path=PATHS, body=BODIES)
def test_malformed_http_gets_a_4xx_and_changes_nothing(small_hub, method, path, body):
    before = _state(small_hub)
    status, content_type, payload = raw_request(small_hub.url, method, path,
                                                body if method not in ("GET", "HEAD") else None)
    assert status < 500, (method, path, body, payload[:300])
    if status >= 400 and method != "HEAD":
        assert content_type.startswith("application/json")
        json.loads(payload)
    assert _state(small_hub) == before


def test_oversized_bodies_are_refused(small_hub):
    before = _state(small_hub)
    status, _, _ = raw_request(small_hub.url, "POST", "/api/models/org/repo/commit/main", b"x" * (200 * 1024))
    assert status == 413
    assert _state(small_hub) == before


@FUZZ
@given(card=st.one_of(st.text(max_size=400), st.text(max_size=200).map(lambda t: f"---\n{t}\n---\nbody")))
def test_card_yaml_is_validated_without_crashing(small_hub, card):
    status, _, payload = raw_request(small_hub.url, "POST", "/api/validate-yaml",
                                     json.dumps({"content": card, "repoType": "model"}).encode(),
                                     {"Content-Type": "application/json"})
    assert status in (200, 400, 422), payload[:300]
