"""The serving engine: the adapter cache's budget, pinning and prefetch, mixtures, batched generation."""

from __future__ import annotations

import pytest

from moin_hub.hub.mixing import Mixture
from moin_hub.serving.cache import AdapterCache, AdapterSlot, plan_evictions
from moin_hub.serving.engine import ExpertEngine
from moin_hub.serving.generation import truncate_at_stop
from tests._helpers import QUERIES, TOPICS

# ------------------------------------------------------------------------------------------ pure eviction


def test_plan_evictions_respects_the_byte_budget_pins_and_holds():
    sizes = {"a": 10, "b": 30, "c": 10, "d": 10}
    order = ["a", "b", "c", "d"]
    assert plan_evictions(order, 10, sizes=sizes, max_bytes=60) == []
    assert plan_evictions(order, 10, sizes=sizes, max_bytes=50) == ["a"]
    assert plan_evictions(order, 10, sizes=sizes, max_bytes=30) == ["a", "b"]  # LRU order, not the biggest
    assert plan_evictions(order, 10, sizes=sizes, max_bytes=30, pinned={"b"}) == ["a", "c", "d"]
    assert plan_evictions(order, 3, sizes=sizes, max_bytes=25, in_use={"a"}, pinned={"b"}) == ["c", "d"]
    # everything held or pinned: the cache stays over budget rather than evict
    assert plan_evictions(order, 1, in_use={"a", "c"}, pinned={"b", "d"}) == []
    assert plan_evictions(order, 2) == ["a", "b"]  # no byte budget: only the count


def test_adapter_cache_pins_and_reports_room():
    evicted: list[AdapterSlot] = []
    cache = AdapterCache(2, evicted.append, max_bytes=100)
    a, b, c = (AdapterSlot((f"o/{n}", "0" * 40), f"moin__{n}", n, nbytes=40) for n in "abc")
    a.pinned = True
    cache.add(a)
    assert cache.has_room(40) and not cache.has_room(70)
    cache.add(b)
    assert not cache.has_room(1)  # count budget reached
    cache.add(c)
    assert [s.expert_id for s in evicted] == ["b"] and cache.keys() == [a.key, c.key]
    a.pinned = False
    assert cache.shrink() == [] and cache.nbytes == 80
    with pytest.raises(ValueError, match="cache_bytes"):
        AdapterCache(2, evicted.append, max_bytes=0)


def test_truncate_at_stop():
    assert truncate_at_stop("one. two", ["."]) == ("one", True)
    assert truncate_at_stop("one two", ["x", ""]) == ("one two", False)
    assert truncate_at_stop("ab|cd#", ["#", "|"]) == ("ab", True)


# ------------------------------------------------------------------------------------------ the engine


@pytest.fixture
def engine(hub, topic_registry):
    engine = ExpertEngine(topic_registry, endpoint=hub.url, cache_size=2)
    yield engine
    engine.close()


def test_pinned_experts_survive_and_the_byte_budget_holds(hub, topic_registry):
    probe = ExpertEngine(topic_registry, endpoint=hub.url, cache_size=3)
    probe.activate("cooking")
    size = probe.cache_info()["loaded"][0]["bytes"]
    assert size > 0
    engine = ExpertEngine(topic_registry, endpoint=hub.url, cache_size=3, cache_bytes=2 * size)
    engine.pin("astronomy")
    for topic in ("cooking", "football", "cooking", "football"):
        engine.activate(topic)
        info = engine.cache_info()
        assert info["bytes"] <= 2 * size and "astronomy" in engine.cached_experts()
    assert engine.cached_experts() == ["astronomy", "football"]
    assert engine.unpin("astronomy") and not engine.unpin("astronomy")
    engine.activate("cooking")
    assert engine.cached_experts() == ["football", "cooking"]  # unpinned: evicted as least recently used
    assert engine.stats.evictions >= 3


def test_an_adapter_in_use_is_never_evicted(engine):
    with engine.hold(["cooking"]) as held:
        engine.activate("football")
        engine.activate("astronomy")  # capacity 2, but cooking is held: the cache goes over rather than evict it
        assert "cooking" in engine.cached_experts() and held[0].in_use == 1
    assert len(engine.cached_experts()) == 2  # released: back to the budget
    assert "astronomy" in engine.cached_experts()


