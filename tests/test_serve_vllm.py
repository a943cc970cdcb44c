"""`moin-hub serve --backend vllm` against fake vLLM upstreams (``tests/_fake_vllm.py``): routing, one load
per adapter, affinity over several upstreams, LRU unloads within capacity, streams, and upstream failures as
OpenAI errors. The real-vLLM end-to-end tests are in ``test_serve_vllm_e2e.py``.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from click.testing import CliRunner

from moin_hub.serving.engine import ExpertEngine
from moin_hub.serving.server import ServeConfig, start_server
from moin_hub.serving.vllm_backend import (
    VLLM_DEFAULT_MAX_LORAS,
    VllmBackend,
    VllmConfig,
    lora_name,
    normalize_upstream_url,
    pick_upstream,
)
from tests._fake_vllm import BASE, FakeVllm, RunningApp
from tests._helpers import QUERIES, free_port
from tests.reliability._tools import raw_request

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


@pytest.fixture
def fakes():
    """Two fake upstreams, started; stopped after the test."""
    states = [FakeVllm(), FakeVllm()]
    running = [RunningApp(s.app()) for s in states]
    try:
        yield list(zip(states, running, strict=True))
    finally:
        for app in running:
            app.stop()


def _serve(hub, registry_id, urls, *, max_loras=4, timeout=30.0, vllm=None, **config):
    engine = ExpertEngine(registry_id, endpoint=hub.url)
    backend = VllmBackend(engine, VllmConfig(upstreams=tuple(urls), max_loras=max_loras, timeout=timeout,
                                             **(vllm or {})))
    return start_server(engine, ServeConfig(refresh_seconds=0, **config), backend=backend), backend


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=60)


def _name(engine, expert):
    return lora_name(engine.registry.get(expert))


# ------------------------------------------------------------------------------------------ pure parts


def test_config_checks_itself():
    config = VllmConfig(upstreams="http://127.0.0.1:8001/v1/, https://gpu:9000", max_loras=4)
    assert config.upstreams == ("http://127.0.0.1:8001", "https://gpu:9000")
    assert "api_key" not in repr(VllmConfig(upstreams=("http://a:1",), api_key="secret"))
    assert VllmConfig(upstreams=("http://a:1",)).max_loras == VLLM_DEFAULT_MAX_LORAS == 1  # vLLM's default
    with pytest.raises(ValueError, match="at least one"):
        VllmConfig(upstreams=())
    with pytest.raises(ValueError, match="each URL once"):
        VllmConfig(upstreams=("http://a:1", "http://a:1/v1"))
    with pytest.raises(ValueError, match="max_loras"):
        VllmConfig(upstreams=("http://a:1",), max_loras=0)
    with pytest.raises(ValueError, match="timeout"):
        VllmConfig(upstreams=("http://a:1",), timeout=float("nan"))
    with pytest.raises(ValueError, match="max_lora_rank"):
        VllmConfig(upstreams=("http://a:1",), max_lora_rank=0)
    assert VllmConfig(upstreams=("http://a:1",), mixture_dir="rel/dir").mixture_folder().is_absolute()
    for bad in ("localhost:8000", "ftp://a", "http://a:1/?x=1", "http://a:99999"):
        with pytest.raises(ValueError, match="upstream"):
            normalize_upstream_url(bad)


def test_the_cli_defaults_are_the_backends():
    from moin_hub.cli import serve
    from moin_hub.serving.upstreams import VLLM_DEFAULT_MAX_LORA_RANK

    assert serve.VLLM_DEFAULT_MAX_LORAS == VLLM_DEFAULT_MAX_LORAS
    assert serve.VLLM_DEFAULT_MAX_LORA_RANK == VLLM_DEFAULT_MAX_LORA_RANK == 16  # vLLM's default


def test_pick_upstream_prefers_a_holder_then_the_least_loaded():
    assert pick_upstream([9, 0, 0], [1, 1, 1], holders={0}, with_room={1, 2}) == 0  # affinity beats load
    assert pick_upstream([4, 2, 3], [1, 1, 1], holders={0, 2}, with_room={1}) == 2  # least loaded holder
    assert pick_upstream([1, 0, 0], [0, 3, 2], holders=(), with_room={0, 1, 2}) == 2  # then fewer adapters
    assert pick_upstream([0, 0], [0, 0], holders=(), with_room={1}) == 1  # only one has room
    assert pick_upstream([0, 0], [2, 2], holders=(), with_room=()) is None  # wait for room
    # all else equal: the upstream whose adapter to unload was used longest ago
    assert pick_upstream([0, 0], [1, 1], holders=(), with_room={0, 1}, idle_since=[5.0, 3.0]) == 1


# ------------------------------------------------------------------------------------------ the server


@pytest.mark.e2e
def test_requests_are_routed_loaded_once_and_forwarded(hub, topic_registry, fakes):
    (fake, up), = fakes[:1]
    server, backend = _serve(hub, topic_registry, [up.url])
    with server:
        client = _client(server)
        first = client.completions.create(model="moin:auto", prompt=QUERIES["cooking"], max_tokens=8, temperature=0)
        name = _name(backend.engine, "cooking")
        moin = first.model_extra["moin"]
        assert [e["expert_id"] for e in moin["experts"]] == ["cooking"] and moin["mode"] == "top1"
        assert moin["upstream"] == up.url and moin["registry"] == topic_registry
        assert first.model == "moin:auto" and first.choices[0].text.startswith(f"<{name}>")
        assert first.choices[0].model_extra["moin"] == moin and first.usage.completion_tokens == 8
        again = client.completions.create(model="cooking", prompt="Another prompt", max_tokens=4)
        assert again.choices[0].text.startswith(f"<{name}>")
        assert fake.loads == [name]  # loaded once, for both requests
        assert fake.requests[-1]["temperature"] == 1.0 and fake.requests[-1]["max_tokens"] == 4  # as checked here

        base = client.completions.create(model="moin:base", prompt="Plain words", max_tokens=3)
        assert base.choices[0].text.startswith(f"<{BASE}>") and base.model_extra["moin"]["experts"] == []
        chat = client.chat.completions.create(model="moin:auto", max_tokens=5, temperature=0,
                                              messages=[{"role": "user", "content": QUERIES["astronomy"]}])
        assert chat.choices[0].message.content.startswith(f"<{_name(backend.engine, 'astronomy')}>")
        assert chat.model_extra["moin"]["experts"][0]["expert_id"] == "astronomy"

        two = client.completions.create(model="moin:auto", prompt=[QUERIES["football"], QUERIES["cooking"]],
                                        max_tokens=3)
        assert [c.index for c in two.choices] == [0, 1]
        assert [c.model_extra["moin"]["experts"][0]["expert_id"] for c in two.choices] == ["football", "cooking"]
        assert two.usage.completion_tokens == 6

        experts = json.loads(raw_request(server.url, "GET", "/v1/experts")[2])
        by_id = {e["id"]: e for e in experts["data"]}
        assert experts["backend"] == "vllm" and by_id["cooking"]["upstreams"] == [up.url]
        assert by_id["cooking"]["loaded"] and by_id["cooking"]["adapter"] == name
        health = json.loads(raw_request(server.url, "GET", "/health")[2])
        assert health["status"] == "ok" and health["upstreams"][0]["model"] == BASE and health["loaded"] == 3
        metrics = raw_request(server.url, "GET", "/metrics")[2].decode()
        assert f'moin_upstream_adapter_loads_total{{upstream="{up.url}"}} 3' in metrics
        assert "moin_cache_hits_total 2" in metrics and "moin_adapter_loads_total 3" in metrics


@pytest.mark.e2e
def test_affinity_over_two_upstreams_and_lru_unloads_within_capacity(hub, topic_registry, fakes):
    (fake_a, up_a), (fake_b, up_b) = fakes
    server, backend = _serve(hub, topic_registry, [up_a.url, up_b.url], max_loras=1)
    with server:
        client = _client(server)

        def where(model: str) -> str:
            return client.completions.create(model=model, prompt="Some words", max_tokens=2).model_extra[
                "moin"]["upstream"]

        assert where("cooking") == up_a.url
        assert where("football") == up_b.url  # both idle: the one with fewer adapters
        assert where("cooking") == up_a.url and where("football") == up_b.url  # affinity
        assert where("moin:base") in (up_a.url, up_b.url)
        assert fake_a.loads == [_name(backend.engine, "cooking")]
        assert fake_b.loads == [_name(backend.engine, "football")]
        # a third expert: every upstream is full (1 adapter each), so the least recently used idle one goes
        assert where("astronomy") == up_a.url
        assert fake_a.unloads == [_name(backend.engine, "cooking")]
        assert where("cooking") == up_b.url  # cooking now goes where there is room by unloading football
        assert fake_b.unloads == [_name(backend.engine, "football")]
        assert fake_a.most_loaded == fake_b.most_loaded == 1  # never over capacity
        experts = {e["id"]: e for e in json.loads(raw_request(server.url, "GET", "/v1/experts")[2])["data"]}
        assert experts["astronomy"]["upstreams"] == [up_a.url] and experts["cooking"]["upstreams"] == [up_b.url]
        assert not experts["football"]["loaded"]


@pytest.mark.e2e
def test_a_full_upstream_makes_a_new_expert_wait_for_room_and_never_overflows(hub, topic_registry, fakes):
    (fake, up), = fakes[:1]
    fake.generate_delay = 1.0
    server, backend = _serve(hub, topic_registry, [up.url], max_loras=1, timeout=20.0)
    with server:
        client = _client(server)
        first = threading.Thread(target=lambda: client.completions.create(model="cooking", prompt="a", max_tokens=2))
        first.start()
        while not fake.requests:  # cooking is loaded and its request runs (for a second)
            time.sleep(0.01)
        answer = client.completions.create(model="football", prompt="b", max_tokens=2)  # no room while it runs
        first.join(timeout=30)
        assert answer.choices[0].text.startswith(f"<{_name(backend.engine, 'football')}>")
        assert fake.loads == [_name(backend.engine, "cooking"), _name(backend.engine, "football")]
        assert fake.unloads == [_name(backend.engine, "cooking")]
        assert fake.busy_unloads == [] and fake.most_loaded == 1  # unloaded once its request had ended


@pytest.mark.e2e
def test_concurrent_requests_for_one_expert_load_it_once(hub, topic_registry, fakes):
    (fake, up), = fakes[:1]
    fake.load_delay = 0.5  # the load is slow: every request arrives while it runs
    server, backend = _serve(hub, topic_registry, [up.url])
    with server:
        client = _client(server)
        texts: list[str] = []
        threads = [threading.Thread(target=lambda: texts.append(client.completions.create(
            model="football", prompt="Concurrent", max_tokens=2).choices[0].text)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(texts) == 6 and all(t.startswith(f"<{_name(backend.engine, 'football')}>") for t in texts)
        assert fake.loads == [_name(backend.engine, "football")]
        assert backend.stats.snapshot()["loads"] == 1


@pytest.mark.e2e
def test_streams_pass_through_with_the_moin_object(hub, topic_registry, fakes):
    (_, up), = fakes[:1]
    server, backend = _serve(hub, topic_registry, [up.url])
    with server:
        client = _client(server)
        whole = client.completions.create(model="moin:auto", prompt=QUERIES["football"], max_tokens=6)
        chunks = list(client.completions.create(model="moin:auto", prompt=QUERIES["football"], max_tokens=6,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert chunks[0].model_extra["moin"]["experts"][0]["expert_id"] == "football"
        assert all(c.model == "moin:auto" for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
        assert all(c.usage is None for c in chunks)  # the usage chunk moin-hub asked for is not passed on
        with_usage = list(client.completions.create(model="football", prompt="a b c", max_tokens=4, stream=True,
                                                    stream_options={"include_usage": True}))
        assert with_usage[-1].usage.completion_tokens == 4

        messages = [{"role": "user", "content": QUERIES["cooking"]}]
        chat = list(client.chat.completions.create(model="moin:auto", messages=messages, max_tokens=5, stream=True))
        assert chat[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chat).startswith(
            f"<{_name(backend.engine, 'cooking')}>")
        stats = backend.stats.snapshot()
        assert stats["generated_tokens"] == 6 + 6 + 4 + 5  # streams counted from the usage chunk
        assert all(u.in_flight == 0 for u in backend.upstreams)  # every lease was given back


@pytest.mark.e2e
def test_a_client_that_leaves_a_stream_ends_the_upstream_request(hub, topic_registry, fakes):
    (fake, up), = fakes[:1]
    fake.chunk_delay = 0.2
    server, backend = _serve(hub, topic_registry, [up.url])
    with server:
        stream = _client(server).completions.create(model="cooking", prompt=" ".join(["word"] * 40),
                                                    max_tokens=40, stream=True)
        next(iter(stream))
        stream.close()  # after one chunk of a stream that would take ~8 s
        deadline = time.monotonic() + 5
        while fake.streams_cut == 0 or backend.upstreams[0].in_flight:
            assert time.monotonic() < deadline, (fake.streams_cut, backend.upstreams[0].in_flight)
            time.sleep(0.05)
        assert backend.upstreams[0].adapters[_name(backend.engine, "cooking")].in_use == 0


@pytest.mark.e2e
def test_upstream_failures_are_openai_errors(hub, topic_registry, fakes):
    (fake, up), = fakes[:1]
    server, backend = _serve(hub, topic_registry, [up.url], timeout=1.0)
    with server:
        client = _client(server)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-expert", prompt="hi", max_tokens=2)

        fake.fail_status, fake.fail_message = 400, "This model's maximum context length is 512 tokens."
        with pytest.raises(openai.BadRequestError, match="maximum context length") as err:
            client.completions.create(model="cooking", prompt="hi", max_tokens=2)
        assert err.value.body["code"] == "upstream_rejected"
        fake.fail_status, fake.fail_message = 500, "EngineCore died"
        with pytest.raises(openai.InternalServerError, match="EngineCore died") as err:
            client.completions.create(model="cooking", prompt="hi", max_tokens=2, stream=True)
        assert err.value.status_code == 502 and err.value.body["code"] == "upstream_error"
        fake.fail_status = None

        fake.generate_delay = 3.0
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="cooking", prompt="hi", max_tokens=2)
        assert err.value.status_code == 504 and err.value.body["code"] == "upstream_timeout"
        fake.generate_delay = 0.0

        fake.refuse_loads = True
        with pytest.raises(openai.InternalServerError, match="refused to load adapter") as err:
            client.completions.create(model="football", prompt="hi", max_tokens=2)
        assert err.value.status_code == 502
        fake.refuse_loads = False
        assert _name(backend.engine, "football") not in backend.upstreams[0].adapters  # tried again next time
        assert client.completions.create(model="football", prompt="hi", max_tokens=2).choices[0].text

        up.stop()  # the upstream goes away
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="cooking", prompt="hi", max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "upstream_unavailable"
        assert "Traceback" not in json.dumps(err.value.body)
        health = json.loads(raw_request(server.url, "GET", "/health")[2])
        assert health["status"] == "degraded" and health["upstreams"][0]["reachable"] is False
        assert all(u.in_flight == 0 for u in backend.upstreams)


@pytest.mark.e2e
def test_a_mixture_is_merged_once_and_served_as_its_own_adapter(hub, topic_registry, fakes, tmp_path):
    (fake, up), = fakes[:1]
    mixtures = tmp_path / "mixtures"
    # temperature 1: the three experts get weights of the same order, so all three are merged (ranks 3 x 4)
    server, backend = _serve(hub, topic_registry, [up.url], temperature=1.0, vllm={"mixture_dir": str(mixtures)})
    with server:
        client = _client(server)
        first = client.completions.create(model="moin:topk", prompt=QUERIES["football"], max_tokens=3)
        moin = first.model_extra["moin"]
        assert moin["mode"] == "topk" and len(moin["experts"]) == 3
        (merged,) = fake.loads
        assert merged.startswith("moin-mix-") and first.choices[0].text.startswith(f"<{merged}>")
        assert fake.loras[merged] == str(mixtures / merged)  # the merged folder, where vLLM reads it
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (mixtures / merged).iterdir()}
        again = client.completions.create(model="moin:topk", prompt=QUERIES["football"], max_tokens=3)
        assert again.choices[0].text == first.choices[0].text and fake.loads == [merged]  # merged and loaded once
    server, _ = _serve(hub, topic_registry, [up.url], temperature=1.0,
                       vllm={"mixture_dir": str(mixtures), "max_lora_rank": 8})
    with server, pytest.raises(openai.BadRequestError, match="rank 12") as err:
        _client(server).completions.create(model="moin:topk", prompt=QUERIES["cooking"], max_tokens=3)
    assert err.value.body["code"] == "mixture_rank_too_large"


@pytest.mark.e2e
def test_an_upstream_that_is_not_up_yet_is_asked_again(hub, topic_registry):
    port = free_port()
    server, backend = _serve(hub, topic_registry, [f"http://127.0.0.1:{port}"])
    with server:  # starts anyway (a warning in the log): vLLM may come up after moin-hub
        client = _client(server)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="cooking", prompt="hi", max_tokens=2)
        assert err.value.status_code == 503 and "cannot be reached" in err.value.message
        assert json.loads(raw_request(server.url, "GET", "/health")[2])["status"] == "degraded"
        fake = FakeVllm()
        with RunningApp(fake.app(), port=port):
            time.sleep(2.1)  # an upstream that failed is asked again after RETRY_SECONDS
            answer = client.completions.create(model="cooking", prompt="hi", max_tokens=2)
        assert answer.choices[0].text.startswith(f"<{_name(backend.engine, 'cooking')}>")
        assert fake.loads == [_name(backend.engine, "cooking")]


@pytest.mark.e2e
def test_an_upstream_that_lost_its_adapters_gets_them_again(hub, topic_registry, fakes):
    (fake, up), = fakes[:1]
    server, backend = _serve(hub, topic_registry, [up.url])
    with server:
        client = _client(server)
        client.completions.create(model="cooking", prompt="hi", max_tokens=2)
        fake.loras.clear()  # as after a restart of vLLM
        answer = client.completions.create(model="cooking", prompt="hi", max_tokens=2)
        assert answer.choices[0].text.startswith(f"<{_name(backend.engine, 'cooking')}>")
        assert fake.loads == [_name(backend.engine, "cooking")] * 2


@pytest.mark.e2e
def test_adapters_already_on_an_upstream_are_adopted(hub, topic_registry, fakes, tmp_path):
    (fake, up), = fakes[:1]
    engine = ExpertEngine(topic_registry, endpoint=hub.url)
    name = _name(engine, "cooking")
    fake.loras.update({name: "/somewhere", "someone-elses-lora": "/elsewhere"})
    backend = VllmBackend(engine, VllmConfig(upstreams=(up.url,), max_loras=2))
    with start_server(engine, ServeConfig(refresh_seconds=0), backend=backend) as server:
        client = _client(server)
        assert client.completions.create(model="cooking", prompt="hi", max_tokens=2).choices[0].text.startswith(
            f"<{name}>")
        assert fake.loads == []  # it was there already
        client.completions.create(model="football", prompt="hi", max_tokens=2)
        # capacity 2, and the foreign adapter is never unloaded: cooking (least recently used of ours) goes
        assert fake.unloads == [name] and "someone-elses-lora" in fake.loras


# ------------------------------------------------------------------------------------------ the command


def test_the_command_refuses_options_its_backend_ignores():
    from moin_hub.cli import cli

    runner = CliRunner()
    cases = {
        ("--backend", "vllm"): "needs --upstream",
        ("--backend", "vllm", "--upstream", "http://a:1", "--cache-size", "3", "--pin", "x"): "--cache-size, --pin",
        ("--upstream", "http://a:1", "--mixture-dir", "/tmp/m"): "--upstream, --mixture-dir: only for --backend vllm",
    }
    for args, message in cases.items():
        result = runner.invoke(cli, ["serve", "--registry", "org/reg", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    # an environment variable of the other backend is no error (it reaches the registry lookup, which fails)
    result = runner.invoke(cli, ["serve", "--registry", "org/reg", "--endpoint", "http://127.0.0.1:9"],
                           env={"MOIN_UPSTREAM_API_KEY": "sk-x", "MOIN_HUB_ATTEMPTS": "1"})
    assert result.exit_code != 2 and "only for --backend vllm" not in result.output


@pytest.mark.e2e
def test_moin_hub_serve_backend_vllm_runs_as_a_command(hub, topic_registry, fakes, tmp_path):
    import subprocess
    import sys

    from tests.reliability._tools import subprocess_env, wait_until_answers

    (fake_a, up_a), (fake_b, up_b) = fakes
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moin_hub", "serve", "--registry", topic_registry, "--port",
                             str(port), "--backend", "vllm", "--upstream", f"{up_a.url},{up_b.url}/v1",
                             "--upstream-max-loras", "2"],
                            env=subprocess_env(hub.url, tmp_path / "home"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, url, "/health", timeout=120, what="moin-hub serve --backend vllm", poll=0.25)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60)
        answer = client.completions.create(model="moin:auto", prompt=QUERIES["astronomy"], max_tokens=3)
        assert answer.model_extra["moin"]["experts"][0]["expert_id"] == "astronomy"
        assert len(fake_a.loads) + len(fake_b.loads) == 1
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    assert "Forwarding to vLLM at" in output and "at most 2 adapter(s) each" in output


@pytest.mark.e2e
def test_a_tampered_expert_is_refused_before_the_upstream_sees_it(hub, registry_id, make_expert, fakes):
    import dataclasses

    from moin_hub import Registry, push_expert
    from moin_hub.hub.registry import update_registry, upsert_expert

    (fake, up), = fakes[:1]
    push_expert(make_expert("cooking"), registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-cooking",
                endpoint=hub.url)
    row = Registry.load(registry_id, endpoint=hub.url).get("cooking")  # the registry now records another sha256
    files = tuple(dataclasses.replace(f, sha256="0" * 64) if f.path == "adapter_model.safetensors" else f
                  for f in row.files)
    update_registry(registry_id, upsert_expert(dataclasses.replace(row, files=files)), endpoint=hub.url,
                    commit_message="tamper")
    server, _ = _serve(hub, registry_id, [up.url])
    with server:
        with pytest.raises(openai.InternalServerError, match="Hash mismatch") as err:
            _client(server).completions.create(model="moin:auto", prompt=QUERIES["cooking"], max_tokens=2)
        assert err.value.status_code == 502 and err.value.body["code"] == "expert_refused"
    assert fake.loads == [] and fake.requests == []  # vLLM was never asked to load or run it
