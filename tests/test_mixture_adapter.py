"""Mixtures merged once into a cached LoRA folder (what vLLM serves for topk/adaptive), checked against PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from moin_hub import Registry
from moin_hub.errors import IncompatibleExpertError
from moin_hub.hub.config import ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME
from moin_hub.hub.pull import download_expert
from moin_hub.serving.mixture_adapter import MIXTURE_FILENAME, materialize_mixture, mixture_name

PROMPT = "Knead the dough and watch the striker score"


@pytest.fixture
def registry(hub, topic_registry) -> Registry:
    return Registry.load(topic_registry, endpoint=hub.url)


def _logits(model, tokenizer) -> torch.Tensor:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def _base(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)


def test_the_merged_folder_gives_the_logits_of_pefts_own_weighted_adapter(registry, tiny_base, tmp_path):
    from peft import PeftModel

    records = [registry.get("cooking"), registry.get("football")]
    weights = [0.7, 0.3]
    merged = materialize_mixture(registry, records, weights, tmp_path / "mixtures")
    assert merged.created and merged.path == tmp_path / "mixtures" / merged.name
    assert merged.rank == 8 == sum(r.lora_rank for r in records)  # cat: ranks add up
    config = json.loads((merged.path / ADAPTER_CONFIG_FILENAME).read_text())
    assert config["r"] == 8 and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == registry.manifest.base_model.repo_id

    # plain PEFT loads the merged folder like any adapter
    base, tokenizer = _base(tiny_base)
    mixed = _logits(PeftModel.from_pretrained(base, str(merged.path)).eval(), tokenizer)

    # PEFT's own weighted adapter of the same experts, on a fresh copy of the base
    base, _ = _base(tiny_base)
    folders = [download_expert(r, endpoint=registry.endpoint) for r in records]
    reference = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="cooking")
    reference.load_adapter(str(folders[1]), adapter_name="football")
    reference.add_weighted_adapter(["cooking", "football"], weights, adapter_name="mix", combination_type="cat")
    reference.set_adapter("mix")
    expected = _logits(reference.eval(), tokenizer)
    assert torch.allclose(mixed, expected, atol=1e-5), (mixed - expected).abs().max()

    # and it is a real mixture: neither expert alone, nor the base model
    reference.set_adapter("cooking")
    assert not torch.allclose(mixed, _logits(reference, tokenizer), atol=1e-3)
    with reference.disable_adapter():
        assert not torch.allclose(mixed, _logits(reference, tokenizer), atol=1e-3)


def test_a_second_call_reuses_the_cached_folder(registry, tmp_path):
    cache = tmp_path / "mixtures"
    fetched = []

    def fetch(record):
        fetched.append(record.expert_id)
        return download_expert(record, endpoint=registry.endpoint, base_model=registry.manifest.base_model)

    records = [registry.get("astronomy"), registry.get("cooking")]
    first = materialize_mixture(fetch, records, [0.55, 0.45], cache)
    assert first.created and sorted(fetched) == ["astronomy", "cooking"]
    weights_bytes = (first.path / ADAPTER_WEIGHTS_FILENAME).read_bytes()
    # the same mixture, experts in another order and weights equal once rounded: the same folder, no fetch
    again = materialize_mixture(fetch, records[::-1], [0.45000001, 0.55], cache)
    assert not again.created and again.path == first.path and again.name == first.name and again.rank == first.rank
    assert len(fetched) == 2 and (again.path / ADAPTER_WEIGHTS_FILENAME).read_bytes() == weights_bytes
    assert [p.name for p in cache.iterdir()] == [first.name]  # no staging folder left behind

    meta = json.loads((first.path / MIXTURE_FILENAME).read_text())
    assert meta["rank"] == 8 and meta["combination_type"] == "cat"
    assert [(e["expert_id"], e["revision"], e["weight"]) for e in meta["experts"]] == sorted(
        [(r.expert_id, r.revision, w) for r, w in zip(records, [0.55, 0.45], strict=True)],
        key=lambda t: registry.get(t[0]).repo_id)

    # other weights are another mixture; a cached folder whose files no longer match is merged again
    other = materialize_mixture(fetch, records, [0.5, 0.5], cache)
    assert other.created and other.name != first.name
    (first.path / ADAPTER_WEIGHTS_FILENAME).write_bytes(b"bit rot")
    healed = materialize_mixture(fetch, records, [0.55, 0.45], cache)
    assert healed.created and (healed.path / ADAPTER_WEIGHTS_FILENAME).read_bytes() == weights_bytes


def test_an_engine_is_a_source_too_and_shares_the_cache(registry, tmp_path):
    from moin_hub import ExpertEngine

    records = [registry.get("cooking"), registry.get("astronomy")]
    engine = ExpertEngine(registry)
    try:
        first = materialize_mixture(engine, records, [0.5, 0.5], tmp_path)
        again = materialize_mixture(registry, records, [0.5, 0.5], tmp_path)
    finally:
        engine.close()
    assert first.created and not again.created and again.path == first.path


def test_a_mixture_above_the_servers_max_rank_is_refused_before_any_download(registry, tmp_path):
    def fetch(record):
        raise AssertionError("nothing may be downloaded")

    records = [registry.get("cooking"), registry.get("football")]
    with pytest.raises(IncompatibleExpertError, match="rank 8") as info:
        materialize_mixture(fetch, records, [0.5, 0.5], tmp_path, max_rank=4)
    assert (info.value.expected, info.value.actual) == (4, 8)


def test_bad_mixtures_are_refused(registry, tmp_path):
    cooking, football = registry.get("cooking"), registry.get("football")
    for experts, weights, match in [([], [], "at least one"), ([cooking], [0.5, 0.5], "one weight per expert"),
                                    ([cooking, football], [1.0, 0.0], "> 0"),
                                    ([cooking, football], [1.0, float("nan")], "finite"),
                                    ([cooking, cooking], [0.5, 0.5], "twice"),
                                    ([cooking, football], [1.0, 1e-9], "once rounded")]:
        with pytest.raises(ValueError, match=match):
            materialize_mixture(registry, experts, weights, tmp_path)
    with pytest.raises(TypeError, match="source"):
        materialize_mixture(42, [cooking], [1.0], tmp_path)
    assert mixture_name([cooking, football], [0.5, 0.5]) != mixture_name([cooking, football], [0.6, 0.4])


def test_experts_with_other_targets_and_ranks_merge_as_peft_merges_them(registry, tiny_base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from moin_hub.hub.config import ExpertRecord

    # a second adapter of another rank on other modules (attention and MLP), saved as a plain PEFT folder
    torch.manual_seed(7)
    base, tokenizer = _base(tiny_base)
    other = get_peft_model(base, LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    other.peft_config["default"].base_model_name_or_path = registry.manifest.base_model.repo_id
    other.save_pretrained(tmp_path / "other", save_embedding_layers=False)
    cooking = registry.get("cooking")
    folders = {cooking.repo_id: download_expert(cooking, endpoint=registry.endpoint), "org/other": tmp_path / "other"}
    records = [cooking, ExpertRecord("other", "org/other", "a" * 40, (1.0,))]

    merged = materialize_mixture(lambda record: folders[record.repo_id], records, [0.25, 0.75], tmp_path / "mix")
    assert merged.rank == 4 + 2
    base, _ = _base(tiny_base)
    mixed = _logits(PeftModel.from_pretrained(base, str(merged.path)).eval(), tokenizer)

    base, _ = _base(tiny_base)
    reference = PeftModel.from_pretrained(base, str(folders[cooking.repo_id]), adapter_name="cooking")
    reference.load_adapter(str(tmp_path / "other"), adapter_name="other")
    reference.add_weighted_adapter(["cooking", "other"], [0.25, 0.75], adapter_name="mix", combination_type="cat")
    reference.set_adapter("mix")
    assert torch.allclose(mixed, _logits(reference.eval(), tokenizer), atol=1e-5)