def test_prefetch_loads_runner_ups_into_free_slots_only(hub, topic_registry):
    engine = ExpertEngine(topic_registry, endpoint=hub.url, cache_size=2, prefetch=2)
    try:
        plan = engine.plan(QUERIES["cooking"])
        assert plan.mixture.experts == ("cooking",)
        for future in list(engine._prefetching.values()):
            future.result(timeout=60)
        loaded = engine.cached_experts()
        assert "cooking" not in loaded and len(loaded) == 2  # both runner-ups, in free slots
        assert engine.stats.prefetched == 2 and engine.stats.cache_misses == 0
        _, loaded_now, _ = engine.activate(loaded[0])
        assert not loaded_now and engine.stats.cache_hits == 1  # the request found it loaded
        engine.activate("cooking")
        before = engine.stats.loads
        engine.plan(QUERIES["cooking"])  # the cache is full: prefetch downloads but never evicts
        for future in list(engine._prefetching.values()):
            future.result(timeout=60)
        assert engine.stats.loads == before and "cooking" in engine.cached_experts()
    finally:
        engine.close()


def test_plan_applies_mode_and_threshold(engine):
    top1 = engine.plan(QUERIES["football"])
    assert top1.mixture.experts == ("football",) and top1.route.best.expert.expert_id == "football"
    topk = engine.plan(QUERIES["football"], mode="topk", k=3)
    assert topk.mixture.experts[0] == "football" and len(topk.mixture.experts) == 3
    assert engine.plan(QUERIES["football"], threshold=0.99).mixture.base_only
    assert topk.to_dict()["mixture"]["mode"] == "topk"


