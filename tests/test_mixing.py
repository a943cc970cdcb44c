"""Routing modes: the pure weighting of routed experts, and their exact mixing in PEFT."""

from __future__ import annotations

import pytest
import torch

from moin_hub.hub.loading import adapter_name
from moin_hub.hub.mixing import MIXTURE_SLOT, Mixture, apply_mixture, mix_weights
from tests import _helpers
from tests.conftest import BASE_REPO


def test_top1_topk_and_adaptive_weights():
    sims = [0.62, 0.60, 0.41, 0.10]
    assert mix_weights(sims, mode="top1") == [1.0, 0.0, 0.0, 0.0]
    topk = mix_weights(sims, mode="topk", k=3)
    assert sum(topk) == pytest.approx(1) and topk[0] > topk[1] > topk[2] > 0 and topk[3] == 0
    # adaptive: a confident router gives one expert, an unsure one several
    assert mix_weights([0.70, 0.40, 0.35], mode="adaptive", k=3) == pytest.approx([1.0, 0.0, 0.0], abs=1e-3)
    unsure = mix_weights([0.50, 0.50, 0.49], mode="adaptive", k=3, mass=0.9)
    assert sum(w > 0 for w in unsure) == 3 and sum(unsure) == pytest.approx(1)
    assert mix_weights(sims, mode="adaptive", k=1) == [1.0, 0.0, 0.0, 0.0]


def test_threshold_falls_back_to_the_base_model_and_bad_input_is_refused():
    assert mix_weights([0.05, 0.01], mode="topk", threshold=0.1) == []
    assert mix_weights([], mode="topk") == []
    for kwargs, message in [({"mode": "best"}, "mode"), ({"k": 0}, "k"), ({"temperature": 0}, "temperature"),
                            ({"mass": 1.5}, "mass")]:
        with pytest.raises(ValueError, match=message):
            mix_weights([0.5], **kwargs)
    with pytest.raises(ValueError, match="sorted"):
        mix_weights([0.1, 0.5])
    with pytest.raises(ValueError, match="finite"):
        mix_weights([float("nan")])


def test_a_mixture_is_exactly_the_weighted_sum_of_the_experts(tmp_path, tiny_base, embedder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = {topic: _helpers.write_expert(tmp_path / topic, tiny_base, embedder, topic, base_repo=BASE_REPO, seed=i)
            for i, topic in enumerate(("cooking", "football"))}
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(base, str(dirs["cooking"]), adapter_name=adapter_name("cooking"))
    model.load_adapter(str(dirs["football"]), adapter_name=adapter_name("football"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    deltas = {t: layer.get_delta_weight(adapter_name(t)) for t in dirs}

    assert apply_mixture(model, Mixture(("football",), (1.0,), "top1")) == adapter_name("football")
    assert apply_mixture(model, Mixture((), (), "top1")) is None
    for weights in ((0.7, 0.3), (0.5, 0.5)):
        slot = apply_mixture(model, Mixture(("cooking", "football"), weights, "topk"))
        assert slot == MIXTURE_SLOT and model.active_adapter == MIXTURE_SLOT
        expected = weights[0] * deltas["cooking"] + weights[1] * deltas["football"]
        torch.testing.assert_close(layer.get_delta_weight(MIXTURE_SLOT), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(KeyError, match="astronomy"):
        apply_mixture(model, Mixture(("astronomy",), (1.0,), "top1"))


def test_weighted_experts_run_the_same_mixture_without_building_it(tmp_path, tiny_base, embedder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moin_hub.pipeline.modes import weighted_experts

    dirs = {topic: _helpers.write_expert(tmp_path / topic, tiny_base, embedder, topic, base_repo=BASE_REPO, seed=i)
            for i, topic in enumerate(("cooking", "football", "astronomy"))}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(dirs["cooking"]),
                                      adapter_name=adapter_name("cooking"))
    for topic in ("football", "astronomy"):
        model.load_adapter(str(dirs[topic]), adapter_name=adapter_name(topic))
    model.eval()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    mixture = Mixture(("football", "astronomy", "cooking"), (0.5, 0.3, 0.2), "topk")
    with torch.no_grad():
        apply_mixture(model, mixture)  # PEFT's `cat` adapter, built
        built = model(input_ids=ids).logits
        scalings = dict(layer.scaling)
        model.set_adapter(adapter_name("football"))
        single = model(input_ids=ids).logits
        with weighted_experts(model, mixture):
            mixed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, built, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed, single, atol=1e-4)  # the mixture is no single expert
    torch.testing.assert_close(after, single)  # scalings and the active adapter are given back
    assert layer.scaling == scalings and model.active_adapter == adapter_name("football")
    with pytest.raises(KeyError, match="moin__nope"), weighted_experts(model, Mixture(("nope",), (1.0,), "top1")):
        pass


def test_calibrated_temperature_recovers_the_one_that_made_the_labels():
    import numpy as np

    from moin_hub.hub.mixing import calibrate_temperature

    rng = np.random.default_rng(0)
    sims = rng.normal(0.3, 0.08, size=(4000, 6))
    for true in (0.02, 0.05, 0.2):
        probs = np.exp(sims / true)
        probs /= probs.sum(axis=1, keepdims=True)
        labels = np.array([rng.choice(6, p=p) for p in probs])
        found, nll = calibrate_temperature(sims, labels)
        assert found == pytest.approx(true, rel=0.15) and nll > 0
    with pytest.raises(ValueError, match="labels"):
        calibrate_temperature(sims[:2], [0, 6])
    with pytest.raises(ValueError, match="one label per query"):
        calibrate_temperature(sims[:2], [0])
    with pytest.raises(ValueError, match="finite"):
        calibrate_temperature([[0.1, float("nan")]], [0])
