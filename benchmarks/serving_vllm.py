"""Serving on vLLM: vLLM alone vs `moin-hub serve --backend vllm` in front of it vs moin-hub's own engine.

Stated configuration: the real default base model (SmolLM2-135M-Instruct, fp32 on CPU) and embedder
(all-MiniLM-L6-v2), published to a local Hub in a temporary folder; --experts LoRA experts (r=8 on
q_proj/v_proj, random non-zero weights) pushed into a registry (``_common.publish_registry``). ONE vLLM OpenAI
server (vLLM's own environment: ``$MOIN_VLLM_PYTHON``, else ``.venv-vllm/bin/python``; ``make vllm``) with
``--max-loras --experts``, the experts loaded into it beforehand (the verified pull, under the names the
backend gives them), so that no stream below times a load.

The stream of ``benchmarks/serving.py``: --requests requests x --new-tokens tokens, greedy, --concurrency
``openai`` clients at once; each of three streams: the base model, one expert, --experts experts round robin
(each request's prompt is its expert's topic sentence). Through:

1. vLLM direct: each request names its adapter (``model``), no routing;
2. ``moin-hub serve --backend vllm`` over that vLLM: ``moin:auto``, routed by content (embedding included);
3. ``moin-hub serve`` on its own engine (one base model in this process, PEFT batches): ``moin:auto``.

Targets: routed through moin-hub >= 0.9x vLLM direct on the mixed stream; mixed >= 0.8x single on vLLM. The
own engine vs vLLM ratio is reported. After one warm-up stream per server, vLLM direct and the routed server
take turns: --rounds rounds of base, single and mixed through each (which of the two goes first alternates
between rounds), so both meet the same machine; figures are medians over the rounds, and each round's
routed/direct mixed ratio is printed (one pass on a shared 2-core machine moved that ratio from x0.77 to x0.91).
The own engine runs --rounds rounds after vLLM has stopped. Prints one table; exit code 1 if a target is missed
(or vLLM is missing). ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import TOPICS, exit_code, met, print_table, publish_registry, run_clients, use_fresh_hf_home

ROOT = Path(__file__).resolve().parents[1]
DIRECT, ROUTED, OWN = "vLLM direct", "moin-hub serve --backend vllm", "moin-hub serve (own engine)"


def vllm_python() -> Path | None:
    """vLLM's Python: ``$MOIN_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the repo; None if missing."""
    named = os.environ.get("MOIN_VLLM_PYTHON")
    path = Path(named) if named else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        return json.loads(response.read())


def _post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - loopback only
        response.read()


