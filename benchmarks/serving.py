"""Serving many experts on one base model: mixed vs single-expert streams, warm switch vs cold load vs reload.

Stated configuration: the real default base model (SmolLM2-135M-Instruct, fp32 on CPU) and embedder
(all-MiniLM-L6-v2), published to a local Hub in a temporary folder; --experts + 4 LoRA experts (r=8 on
q_proj/v_proj, random non-zero weights) pushed into a registry. All through moin_hub's serving engine
(`moin_hub.serving.engine.ExpertEngine`: one base model, an LRU of adapters) and `moin-hub serve`'s HTTP app.

Measured in one run, and compared as ratios:

1. Throughput of a stream of requests (greedy, --new-tokens each) over --experts cached experts, round robin,
   vs the same stream all on one expert: (a) one request at a time through the engine; (b) batches of
   --concurrency requests through the engine (the cost of a mixed forward batch, gathered per-row LoRA, apart
   from how requests fall into batches); (c) --concurrency clients at once through the HTTP server with the
   real `openai` client, where the batcher puts requests for different experts into one forward batch; the
   mean batch size of each stream is printed. (b) and (c) run --rounds times, single and mixed taking turns;
   the figures are medians. Target: mixed >= 0.8x single for (a) and (c).
2. Switching: a warm switch (``set_adapter`` to a cached expert) vs a cold load (download at the pinned
   commit + sha256 verification + ``load_adapter``, fresh HF cache) vs reloading base + adapter per request
   (base model from the local disk cache + ``PeftModel.from_pretrained``: what a server without an
   adapter cache does). Targets: warm >= 20x faster than cold, >= 10x faster than reload.

Prints one table; exit code 1 if a target is missed. ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    TOPICS,
    check_switching,
    exit_code,
    met,
    print_table,
    publish_registry,
    run_clients,
    use_fresh_hf_home,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, choices=range(2, len(TOPICS) - 3),
                        help="Cached experts the mixed stream cycles through (4 more are pushed for cold loads).")
    parser.add_argument("--requests", type=int, default=32, help="Requests per stream.")
    parser.add_argument("--new-tokens", type=int, default=16, help="Tokens generated per request.")
    parser.add_argument("--concurrency", type=int, default=8, help="Clients at once in the HTTP streams.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Rounds of the batched and HTTP streams (single and mixed take turns); medians reported.")
    parser.add_argument("--switches", type=int, default=200, help="Warm switches timed.")
    parser.add_argument("--reloads", type=int, default=3, help="Base + adapter reloads timed.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="moin-bench-serving-"))
    use_fresh_hf_home(root)

    import torch

    from moin_hub.hub.mixing import Mixture
    from moin_hub.local_hub.server import LocalHub
    from moin_hub.serving.engine import ExpertEngine
    from moin_hub.serving.server import ServeConfig, start_server

    hub = LocalHub(root / "hub").start()
    topics = list(TOPICS)[: args.experts + 4]
    cached, cold = topics[: args.experts], topics[args.experts:]
    prompts = [f"{TOPICS[t][0]} Then" for t in cached]
    results: dict[str, object] = {}
    try:
        base_repo, _ = publish_registry(hub.url, root, "bench/serving", {t: TOPICS[t] for t in topics})
        engine = ExpertEngine("bench/serving", endpoint=hub.url, cache_size=args.experts + len(cold))
        t0 = time.perf_counter()
        engine.warm_up()
        results["warm_up_s"] = time.perf_counter() - t0
        for topic in cached:
            engine.activate(topic)

        # -- 1a. one request at a time through the engine
        def engine_stream(experts: list[str]) -> float:
            tokens = 0
            start = time.perf_counter()
            for i in range(args.requests):
                ids = engine.encode(prompts[i % len(prompts)])
                out = engine.generate_batch([ids], Mixture((experts[i % len(experts)],), (1.0,), "top1"),
                                            max_new_tokens=[args.new_tokens])
                tokens += len(out[0].token_ids)
            return tokens / (time.perf_counter() - start)

        engine_stream(cached[:1])  # warm the kernels
        single_seq = statistics.median(engine_stream(cached[:1]) for _ in range(2))
        mixed_seq = statistics.median(engine_stream(cached) for _ in range(2))

        # -- 1b. batches of --concurrency requests through the engine
        def engine_batches(experts: list[str]) -> float:
            tokens = 0
            start = time.perf_counter()
            for first in range(0, args.requests, args.concurrency):
                rows = range(first, min(first + args.concurrency, args.requests))
                out = engine.generate_batch([engine.encode(prompts[i % len(prompts)]) for i in rows],
                                            [Mixture((experts[i % len(experts)],), (1.0,), "top1") for i in rows],
                                            max_new_tokens=[args.new_tokens] * len(rows))
                tokens += sum(len(o.token_ids) for o in out)
            return tokens / (time.perf_counter() - start)

        engine_batches(cached)  # warm the gathered per-row path
        batched: dict[str, list[float]] = {"single": [], "mixed": []}
        for _ in range(args.rounds):
            batched["single"].append(engine_batches(cached[:1]))
            batched["mixed"].append(engine_batches(cached))
        single_batched, mixed_batched = (statistics.median(batched[k]) for k in ("single", "mixed"))

        # -- 1c. concurrent clients through the HTTP server (openai client)
        import openai

        config = ServeConfig(max_batch_size=args.concurrency, batch_window_ms=10, max_tokens_limit=256)
        with start_server(engine, config) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=600)

            def http_stream(experts: list[str]) -> tuple[float, float]:
                tokens = [0] * args.requests
                before = engine.stats.snapshot()

                def worker(offset: int) -> None:
                    for i in range(offset, args.requests, args.concurrency):
                        response = client.completions.create(model=experts[i % len(experts)],
                                                             prompt=prompts[i % len(prompts)],
                                                             max_tokens=args.new_tokens, temperature=0)
                        tokens[i] = response.usage.completion_tokens

                seconds = run_clients(worker, args.concurrency)
                after = engine.stats.snapshot()
                mean_batch = (after["batched_requests"] - before["batched_requests"]) / max(
                    1, after["batches"] - before["batches"])
                return sum(tokens) / seconds, mean_batch

            http_stream(cached[:1])  # warm both paths (one active adapter; gathered per-row LoRA)
            http_stream(cached)
            http: dict[str, list[tuple[float, float]]] = {"single": [], "mixed": []}
            for _ in range(args.rounds):
                http["single"].append(http_stream(cached[:1]))
                http["mixed"].append(http_stream(cached))
        single_http, mixed_http = (statistics.median(t for t, _ in http[k]) for k in ("single", "mixed"))
        single_batch, mixed_batch = (statistics.median(b for _, b in http[k]) for k in ("single", "mixed"))
        http_ratios = [m[0] / s[0] for s, m in zip(http["single"], http["mixed"], strict=True)]

        # -- 2. switching
        a, b = cached[0], cached[1]
        warm = []
        for i in range(args.switches):
            _, loaded, seconds = engine.activate(a if i % 2 else b)
            assert not loaded
            warm.append(seconds)
        cold_loads = []
        for topic in cold:
            _, loaded, seconds = engine.activate(topic)
            assert loaded, topic
            cold_loads.append(seconds)
        check_switching(engine, a, b, prompts[0])

        from peft import PeftModel

        from moin_hub.hub.loading import load_base_model
        from moin_hub.hub.pull import download_expert

        record = engine.registry.get(a)
        folder = download_expert(record, endpoint=hub.url)  # already in the HF cache: no download timed
        reloads = []
        for _ in range(args.reloads):
            start = time.perf_counter()
            base, _ = load_base_model(engine.base_model, endpoint=hub.url)
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
            model.eval()
            reloads.append(time.perf_counter() - start)
            del model, base
        adapter_mb = record.adapter_bytes / 1e6
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)

    warm_ms = statistics.median(warm) * 1000
    cold_ms = statistics.median(cold_loads) * 1000
    reload_ms = statistics.median(reloads) * 1000
    seq_ratio, batched_ratio, http_ratio = mixed_seq / single_seq, mixed_batched / single_batched, mixed_http / single_http
    cold_ratio, reload_ratio = cold_ms / warm_ms, reload_ms / warm_ms
    targets = {"mixed_engine": seq_ratio >= 0.8, "mixed_http": http_ratio >= 0.8, "cold": cold_ratio >= 20,
               "reload": reload_ratio >= 10}

    rows = [
        ("configuration", f"{base_repo.split('/')[-1]} fp32 CPU ({torch.get_num_threads()} threads), "
                          f"{args.experts} cached experts LoRA r=8 q,v ({adapter_mb:.2f} MB each), local Hub"),
        ("stream", f"{args.requests} requests x {args.new_tokens} new tokens, greedy"),
        ("engine, one at a time: single expert", f"{single_seq:.1f} tok/s"),
        (f"engine, one at a time: {args.experts} experts round robin",
         f"{mixed_seq:.1f} tok/s  (x{seq_ratio:.2f}; target >= 0.8: {met(targets['mixed_engine'])})"),
        (f"engine, batches of {args.concurrency}: single expert", f"{single_batched:.1f} tok/s  "
                                                                   f"(median of {args.rounds})"),
        (f"engine, batches of {args.concurrency}: {args.experts} experts round robin",
         f"{mixed_batched:.1f} tok/s  (x{batched_ratio:.2f})"),
        (f"HTTP, {args.concurrency} clients: single expert", f"{single_http:.1f} tok/s  "
                                                             f"(mean batch {single_batch:.1f}; median of {args.rounds})"),
        (f"HTTP, {args.concurrency} clients: {args.experts} experts round robin",
         f"{mixed_http:.1f} tok/s  (mean batch {mixed_batch:.1f}; x{http_ratio:.2f}; "
         f"target >= 0.8: {met(targets['mixed_http'])})"),
        ("HTTP rounds: mixed/single, mean batch single/mixed",
         "; ".join(f"x{r:.2f} {s[1]:.1f}/{m[1]:.1f}"
                   for r, s, m in zip(http_ratios, http["single"], http["mixed"], strict=True))),
        ("warm switch (set_adapter, cached)", f"{warm_ms:.3f} ms  (median of {len(warm)})"),
        ("cold load (download + verify + load_adapter)",
         f"{cold_ms:.1f} ms  (median of {len(cold_loads)}; x{cold_ratio:.0f} the warm switch; target >= 20: "
         f"{met(targets['cold'])})"),
        ("reload base + adapter per request (from disk)",
         f"{reload_ms:.1f} ms  (median of {len(reloads)}; x{reload_ratio:.0f} the warm switch; target >= 10: "
         f"{met(targets['reload'])})"),
    ]
    print_table("serving many experts", rows)
    if args.json:
        args.json.write_text(json.dumps({
            "single_engine_tok_s": single_seq, "mixed_engine_tok_s": mixed_seq,
            "single_engine_batched_tok_s": batched["single"], "mixed_engine_batched_tok_s": batched["mixed"],
            "single_http_tok_s": single_http, "mixed_http_tok_s": mixed_http, "mean_batch_single": single_batch,
            "mean_batch_mixed": mixed_batch, "http_rounds": http,
            "warm_switch_s": warm, "cold_load_s": cold_loads, "reload_s": reloads, **results}, indent=2))
    return exit_code(targets.values())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
