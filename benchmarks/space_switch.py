"""Switching experts in the Space: a warm switch between cached adapters vs the first load of an expert.

Stated configuration: the real default base model (SmolLM2-135M-Instruct, dequantized from the bundled
Q4_1 GGUF, fp32 on CPU) and embedder (all-MiniLM-L6-v2), published to a local Hub server in a temporary
folder; --experts LoRA experts (r=8 on q_proj/v_proj, random non-zero weights: loading cost does not
depend on training) pushed into a registry. The Space's engine (moin_hub.serving.space.SpaceEngine) keeps ONE
base model and an LRU of adapters:

- first load of an expert = download at the pinned commit + sha256 verification of every file +
  ``load_adapter`` onto the base model (the public pull path, fresh HF cache);
- warm switch = ``set_adapter`` between two adapters already in the cache.

Both go through ``SpaceEngine.activate``; the target is warm switch >= 5x faster than a first load. It also
times the first generated token with a cold vs a warm expert (route + adapter + one decoding step each
for base and expert), which is what a user of the Space waits for. Prints one table; exit code 1 if the
target is missed. ``--json FILE`` also writes the numbers.
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

from _common import TOPICS, check_switching, exit_code, met, print_table, publish_registry, use_fresh_hf_home

QUERIES = {
    "cooking": "How long should bread dough rise before baking?",
    "football": "Who scored the winning goal in the cup final?",
    "astronomy": "How far away is the nearest star?",
    "gardening": "When should I plant tomato seedlings?",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4, choices=range(3, len(QUERIES) + 1),
                        help="Experts pushed (the first two are switched between, the last one is cold).")
    parser.add_argument("--switches", type=int, default=200, help="Warm switches timed.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="moin-bench-space-"))
    use_fresh_hf_home(root)  # a fresh HF cache: first loads really download
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

    from moin_hub.local_hub.server import LocalHub
    from moin_hub.serving.space import SpaceEngine

    hub = LocalHub(root / "hub").start()
    try:
        topics = list(QUERIES)[: args.experts]
        base_repo, _ = publish_registry(hub.url, root, "bench/space-switch", {t: TOPICS[t] for t in topics})

        engine = SpaceEngine("bench/space-switch", endpoint=hub.url, cache_size=args.experts)
        t0 = time.perf_counter()
        engine.warm_up()
        warm_up_s = time.perf_counter() - t0

        a, b, *others = topics
        first_loads = []
        for topic in (a, b, *others[:-1]):
            _, loaded, seconds = engine.activate(topic)
            assert loaded, topic
            first_loads.append(seconds)
        warm = []
        for i in range(args.switches):
            _, loaded, seconds = engine.activate(a if i % 2 else b)
            assert not loaded
            warm.append(seconds)

        check_switching(engine, a, b, QUERIES[a])

        def first_token(topic: str) -> float:
            start = time.perf_counter()
            next(iter(engine.generate(QUERIES[topic], max_new_tokens=1)))
            return time.perf_counter() - start

        cold_topic = others[-1]
        cold_token = first_token(cold_topic)
        warm_tokens = [first_token(a if i % 2 else b) for i in range(6)]
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)

    first_ms = statistics.median(first_loads) * 1000
    warm_ms = statistics.median(warm) * 1000
    ratio = first_ms / warm_ms
    token_cold_ms, token_warm_ms = cold_token * 1000, statistics.median(warm_tokens) * 1000
    rows = [
        ("configuration", f"{base_repo.split('/')[-1]} fp32 CPU, {args.experts} experts LoRA r=8 q,v, "
                          f"local Hub, fresh HF cache"),
        ("adapter size", f"{engine.registry.get(a).adapter_bytes / 1e6:.2f} MB"),
        ("base model + embedder load from disk (once)", f"{warm_up_s:.2f} s"),
        ("first load of an expert (download+verify+load_adapter)",
         f"{first_ms:.1f} ms  (median of {len(first_loads)}: " + ", ".join(f"{s * 1000:.0f}" for s in first_loads)
         + " ms)"),
        ("warm switch between two cached experts (set_adapter)",
         f"{warm_ms:.3f} ms  (median of {len(warm)}; max {max(warm) * 1000:.3f} ms)"),
        ("ratio first load / warm switch", f"x{ratio:.0f}  (target >= 5: {met(ratio >= 5)})"),
        ("first token, cold expert (route+load+1 token)", f"{token_cold_ms:.0f} ms"),
        ("first token, warm expert (route+switch+1 token)", f"{token_warm_ms:.0f} ms  "
                                                           f"(x{token_cold_ms / token_warm_ms:.1f} faster)"),
    ]
    print_table("space expert switching", rows)
    if args.json:
        args.json.write_text(json.dumps({"first_load_s": first_loads, "warm_switch_s": warm, "warm_up_s": warm_up_s,
                                         "first_token_cold_s": cold_token, "first_token_warm_s": warm_tokens,
                                         "ratio": ratio}, indent=2))
    return exit_code([ratio >= 5])


if __name__ == "__main__":
    sys.exit(main())