@contextlib.contextmanager
def vllm_server(python: Path, model_dir: Path, max_loras: int, max_num_seqs: int, log: Path):
    """A vLLM OpenAI server on a free loopback port, runtime LoRA loading on; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--enable-lora",
             "--max-lora-rank", "8", "--max-loras", str(max_loras), "--max-model-len", "512", "--dtype", "float32",
             "--enforce-eager", "--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                with contextlib.suppress(OSError, ValueError):
                    if _get(f"{url}/v1/models")["data"]:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM did not start (exit {proc.poll()}); see {log}")
                time.sleep(1)
            yield url
        finally:  # vLLM runs its engine in child processes: end the process group it was started in
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, choices=range(2, len(TOPICS) + 1),
                        help="Experts the mixed stream cycles through.")
    parser.add_argument("--requests", type=int, default=32, help="Requests per stream.")
    parser.add_argument("--new-tokens", type=int, default=16, help="Tokens generated per request.")
    parser.add_argument("--concurrency", type=int, default=8, help="Clients at once.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Rounds of base/single/mixed streams, vLLM direct and routed taking turns; medians.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    python = vllm_python()
    if python is None:
        print("vLLM's environment is missing: run `make vllm` (or set MOIN_VLLM_PYTHON).")
        return exit_code([False])

    root = Path(tempfile.mkdtemp(prefix="moin-bench-serving-vllm-"))
    use_fresh_hf_home(root)

    import openai

    from moin_hub.hub.assets import default_base_model_dir
    from moin_hub.local_hub.server import LocalHub
    from moin_hub.serving.engine import ExpertEngine
    from moin_hub.serving.server import ServeConfig, start_server
    from moin_hub.serving.vllm_backend import VllmBackend, VllmConfig, lora_name

    hub = LocalHub(root / "hub").start()
    topics = list(TOPICS)[: args.experts]
    prompts = {t: f"{TOPICS[t][0]} Then" for t in topics}
    runs: dict[str, list[dict[str, float]]] = {}  # server -> one {base, single, mixed} tok/s per round
    misrouted: dict[str, int] = {}
    route_ms: dict[str, list[float]] = {}
    try:
        base_repo, _ = publish_registry(hub.url, root, "bench/serving-vllm", {t: TOPICS[t] for t in topics})

        def stream(url: str, models: list[str | None], topics_of: list[str], label: str) -> float:
            """Tokens/s of the stream: request i asks ``models[i % len]`` (None: ``moin:auto``) with the prompt of
            ``topics_of[i % len]``; a routed answer must name that topic's expert."""
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
            tokens = [0] * args.requests
            wrong = [0] * args.requests

            def worker(offset: int) -> None:
                for i in range(offset, args.requests, args.concurrency):
                    topic, model = topics_of[i % len(topics_of)], models[i % len(models)]
                    answer = client.completions.create(model=model or "moin:auto", prompt=prompts[topic],
                                                       max_tokens=args.new_tokens, temperature=0)
                    tokens[i] = answer.usage.completion_tokens
                    moin = (answer.model_extra or {}).get("moin")
                    if model is None and moin:
                        wrong[i] = int([e["expert_id"] for e in moin["experts"]] != [topic])
                        route_ms.setdefault(label.split(":")[0], []).append(moin["route_ms"])

            seconds = run_clients(worker, args.concurrency)
            misrouted[label] = misrouted.get(label, 0) + sum(wrong)
            return sum(tokens) / seconds

        def three_streams(url: str, name: str, direct: dict[str, str] | None, base: str) -> None:
            """One round of base / single / mixed streams through one server (``direct``: adapter names, else
            routed), appended to ``runs[name]``."""
            single, mixed = topics[:1], topics
            adapters = (lambda ts: [direct[t] for t in ts]) if direct is not None else (lambda ts: [None])
            runs.setdefault(name, []).append({"base": stream(url, [base], single, f"{name}: base"),
                                              "single": stream(url, adapters(single), single, f"{name}: single"),
                                              "mixed": stream(url, adapters(mixed), mixed, f"{name}: mixed")})

        def warm_up(url: str, name: str, direct: dict[str, str] | None) -> None:
            stream(url, [direct[topics[0]]] if direct is not None else [None], topics[:1], f"{name}: warm-up")

        with vllm_server(python, default_base_model_dir(), args.experts, 2 * args.concurrency,
                         root / "vllm.log") as vllm_url:
            engine = ExpertEngine("bench/serving-vllm", endpoint=hub.url)
            names = {t: lora_name(engine.registry.get(t)) for t in topics}
            for topic in topics:  # loaded beforehand, under the backend's names: no stream times a load
                _post(f"{vllm_url}/v1/load_lora_adapter", {"lora_name": names[topic],
                                                           "lora_path": str(engine.download(engine.registry.get(topic)))})
            vllm_base = _get(f"{vllm_url}/v1/models")["data"][0]["id"]
            backend = VllmBackend(engine, VllmConfig(upstreams=(vllm_url,), max_loras=args.experts))
            config = ServeConfig(refresh_seconds=0, max_batch_size=args.concurrency, max_tokens_limit=256)
            with start_server(engine, config, backend=backend) as server:
                servers = [(vllm_url, DIRECT, names, vllm_base), (server.url, ROUTED, None, "moin:base")]
                for url, name, direct, _ in servers:
                    warm_up(url, name, direct)
                for round_ in range(args.rounds):  # the two take turns going first
                    for url, name, direct, base in servers[:: 1 if round_ % 2 == 0 else -1]:
                        three_streams(url, name, direct, base)
                loads = backend.stats.snapshot()["loads"]

        own = ExpertEngine("bench/serving-vllm", endpoint=hub.url, cache_size=args.experts)
        own.warm_up()
        for topic in topics:
            own.activate(topic)
        config = ServeConfig(refresh_seconds=0, max_batch_size=args.concurrency, batch_window_ms=10,
                             max_tokens_limit=256)
        with start_server(own, config) as server:
            warm_up(server.url, OWN, None)
            for _ in range(args.rounds):
                three_streams(server.url, OWN, None, "moin:base")
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)

    tok_s = {name: {kind: statistics.median(r[kind] for r in rounds) for kind in ("base", "single", "mixed")}
             for name, rounds in runs.items()}
    direct, routed, own_engine = (tok_s[k] for k in (DIRECT, ROUTED, OWN))
    per_round = [r["mixed"] / d["mixed"] for r, d in zip(runs[ROUTED], runs[DIRECT], strict=True)]
    routed_ratio = routed["mixed"] / direct["mixed"]
    vllm_mixed_ratio = direct["mixed"] / direct["single"]
    targets = {"routed": routed_ratio >= 0.9, "vllm_mixed": vllm_mixed_ratio >= 0.8, "no_loads": loads == 0}
    rows = [("configuration", f"{base_repo.split('/')[-1]} fp32 CPU, {args.experts} experts LoRA r=8 q,v, one "
                              f"vLLM-CPU server (--max-loras {args.experts}), local Hub"),
            ("stream", f"{args.requests} requests x {args.new_tokens} new tokens, greedy, {args.concurrency} "
                       f"openai clients at once; medians of {args.rounds} rounds")]
    for name, figures in tok_s.items():
        rows.append((f"{name}: base / single / {args.experts} experts round robin",
                     f"{figures['base']:.1f} / {figures['single']:.1f} / {figures['mixed']:.1f} tok/s  "
                     f"(mixed/single x{figures['mixed'] / figures['single']:.2f})"))
    rows += [
        ("vLLM direct, mixed / single", f"x{vllm_mixed_ratio:.2f}  (target >= 0.8: {met(targets['vllm_mixed'])})"),
        ("routed through moin-hub / vLLM direct, mixed", f"x{routed_ratio:.2f}  (target >= 0.9: "
                                                          f"{met(targets['routed'])})"),
        ("  the same, each round", "; ".join(f"x{r:.2f}" for r in per_round)),
        ("routed through moin-hub / vLLM direct, single / base",
         f"x{routed['single'] / direct['single']:.2f} / x{routed['base'] / direct['base']:.2f}"),
        ("own engine / vLLM direct, mixed / single / base",
         f"x{own_engine['mixed'] / direct['mixed']:.2f} / x{own_engine['single'] / direct['single']:.2f} / "
         f"x{own_engine['base'] / direct['base']:.2f}  (reported)"),
        ("adapter loads during the routed streams", f"{loads}  (all adopted from vLLM; target 0: "
                                                    f"{met(targets['no_loads'])})"),
        ("misrouted requests (routed streams)", str(sum(n for k, n in misrouted.items() if "direct" not in k))),
        *((f"{name}: route latency, median", f"{statistics.median(ms):.1f} ms  (embedding the prompt included; "
                                              f"{len(ms)} requests)") for name, ms in route_ms.items()),
    ]
    print_table("serving on vLLM", rows)
    if args.json:
        args.json.write_text(json.dumps({"tok_s": tok_s, "rounds": runs, "routed_vs_direct_mixed": routed_ratio,
                                         "routed_vs_direct_mixed_per_round": per_round,
                                         "vllm_mixed_vs_single": vllm_mixed_ratio, "loads": loads,
                                         "misrouted": misrouted, "route_ms": route_ms}, indent=2))
    return exit_code(targets.values())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
