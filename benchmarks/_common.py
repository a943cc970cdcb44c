"""Shared set-up of the serving benchmarks: a local Hub with the real default assets, random LoRA experts.

Experts here are LoRA adapters (r=8 on q_proj/v_proj) with random non-zero weights: what switching,
loading and generating cost does not depend on training. Their centroids are the mean MiniLM embedding of
a few topic sentences, so routing is real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: A few sentences per topic: the experts' centroids (mean MiniLM embedding) and the benchmarks' prompts.
TOPICS = {
    "cooking": ["Knead the bread dough for ten minutes until it is smooth and elastic.",
                "Simmer the tomato sauce with garlic, basil and olive oil for half an hour."],
    "football": ["The striker scored twice in the second half and the team won the cup final.",
                 "The referee showed a red card after a dangerous tackle in the penalty area."],
    "astronomy": ["The telescope observed a distant galaxy whose light left it billions of years ago.",
                  "Astronomers measure the distance to nearby stars by their parallax."],
    "gardening": ["Plant the tomato seedlings after the last frost and water them deeply.",
                  "Prune the roses in late winter and mulch the beds with compost."],
    "finance": ["The central bank raised interest rates to fight inflation.",
                "Bond yields fell as investors moved money out of stocks."],
    "medicine": ["The patient was given antibiotics for the bacterial infection.",
                 "Vaccines train the immune system to recognise a virus."],
    "music": ["The orchestra played the symphony with a new conductor.",
              "She practised the guitar chords until her fingers hurt."],
    "law": ["The jury returned a verdict of not guilty after two days.",
            "The court ruled that the contract was void."],
    "sailing": ["We trimmed the sails as the wind picked up off the coast.",
                "The yacht rounded the buoy and headed back to the harbour."],
    "chess": ["White sacrificed the queen to force checkmate in three moves.",
              "The opening gambit gives up a pawn for faster development."],
    "geology": ["The volcano erupted, sending lava down the mountain side.",
                "Sedimentary rock forms from layers of compressed sand and mud."],
    "birds": ["The heron waited motionless at the edge of the pond.",
              "Swallows migrate south before the first autumn frost."],
}


def use_fresh_hf_home(root: Path) -> None:
    """Point the HF cache at ``root/hf_home`` (before anything downloads), so first loads really download."""
    from huggingface_hub import constants

    os.environ["HF_HOME"] = str(root / "hf_home")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars at every base model load
    constants.HF_HOME = os.environ["HF_HOME"]
    constants.HF_HUB_CACHE = str(Path(os.environ["HF_HOME"]) / "hub")


def write_expert(folder: Path, base: Any, embedder: Any, expert_id: str, texts: list[str], base_repo: str,
                 seed: int) -> Path:
    """A valid expert folder: a random non-zero LoRA (r=8, q/v) on ``base`` and the centroid of ``texts``."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from moin_hub.hub.config import ExpertMetadata
    from moin_hub.hub.expert import write_centroid

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = base_repo
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, save_embedding_layers=False)  # "auto" would look the base up on huggingface.co
    model.unload()  # take the LoRA layers out of the shared base again
    centroid = embedder.encode(texts).mean(axis=0)
    write_centroid(folder / "centroid.safetensors", centroid / np.linalg.norm(centroid))
    meta = ExpertMetadata(expert_id=expert_id, keywords=[expert_id], n_docs=len(texts), n_tokens=1000,
                          samples=texts[:1], title=f"{expert_id.title()} expert")
    (folder / "moin_expert.json").write_text(json.dumps(meta.to_dict(), indent=2), encoding="utf-8")
    return folder


def publish_registry(hub_url: str, root: Path, registry_id: str, topics: dict[str, list[str]]) -> tuple[str, Any]:
    """Publish the default assets to the Hub at ``hub_url`` and push one random expert per topic.

    Returns:
        ``(base_repo, manifest)``.
    """
    from huggingface_hub import HfApi

    from moin_hub import init_registry, push_expert
    from moin_hub.hub.assets import publish_default_assets
    from moin_hub.hub.embed import load_embedder
    from moin_hub.hub.loading import load_base_model

    assets = publish_default_assets(HfApi(endpoint=hub_url))
    base_repo = assets["base_model"][0]
    registry = init_registry(registry_id, base_model=base_repo, embedder=assets["embedder"][0], endpoint=hub_url)
    manifest = registry.manifest
    base, _ = load_base_model(manifest.base_model, endpoint=hub_url)
    embedder = load_embedder(manifest.embedder, endpoint=hub_url)
    owner = registry_id.split("/")[0]
    for seed, (topic, texts) in enumerate(topics.items()):
        folder = write_expert(root / "experts" / topic, base, embedder, topic, texts, base_repo, seed)
        push_expert(folder, registry=registry_id, repo_id=f"{owner}/expert-{topic}", endpoint=hub_url)
    return base_repo, manifest


def check_switching(engine: Any, a: str, b: str, text: str) -> None:
    """Fail unless switching between experts ``a`` and ``b`` changes the logits of ``text`` (a real switch)."""
    import torch

    ids = torch.tensor([engine.encode(text)])
    logits = {}
    for topic in (a, b):
        name, _, _ = engine.activate(topic)
        with engine._using(name) as model, torch.inference_mode():
            logits[topic] = model(input_ids=ids).logits
    assert not torch.allclose(logits[a], logits[b]), "switching did not change the active adapter"


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """Two aligned columns: what was measured, and its value."""
    width = max(len(name) for name, _ in [(title, ""), *rows])
    print(f"{title:<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def met(ok: bool) -> str:
    """How a target reads in a table: ``"met"`` or ``"NOT met"``, computed from the measured figure.

    Example:
        >>> met(0.91 >= 0.8), met(False)
        ('met', 'NOT met')
    """
    return "met" if ok else "NOT met"


def exit_code(oks: Iterable[bool]) -> int:
    """The benchmark's exit status: 1 if any target was missed, else 0 (an empty list misses nothing).

    Example:
        >>> exit_code([True, True]), exit_code([True, False])
        (0, 1)
    """
    return 0 if all(oks) else 1


def run_clients(worker: Callable[[int], None], clients: int) -> float:
    """Run ``worker(0) ... worker(clients - 1)`` in threads at once; the wall seconds until all have ended."""
    import threading
    import time

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start
