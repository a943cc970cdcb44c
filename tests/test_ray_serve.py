"""The Ray Serve deployment on a real local Ray cluster: experts multiplexed over 2 replicas (2 experts each).

One cluster per module (2 CPUs, the dashboard off), started as OFFLINE_ASSETS.md's Ray Serve notes say; the
replicas pull the tiny Llama and the experts over HTTP from the session's local Hub on loopback. Every
completion goes through :func:`complete`, which replays each replica's LRU of experts from the answers seen
so far and checks it against what the replica's engine reports.
"""

from __future__ import annotations

import gc
import http.client
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from huggingface_hub import constants

from moin_hub import init_registry, push_expert
from moin_hub.hub.expert import write_centroid
from tests import _helpers
from tests._helpers import QUERIES, free_port
from tests.conftest import BASE_REPO, EMBEDDER_REPO

pytestmark = pytest.mark.e2e

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from moin_hub.serving.ray_serve import (  # noqa: E402
    AUTO_MODEL,
    BASE_MODEL,
    ApiError,
    HeldExpert,
    api_error,
    build_app,
    parse_completion_request,
)

TOPICS = ("cooking", "football", "astronomy")
#: Experts whose centroids sit far from every test topic (routed queries never pick them; forced ones do).
EXTRAS = {
    "extra-code": "Compile the C++ program with optimisations and debug the segmentation fault in the pointers.",
    "extra-finance": "Interest rates rose and the stock market fell as investors sold their bank shares.",
}
MAX_EXPERTS = 2  # per replica
#: A batch window wide enough that requests sent together for one expert always meet in one batch.
BATCH_WAIT_S = 0.5
ROUTING_SETTLE_S = 0.5  # replicas push the experts they hold every 0.1 s; handles learn it by long poll


