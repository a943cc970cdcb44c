"""`moin-hub serve`: the OpenAI-compatible server, driven by the real `openai` client over HTTP.

A registry of three topic experts (tiny random Llama, real MiniLM centroids) on the session's local Hub;
the server runs in a thread on a free loopback port.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from huggingface_hub import constants

from moin_hub.hub.mixing import Mixture
from moin_hub.serving.batching import ExpertBatcher, Job, batch_deadline, next_batch
from moin_hub.serving.engine import ExpertEngine
from moin_hub.serving.server import ServeConfig, start_server
from tests._helpers import QUERIES, TOPICS, free_port
from tests.reliability._tools import raw_request

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

API_KEY = "sk-test-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the module's own HF cache (tests get theirs from hf_home)
        home = tmp_path_factory.mktemp("serve-hf-home")
        mp.setenv("HF_HOME", str(home))
        mp.setattr(constants, "HF_HOME", str(home))
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        yield home


@pytest.fixture(scope="module")
def server(hub, topic_registry, hf_cache):
    engine = ExpertEngine(topic_registry, endpoint=hub.url, cache_size=2)
    engine.warm_up()
    config = ServeConfig(api_key=API_KEY, max_tokens_limit=512, batch_window_ms=20)
    with start_server(engine, config) as running:
        yield running


@pytest.fixture(scope="module")
def batching_server(server):
    """A second server on the same engine whose batcher waits 300 ms: concurrent test requests surely meet."""
    config = ServeConfig(api_key=API_KEY, max_tokens_limit=512, batch_window_ms=300, refresh_seconds=0)
    with start_server(server.app.state.engine, config) as running:
        yield running


@pytest.fixture
def batching_client(batching_server):
    return openai.OpenAI(base_url=f"{batching_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _get(server, path: str, *, auth: bool = True) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
    status, _, body = raw_request(server.url, "GET", path, headers=headers)
    return status, body


# ------------------------------------------------------------------------------------------ pure parts


def test_next_batch_mixes_single_experts_and_keeps_mixtures_and_sampling_apart():
    def job(*experts: str, temperature: float = 0.0) -> Job:
        weights = tuple(1 / len(experts) for _ in experts)
        return Job(Mixture(experts, weights, "topk" if len(experts) > 1 else "top1"), [1, 2], 4, temperature)

    a1, b1, base, ab, a_hot, ab2 = job("a"), job("b"), job(), job("a", "b"), job("a", temperature=0.7), job("a", "b")
    batch, rest = next_batch([a1, b1, base, ab, a_hot, ab2], 2)
    assert batch == [a1, b1] and rest == [base, ab, a_hot, ab2]  # different experts, one batch
    batch, rest = next_batch(rest, 8)
    assert batch == [base] and rest == [ab, a_hot, ab2]
    batch, rest = next_batch(rest, 8)  # a mixture of several experts batches with the same mixture only
    assert batch == [ab, ab2] and rest == [a_hot]
    assert next_batch(rest, 8) == ([a_hot], [])
    assert next_batch([], 4) == ([], [])


def test_config_checks_itself():
    with pytest.raises(ValueError, match="mode"):
        ServeConfig(mode="top2")
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="threshold"):
        ServeConfig(threshold=float("nan"))
    assert ServeConfig(threshold=-2.5).threshold == -2.5  # a calibrated z-score may lie outside [-1, 1]
    assert "api_key" not in repr(ServeConfig(api_key="secret"))


# ------------------------------------------------------------------------------------------ the server


@pytest.mark.e2e
def test_completions_route_each_topic_to_its_expert(client):
    for topic in TOPICS:
        response = client.completions.create(model="moin:auto", prompt=QUERIES[topic], max_tokens=8,
                                             temperature=0)
        choice = response.choices[0]
        assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
        assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 0
        moin = response.model_extra["moin"]
        assert [e["expert_id"] for e in moin["experts"]] == [topic]
        assert moin["experts"][0]["weight"] == 1.0 and moin["best"]["expert_id"] == topic


@pytest.mark.e2e
def test_forced_expert_and_base_model_differ_from_each_other(client):
    forced = client.completions.create(model="cooking", prompt="The weather today", max_tokens=12, temperature=0)
    assert forced.model_extra["moin"]["experts"][0]["expert_id"] == "cooking"
    by_repo = client.completions.create(model=forced.model_extra["moin"]["experts"][0]["repo_id"],
                                        prompt="The weather today", max_tokens=12, temperature=0)
    assert by_repo.choices[0].text == forced.choices[0].text  # greedy: same expert, same text
    base = client.completions.create(model="moin:base", prompt="The weather today", max_tokens=12, temperature=0)
    assert base.model_extra["moin"]["experts"] == []
    # the test experts are random LoRAs with large updates: an expert changes the greedy text
    assert base.choices[0].text != forced.choices[0].text


@pytest.mark.e2e
def test_chat_completions_route_on_the_last_user_turn(client):
    response = client.chat.completions.create(
        model="moin:auto", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": QUERIES["cooking"]},
                  {"role": "assistant", "content": "Yes."},
                  {"role": "user", "content": QUERIES["astronomy"]}])
    assert response.choices[0].message.role == "assistant"
    assert isinstance(response.choices[0].message.content, str)
    assert response.model_extra["moin"]["experts"][0]["expert_id"] == "astronomy"


@pytest.mark.e2e
def test_streams_give_the_same_text_as_whole_answers(client):
    whole = client.completions.create(model="football", prompt="The weather today", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="football", prompt="The weather today", max_tokens=12,
                                            temperature=0, stream=True))
    assert chunks[0].model_extra["moin"]["experts"][0]["expert_id"] == "football"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and len(chunks) >= 3

    messages = [{"role": "user", "content": QUERIES["astronomy"]}]
    whole = client.chat.completions.create(model="moin:auto", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="moin:auto", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


@pytest.mark.e2e
def test_streamed_and_whole_requests_share_batches(server, client, batching_client):
    engine = server.app.state.engine
    expected = {t: client.completions.create(model=t, prompt=QUERIES[t], max_tokens=6 + i, temperature=0)
                .choices[0].text for i, t in enumerate(TOPICS)}
    before = engine.stats.snapshot()
    got: dict[str, str] = {}

    def ask(i: int, topic: str) -> None:
        if i % 2:  # streamed
            chunks = batching_client.completions.create(model=topic, prompt=QUERIES[topic], max_tokens=6 + i,
                                                        temperature=0, stream=True)
            got[topic] = "".join(c.choices[0].text for c in chunks)
        else:
            got[topic] = batching_client.completions.create(model=topic, prompt=QUERIES[topic], max_tokens=6 + i,
                                                            temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i, t)) for i, t in enumerate(TOPICS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = engine.stats.snapshot()
    assert got == expected  # each row keeps its own length limit and expert, streamed or not
    assert after["batched_requests"] - before["batched_requests"] == 3
    assert after["batches"] - before["batches"] == 1  # the batch window put them together


@pytest.mark.e2e
def test_a_stop_string_ends_a_stream_where_it_ends_a_whole_answer(client):
    text = client.completions.create(model="cooking", prompt="The weather today", max_tokens=16,
                                     temperature=0).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]  # two characters from the middle of the answer
    assert stop.strip(), text
    whole = client.completions.create(model="cooking", prompt="The weather today", max_tokens=16, temperature=0,
                                      stop=[stop])
    chunks = list(client.completions.create(model="cooking", prompt="The weather today", max_tokens=16,
                                            temperature=0, stop=[stop], stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == whole.choices[0].text == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "stop"


@pytest.mark.e2e
def test_a_client_that_leaves_a_stream_stops_its_generation(server, client):
    engine = server.app.state.engine
    request = {"model": "astronomy", "prompt": "Once upon a time", "max_tokens": 500, "temperature": 0}
    # greedy, so deterministic: left alone, this request never meets EOS and runs to its 500 tokens; a
    # stream of it that ends early can only have been stopped by its client leaving
    whole = client.completions.create(**request)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 500
    before = engine.stats.snapshot()["generated_tokens"]
    stream = client.completions.create(**request, stream=True)
    next(iter(stream))
    stream.close()
    after_close = client.completions.create(model="astronomy", prompt="x y", max_tokens=2)  # still serving
    assert after_close.choices[0].finish_reason in ("stop", "length")
    # the left stream's tokens are counted when it ends, which is before the next request's batch runs
    streamed = engine.stats.snapshot()["generated_tokens"] - before - after_close.usage.completion_tokens
    assert 1 <= streamed < 500, streamed


@pytest.mark.e2e
def test_topk_mode_mixes_several_experts(client):
    response = client.completions.create(model="moin:topk", prompt=QUERIES["football"], max_tokens=4,
                                         temperature=0)
    experts = response.model_extra["moin"]["experts"]
    assert response.model_extra["moin"]["mode"] == "topk"
    assert experts[0]["expert_id"] == "football" and len(experts) >= 2
    assert abs(sum(e["weight"] for e in experts) - 1.0) < 1e-6
    assert experts == sorted(experts, key=lambda e: -e["weight"])


@pytest.mark.e2e
def test_route_experts_models_health(server, client):
    status, body = raw_request(server.url, "POST", "/v1/route",
                               headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
                               body=json.dumps({"input": [QUERIES["cooking"], QUERIES["football"]],
                                                "mode": "adaptive"}).encode())[0::2]
    assert status == 200
    data = json.loads(body)["data"]
    assert [d["expert"]["expert_id"] for d in data] == ["cooking", "football"]
    assert all(d["mixture"]["mode"] == "adaptive" and d["mixture"]["experts"] for d in data)

    client.completions.create(model="football", prompt="x y", max_tokens=2)
    status, body = _get(server, "/v1/experts")
    experts = json.loads(body)
    assert status == 200 and {e["id"] for e in experts["data"]} == set(TOPICS)
    loaded = {e["id"] for e in experts["data"] if e["loaded"]}
    assert "football" in loaded and len(loaded) <= experts["cache"]["capacity"] == 2

    ids = [m.id for m in client.models.list()]
    assert ids[:5] == ["moin:auto", "moin:top1", "moin:topk", "moin:adaptive", "moin:base"]
    assert set(ids[5:]) == set(TOPICS)
    status, body = _get(server, "/health", auth=False)
    assert status == 200 and json.loads(body)["experts"] == 3


@pytest.mark.e2e
def test_errors_are_openai_error_objects(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-expert", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="moin:auto", prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="moin:auto", prompt="   ", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        client.completions.create(model="moin:auto", prompt=["hi", "ho"], max_tokens=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="moin:auto", prompt="hi", max_tokens=2, temperature=9)
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, body = raw_request(server.url, "POST", "/v1/completions",
                               headers={"Authorization": f"Bearer {API_KEY}"}, body=b"{not json")[0::2]
    assert status == 400 and "error" in json.loads(body)


@pytest.mark.e2e
def test_concurrent_requests_for_different_experts_share_batches(server, client, batching_client):
    engine = server.app.state.engine
    before = engine.stats.snapshot()
    results: dict[int, object] = {}
    models = [TOPICS[0], TOPICS[1], "moin:base", "moin:auto"]

    def ask(i: int) -> None:
        results[i] = batching_client.completions.create(model=models[i % 4],
                                                        prompt=f"{QUERIES[TOPICS[i % 3]]} {i}", max_tokens=4,
                                                        temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8
    for i, response in results.items():
        experts = [e["expert_id"] for e in response.model_extra["moin"]["experts"]]
        expected = {0: [TOPICS[0]], 1: [TOPICS[1]], 2: [], 3: [TOPICS[i % 3]]}[i % 4]
        assert experts == expected
    after = engine.stats.snapshot()
    requests = after["batched_requests"] - before["batched_requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 8 and batches < 8  # requests for different experts shared batches

    # a batched answer is the answer each request gets alone (per-row adapters, left padding)
    for i in (0, 1, 2):
        alone = client.completions.create(model=models[i], prompt=f"{QUERIES[TOPICS[i % 3]]} {i}", max_tokens=4,
                                          temperature=0)
        assert alone.choices[0].text == results[i].choices[0].text


@pytest.mark.e2e
def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="moin:auto", prompt=QUERIES["cooking"], max_tokens=2)
    status, body = _get(server, "/metrics", auth=False)
    text = body.decode()
    assert status == 200
    values = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["moin_cache_hits_total"] + values["moin_cache_misses_total"] >= 1
    assert values["moin_adapter_loads_total"] >= 1 and values["moin_generated_tokens_total"] >= 1
    assert values["moin_route_latency_seconds_count"] >= 1
    assert values['moin_route_latency_seconds_bucket{le="+Inf"}'] == values["moin_route_latency_seconds_count"]
    assert values['moin_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert "# TYPE moin_tokens_per_second gauge" in text and API_KEY not in text


def test_batch_deadline_waits_after_a_batch_for_the_clients_it_answered():
    assert batch_deadline(100.0, 0.01, last_end=float("-inf"), last_seconds=0.0) == 100.01  # first batch
    assert batch_deadline(100.0, 0.01, last_end=50.0, last_seconds=4.0) == 100.01  # idle since: the window only
    # queued at 96 during a 4 s batch that ended at 100: not at once, but the window + 5% of 4 s after its end
    assert batch_deadline(96.0, 0.01, last_end=100.0, last_seconds=4.0) == pytest.approx(100.21)
    assert batch_deadline(96.0, 0.01, last_end=100.0, last_seconds=4.0, settle_share=0.0) == pytest.approx(100.01)
    with pytest.raises(ValueError, match="settle_share"):
        ExpertBatcher(None, settle_share=2)  # type: ignore[arg-type]


def test_a_request_queued_during_a_batch_waits_for_the_clients_that_batch_answers():
    """Closed-loop clients: B arrives while A's batch runs; A's client sends C as soon as A is answered. B and C
    run together (B alone at once, then C alone, is how a stream of 8 clients fell into batches of 5 and 3)."""
    started, release = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    class Gated:
        def generate_batch(self, prompts, mixtures, **kwargs):
            batches.append([p[0] for p in prompts])
            started.set()
            if len(batches) == 1:
                release.wait(30)
            return [f"out-{p[0]}" for p in prompts]

    batcher = ExpertBatcher(Gated(), max_batch_size=8, window_ms=20, settle_share=1.0)  # type: ignore[arg-type]
    try:
        def job(tag: int) -> Job:
            return Job(Mixture(("x" if tag % 2 else "y",), (1.0,), "top1"), [tag], 2)

        first = batcher.submit(job(1))
        assert started.wait(30)
        queued = batcher.submit(job(2))
        time.sleep(0.5)  # B's own window has passed long before A's batch ends
        release.set()
        assert first.result(timeout=30) == "out-1"
        time.sleep(0.05)  # a round trip later (the batcher waits 20 ms + 100% of A's 0.5 s batch)
        following = batcher.submit(job(3))  # A's client, answered, asks again
        assert queued.result(timeout=30) == "out-2" and following.result(timeout=30) == "out-3"
        assert batches == [[1], [2, 3]]
    finally:
        batcher.close()


def test_a_failing_batch_answers_every_request_with_the_error():
    class Broken:
        def generate_batch(self, *args, **kwargs):
            raise RuntimeError("boom")

    batcher = ExpertBatcher(Broken(), max_batch_size=4, window_ms=50)  # type: ignore[arg-type]
    try:
        futures = [batcher.submit(Job(Mixture(("a",), (1.0,), "top1"), [1], 2)) for _ in range(3)]
        for future in futures:
            with pytest.raises(RuntimeError, match="boom"):
                future.result(timeout=10)
    finally:
        batcher.close()


# ------------------------------------------------------------------------------------------ the command


def test_byte_sizes_parse():
    from moin_hub.cli.serve import ByteSize

    size = ByteSize()
    assert size.convert("512MB", None, None) == 512_000_000
    assert size.convert("1.5GiB", None, None) == int(1.5 * 2**30)
    assert size.convert("1000", None, None) == 1000
    with pytest.raises(Exception, match="not a size"):
        size.convert("lots", None, None)


@pytest.mark.e2e
def test_moin_hub_serve_runs_as_a_command(hub, topic_registry, tmp_path):
    import subprocess
    import sys
    import time

    from moin_hub import Registry
    from tests.reliability._tools import subprocess_env, wait_until_answers

    port = free_port()
    key = "sk-cli-" + uuid.uuid4().hex
    env = subprocess_env(hub.url, tmp_path / "home", MOIN_API_KEY=key)
    # room by count for all three experts, by bytes for two: the byte cap, not the count, keeps the third out
    adapter_bytes = {r.adapter_bytes for r in Registry.load(topic_registry, endpoint=hub.url)}
    (size,) = adapter_bytes  # the test experts are all alike
    proc = subprocess.Popen([sys.executable, "-m", "moin_hub", "serve", "--registry", topic_registry, "--port",
                             str(port), "--pin", "astronomy", "--cache-size", "3", "--cache-bytes", str(2 * size),
                             "--prefetch", "2", "--mode", "adaptive"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, url, "/health", timeout=120, what="moin-hub serve", poll=0.25)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
        response = client.completions.create(model="moin:auto", prompt=QUERIES["cooking"], max_tokens=3)
        assert response.model_extra["moin"]["mode"] == "adaptive"
        assert response.model_extra["moin"]["experts"][0]["expert_id"] == "cooking"
        auth = {"Authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 60  # --prefetch 2: the route's runner-ups are fetched in the background
        while "moin_prefetches_total 1" not in raw_request(url, "GET", "/metrics", headers=auth)[2].decode():
            assert time.monotonic() < deadline, "no runner-up was prefetched"
            time.sleep(0.2)
        experts = {e["id"]: e for e in json.loads(raw_request(url, "GET", "/v1/experts", headers=auth)[2])["data"]}
        assert experts["astronomy"]["pinned"] and experts["astronomy"]["loaded"]
        # all three were loaded at some point (routed cooking, prefetched football), and --cache-size 3 has room
        # for them, but --cache-bytes holds two: the pinned astronomy and one other (which, depends on timing)
        assert sorted(e for e, info in experts.items() if info["loaded"] and e != "astronomy") in (["cooking"],
                                                                                                ["football"])
        metrics = raw_request(url, "GET", "/metrics", headers=auth)[2].decode()
        assert f"moin_loaded_adapter_bytes {2 * size}" in metrics
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    assert "Pinned astronomy" in output and f"127.0.0.1:{port}/v1" in output
    assert key not in output


@pytest.mark.e2e
def test_the_server_follows_the_registry_and_serves_new_experts(hub, registry_id, make_expert):
    import time

    from moin_hub import push_expert

    push_expert(make_expert("cooking"), registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-cooking",
                endpoint=hub.url)
    engine = ExpertEngine(registry_id, endpoint=hub.url)
    with start_server(engine, ServeConfig(refresh_seconds=0.2)) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()][5:] == ["cooking"]
        push_expert(make_expert("astronomy"), registry=registry_id,
                    repo_id=f"test-org/{registry_id[-8:]}-astronomy", endpoint=hub.url)
        deadline = time.monotonic() + 30
        while "astronomy" not in [m.id for m in client.models.list()]:
            assert time.monotonic() < deadline, "the server never saw the new expert"
            time.sleep(0.1)
        answer = client.completions.create(model="moin:auto", prompt=QUERIES["astronomy"], max_tokens=2)
        assert answer.model_extra["moin"]["experts"][0]["expert_id"] == "astronomy"
        assert answer.model_extra["moin"]["registry_revision"] == engine.registry.revision
        metrics = raw_request(running.url, "GET", "/metrics")[2].decode()
        assert "moin_registry_updates_total 1" in metrics and "moin_registry_experts 2" in metrics