def test_generate_batch_equals_one_by_one_and_honours_limits(engine):
    prompts = [engine.encode(QUERIES[t]) for t in TOPICS]
    prompts[1] = prompts[1][:3]  # ragged: left padding must not change the output
    mixture = Mixture(("cooking",), (1.0,), "top1")
    together = engine.generate_batch(prompts, mixture, max_new_tokens=[6, 3, 6])
    alone = [engine.generate_batch([p], mixture, max_new_tokens=[n])[0] for p, n in zip(prompts, [6, 3, 6],
                                                                                        strict=True)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert len(together[1].token_ids) <= 3 and together[0].prompt_tokens == len(prompts[0])
    assert all(c.finish_reason in ("stop", "length") for c in together)
    base = engine.generate_batch(prompts[:1], Mixture((), (), "base"), max_new_tokens=[6])[0]
    assert base.token_ids != together[0].token_ids  # the expert changes what the base model says


def test_one_batch_serves_different_experts_row_by_row(engine):
    prompts = [engine.encode(QUERIES[t]) for t in TOPICS] + [engine.encode("plain words")]
    mixtures = [Mixture((t,), (1.0,), "top1") for t in TOPICS] + [Mixture((), (), "base")]
    together = engine.generate_batch(prompts, mixtures, max_new_tokens=[5] * 4)
    alone = [engine.generate_batch([p], m, max_new_tokens=[5])[0] for p, m in zip(prompts, mixtures, strict=True)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert len({c.token_ids for c in together[:3]}) == 3
    assert engine.stats.batches == 1 + 4
    with pytest.raises(ValueError, match="several experts"):
        engine.generate_batch(prompts[:2], [Mixture(("cooking", "football"), (0.5, 0.5), "topk"), mixtures[0]],
                              max_new_tokens=[2, 2])


def test_a_rows_greedy_tokens_do_not_depend_on_its_batch_companions(engine):
    """A request gets the same tokens alone, in a batch of its own expert (one active adapter) and in a batch of
    other experts (gathered per-row LoRA): the server may put it in any of them."""
    prompt = engine.encode(QUERIES["cooking"])
    others = [engine.encode(QUERIES[t] + " and more") for t in TOPICS]
    cooking = Mixture(("cooking",), (1.0,), "top1")
    alone = engine.generate_batch([prompt], cooking, max_new_tokens=[8])[0].token_ids
    same_expert = engine.generate_batch([*others, prompt], cooking, max_new_tokens=[8] * 4)[-1].token_ids
    mixed = engine.generate_batch([*others, prompt], [*(Mixture((t,), (1.0,), "top1") for t in TOPICS), cooking],
                                  max_new_tokens=[8] * 4)[-1].token_ids
    assert alone == same_expert == mixed and len(alone) > 0


def test_encode_does_not_wait_for_a_running_batch(engine):
    """Requests are tokenized while a batch holds the engine's lock, so they are queued before the batch ends."""
    import threading

    engine.warm_up()
    encoded: list[list[int]] = []
    with engine._lock:  # what a running batch holds for its whole generate
        worker = threading.Thread(target=lambda: encoded.append(engine.encode("Knead the dough")), daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert encoded and encoded[0] == engine.tokenizer("Knead the dough")["input_ids"]


def test_sampling_is_reproducible_with_a_seed(engine):
    prompt = [engine.encode(QUERIES["astronomy"])]
    mixture = Mixture(("astronomy",), (1.0,), "top1")
    first = engine.generate_batch(prompt, mixture, max_new_tokens=[8], temperature=1.0, seed=7)
    second = engine.generate_batch(prompt, mixture, max_new_tokens=[8], temperature=1.0, seed=7)
    assert first[0].token_ids == second[0].token_ids


def test_a_mixture_is_built_once_and_dropped_on_eviction(engine):
    mixture = Mixture(("cooking", "football"), (0.7, 0.3), "topk")
    prompt = [engine.encode("some text")]
    engine.generate_batch(prompt, mixture, max_new_tokens=[2])
    engine.generate_batch(prompt, mixture, max_new_tokens=[2])
    assert engine.stats.mixtures == 1 and "moin__mixture" in engine._peft.peft_config
    mixed = engine.generate_batch(prompt, mixture, max_new_tokens=[4])[0]
    single = engine.generate_batch(prompt, Mixture(("cooking",), (1.0,), "top1"), max_new_tokens=[4])[0]
    assert mixed.token_ids != single.token_ids
    engine.activate("astronomy")  # evicts an expert of the mixture: the mixture's copy goes too
    assert "moin__mixture" not in engine._peft.peft_config


def test_per_row_lora_matches_peft_adapter_names(tiny_base, embedder, tmp_path):
    """The gathered-bmm path gives PEFT's own per-row results, with experts of different ranks and a base row."""
    import torch
    from peft import PeftModel

    from moin_hub.hub.loading import load_base
    from moin_hub.serving.lora_batch import per_row_lora, supports
    from tests import _helpers
    from tests.conftest import BASE_REPO

    folders = {topic: _helpers.write_expert(tmp_path / topic, tiny_base, embedder, topic, base_repo=BASE_REPO,
                                            rank=rank, seed=seed)
               for seed, (topic, rank) in enumerate([("cooking", 4), ("football", 8)])}
    base, tokenizer = load_base(tiny_base)
    model = PeftModel.from_pretrained(base, str(folders["cooking"]), adapter_name="cooking")
    model.load_adapter(str(folders["football"]), adapter_name="football")
    model.eval()
    rows = ["football", None, "cooking", "football"]
    ids = torch.tensor([tokenizer(QUERIES[t], add_special_tokens=True)["input_ids"][:10]
                        for t in ("football", "cooking", "cooking", "astronomy")])
    assert supports(model, ["cooking", "football"])
    with torch.inference_mode():
        reference = model(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        with per_row_lora(model, rows) as m:
            gathered = m(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        after = model(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
    assert torch.allclose(gathered, reference, atol=1e-5)
    assert torch.equal(gathered[1], plain[1]) and not torch.allclose(gathered[0], plain[0], atol=1e-3)
    assert torch.equal(after, reference)  # the hooks are gone
    with pytest.raises(ValueError, match="not loaded"), per_row_lora(model, ["nope"]):
        pass