@dataclass
class Cluster:
    url: str
    registry_id: str
    repo_ids: dict[str, str]
    lru: dict[str, OrderedDict] = field(default_factory=dict)  # replica -> experts, least recently used first
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, dict]:
        port = int(self.url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()


def complete(cluster: Cluster, model: str, prompt: str, *, check_lru: bool = True, **fields: Any) -> dict:
    """POST /v1/completions; check the answer's shape and (sequential calls) the replica's LRU of experts."""
    status, answer = cluster.request("POST", "/v1/completions", {"model": model, "prompt": prompt,
                                                                 "max_tokens": 8, "temperature": 0, **fields})
    assert status == 200, answer
    assert answer["object"] == "text_completion" and answer["model"] == model
    (choice,) = answer["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["prompt_tokens"] > 0 and 0 <= usage["completion_tokens"] <= fields.get("max_tokens", 8)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    moin = answer["moin"]
    expert, loaded = moin["expert"], moin["experts_loaded"]
    assert len(loaded) <= MAX_EXPERTS
    if check_lru:
        with cluster.lock:
            lru = cluster.lru.setdefault(moin["replica"], OrderedDict())
            if expert is not None:
                if expert in lru:
                    lru.move_to_end(expert)
                else:
                    if len(lru) == MAX_EXPERTS:
                        lru.popitem(last=False)
                    lru[expert] = None
            # the engine holds exactly the experts Ray's multiplexer holds, in the same LRU order
            assert loaded == list(lru), (moin["replica"], loaded, list(lru))
            assert moin["experts_held"] == loaded
    return answer


@pytest.fixture(scope="module")
def ray_registry(hub, tiny_base, embedder, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A registry with one expert per test topic and two off-topic extras; returns (id, {expert: repo})."""
    registry_id = f"test-org/ray-{uuid.uuid4().hex[:8]}"
    init_registry(registry_id, base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url)
    root = tmp_path_factory.mktemp("ray-experts")
    repos = {}
    for seed, expert_id in enumerate((*TOPICS, *EXTRAS)):
        topic = expert_id if expert_id in TOPICS else "cooking"
        folder = _helpers.write_expert(root / expert_id, tiny_base, embedder, topic, base_repo=BASE_REPO,
                                       expert_id=expert_id, seed=seed)
        if expert_id in EXTRAS:
            vector = embedder.encode([EXTRAS[expert_id]])[0]
            write_centroid(folder / "centroid.safetensors", vector / np.linalg.norm(vector))
        repos[expert_id] = f"test-org/{registry_id[-8:]}-{expert_id}"
        push_expert(folder, registry=registry_id, repo_id=repos[expert_id], endpoint=hub.url)
    return registry_id, repos


@pytest.fixture(scope="module")
def cluster(hub, ray_registry, tmp_path_factory):
    """A local Ray cluster serving the registry on a free loopback port; always torn down."""
    registry_id, repos = ray_registry
    home = tmp_path_factory.mktemp("ray-hf-home")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    mp = pytest.MonkeyPatch()
    # the raylet, and so every replica, inherits the driver's environment at ray.init. Serve's controller kills
    # a proxy that is not ready within 5 s (then serve.start fails with ActorDiedError): on a loaded 2-core
    # machine starting one takes longer, so the ready and health checks get a minute.
    for name, value in {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
                        "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HOME": str(home),
                        "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                        "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": "1"}.items():
        mp.setenv(name, value)
    mp.delenv("HF_TOKEN", raising=False)
    mp.setattr(constants, "HF_HOME", str(home))
    mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    try:
        ray.init(include_dashboard=False, num_cpus=2, object_store_memory=200 * 1024**2, _temp_dir=temp_dir,
                 log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(registry_id, endpoint=hub.url, replicas=2, max_experts_per_replica=MAX_EXPERTS,
                        replica_num_cpus=0.5, ingress_num_cpus=0.5, batch_wait_s=BATCH_WAIT_S)
        serve.run(app, name="moin", route_prefix="/")
        running = Cluster(f"http://127.0.0.1:{port}", registry_id, repos)
        deadline = time.monotonic() + 30
        while True:  # the HTTP proxy may come up a moment after the application
            try:
                if running.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Serve HTTP proxy never answered /health"
            time.sleep(0.2)
        yield running
    finally:
        for step in (serve.shutdown, ray.shutdown):
            try:
                step()
            except Exception as err:  # noqa: BLE001 - keep tearing down
                print(f"{step.__qualname__} failed: {err!r}")
        mp.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------ without a cluster


def test_parse_completion_request_checks_each_field():
    params = parse_completion_request({"model": "football", "prompt": ["Who won?"], "max_tokens": 4,
                                       "temperature": 0, "stop": "\n", "seed": 3, "user": "ignored"})
    assert params.generation() == {"prompt": "Who won?", "max_tokens": 4, "temperature": 0.0, "top_p": 1.0,
                                   "stop": ("\n",), "seed": 3}
    assert parse_completion_request({"prompt": "x"}).model == AUTO_MODEL
    bad = [({"prompt": 3}, "prompt"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
           ({"prompt": "x", "max_tokens": True}, "max_tokens"), ({"prompt": "x", "temperature": 3}, "temperature"),
           ({"prompt": "x", "top_p": 0}, "top_p"), ({"prompt": "x", "stop": [1]}, "stop"),
           ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "stream": True}, "stream"),
           ({"prompt": "x", "model": ""}, "model"), ({"prompt": "x", "seed": 1.5}, "seed")]
    for body, param in bad:
        with pytest.raises(ApiError) as caught:
            parse_completion_request(body)
        assert caught.value.status == 400 and caught.value.param == param, body
        assert param in caught.value.message
    assert api_error(_raises(parse_completion_request, {"prompt": "  "})).body()["error"]["code"] == "empty_prompt"


def _raises(func: Any, *args: Any) -> BaseException:
    try:
        func(*args)
    except Exception as err:  # noqa: BLE001
        return err
    raise AssertionError("no error raised")


def test_held_expert_unpins_once_whatever_calls_del():
    """Ray calls ``model.__del__()`` on eviction and then sets ``model.__del__ = lambda _: None`` on the instance;
    the garbage collector still calls the class's ``__del__``: the unpin must happen exactly once."""

    class Engine:
        unpinned: list[str] = []

        def unpin(self, expert: str) -> bool:
            self.unpinned.append(expert)
            return True

    engine = Engine()
    held = HeldExpert(engine, "cooking")
    held.__del__()  # what ray/serve/multiplex.py unload_model_lru does
    held.__del__ = lambda _: None
    assert engine.unpinned == ["cooking"] and held.released
    del held
    gc.collect()
    assert engine.unpinned == ["cooking"]


# ------------------------------------------------------------------------------------------ on the cluster


def test_lists_registered_experts(cluster):
    status, listing = cluster.request("GET", "/v1/experts")
    assert status == 200 and listing["registry"] == cluster.registry_id
    assert {e["id"]: e["repo_id"] for e in listing["data"]} == cluster.repo_ids
    status, models = cluster.request("GET", "/v1/models")
    assert status == 200 and {AUTO_MODEL, BASE_MODEL, *cluster.repo_ids} == {m["id"] for m in models["data"]}


def test_routed_queries_answer_with_their_topic_expert(cluster):
    for topic in TOPICS:
        answer = complete(cluster, AUTO_MODEL, QUERIES[topic])
        assert answer["moin"]["expert"] == topic
        route = answer["moin"]["route"]
        assert route["mode"] == "top1" and route["expert_id"] == topic and route["similarity"] > 0.1


def test_requests_stick_to_the_replica_holding_their_expert(cluster):
    time.sleep(ROUTING_SETTLE_S)
    holders: dict[str, set[str]] = {}
    for replica, lru in cluster.lru.items():
        for expert in lru:
            holders.setdefault(expert, set()).add(replica)
    assert len(holders) >= MAX_EXPERTS, cluster.lru
    for expert, replicas in holders.items():
        loads = {}
        for _ in range(4):
            moin = complete(cluster, expert, QUERIES[expert])["moin"]
            assert moin["replica"] in replicas, (expert, moin["replica"], replicas)
            loads.setdefault(moin["replica"], moin["adapter_loads"])
            assert moin["adapter_loads"] == loads[moin["replica"]]  # a warm hit: no new load


def test_more_experts_than_a_replica_holds_evict_the_least_recently_used(cluster):
    answers = []
    for expert in (*EXTRAS, *TOPICS):  # 5 experts > 2 replicas x 2 slots
        time.sleep(ROUTING_SETTLE_S)
        answers.append(complete(cluster, expert, "The oven, the match and the stars."))
    evicting = {a["moin"]["replica"] for a in answers if a["moin"]["evictions"] > 0}
    assert evicting, [(a["moin"]["replica"], a["moin"]["expert"]) for a in answers]  # 5 experts > 4 slots
    last = {a["moin"]["replica"]: a["moin"] for a in answers}
    for replica in evicting:  # the engine's loaded list shrank back to the budget, LRU out (see complete())
        assert last[replica]["experts_loaded"] == list(cluster.lru[replica])
        assert len(last[replica]["experts_loaded"]) == MAX_EXPERTS


def test_forced_expert_by_id_or_repo_id(cluster):
    answer = complete(cluster, "football", QUERIES["cooking"])  # forced: the prompt's topic does not matter
    assert answer["moin"]["expert"] == "football" and answer["moin"]["route"]["mode"] == "forced"
    answer = complete(cluster, cluster.repo_ids["astronomy"], QUERIES["cooking"])
    assert answer["moin"]["expert"] == "astronomy"


def test_base_model_uses_no_expert(cluster):
    answer = complete(cluster, BASE_MODEL, QUERIES["astronomy"])
    assert answer["moin"]["expert"] is None and answer["moin"]["route"]["mode"] == "base"


def test_errors_are_openai_json(cluster):
    cases = [({"model": "no-such-expert", "prompt": "hi"}, 404, "model_not_found"),
             ({"model": "test-org/not-registered", "prompt": "hi"}, 404, "model_not_found"),
             ({"model": "moin:topk", "prompt": "hi"}, 400, "unsupported"),
             ({"model": AUTO_MODEL, "prompt": "   "}, 400, "empty_prompt"),
             ({"model": AUTO_MODEL, "prompt": "hi", "max_tokens": 100_000}, 400, None)]
    for body, status, code in cases:
        got, answer = cluster.request("POST", "/v1/completions", body)
        assert got == status, (body, answer)
        error = answer["error"]
        assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    got, answer = cluster.request("POST", "/v1/completions", raw=b"{not json")
    assert got == 400 and "JSON" in answer["error"]["message"]


def test_concurrent_requests_of_two_experts_each_get_their_own(cluster):
    answers: list[dict] = []
    errors: list[BaseException] = []
    experts = ("cooking", "football") * 3
    start = threading.Barrier(len(experts))

    def run(expert: str) -> None:
        try:
            start.wait(timeout=60)  # all six leave together, well inside the replicas' batch window
            answers.append(complete(cluster, expert, QUERIES[expert], check_lru=False))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(e,)) for e in experts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(a["model"] for a in answers) == sorted(a["moin"]["expert"] for a in answers) == \
        ["cooking"] * 3 + ["football"] * 3
    # batched per replica: a batch holds one expert's requests only, and requests sent together do share one
    sizes = {expert: [a["moin"]["batch_size"] for a in answers if a["model"] == expert] for expert in experts}
    assert all(1 <= size <= 3 for per_expert in sizes.values() for size in per_expert), sizes
    assert max(size for per_expert in sizes.values() for size in per_expert) > 1, sizes
