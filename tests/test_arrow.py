"""Arrow (token-level mixing of experts, no router training) against PEFT's own Arrow, and adaptive gating."""

from __future__ import annotations

import pytest
import torch

from moin_hub.hub.arrow import ArrowSpec, ArrowStats, arrow_lora, prototype
from tests.test_train import train

TOPICS = ("cooking", "football", "astronomy")


@pytest.fixture(scope="module")
def experts(tiny_base, tmp_path_factory):
    """Three trained experts, their LoRA updates made to have one clearly dominant singular direction.

    PEFT finds each prototype with 15 power iterations from a random start, which has not converged where
    the top two singular values of ``B @ A`` are close (as in freshly trained tiny experts: one layer's
    routing then differs); ours is an exact SVD. With a dominant direction both are exact, so the outputs
    must agree to float precision.
    """
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("arrow-experts")
    folders = [train(tiny_base, topic, out) for topic in TOPICS]
    generator = torch.Generator().manual_seed(0)
    for folder in folders:
        path = folder / "adapter_model.safetensors"
        weights = load_file(str(path))
        for name in [n for n in weights if "lora_B" in n]:
            b = weights[name]
            spike = torch.zeros_like(b)
            spike[:, 0] = 10 * torch.randn(b.shape[0], generator=generator)  # sigma_1 >> sigma_2 of B @ A
            weights[name] = b + spike
        save_file(weights, str(path))
    return folders


@pytest.fixture(scope="module")
def inputs(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    texts = ["The striker scored a goal before the comet passed the Moon.", "Fry the onions in butter."]
    return tokenizer(texts, return_tensors="pt", padding=True)["input_ids"]


def _ours(tiny_base, experts, spec, stats=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(experts[0]),
                                      adapter_name="moin__0")
    for i, folder in enumerate(experts[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"moin__{i}")
    return model.eval(), [f"moin__{i}" for i in range(len(experts))]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_arrow_matches_peft_arrow(tiny_base, experts, inputs, top_k):
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM

    peft_model = create_arrow_model(AutoModelForCausalLM.from_pretrained(tiny_base), [str(f) for f in experts],
                                    ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)).eval()
    ours, names = _ours(tiny_base, experts, None)
    with torch.no_grad():
        expected = peft_model(input_ids=inputs).logits
        plain = ours(input_ids=inputs).logits  # the first adapter alone: must differ, or the test shows nothing
        with arrow_lora(ours, names, ArrowSpec(top_k=top_k, temperature=1.0)):
            got = ours(input_ids=inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-3)
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in ours.modules())  # hooks removed


def test_prototype_is_the_top_right_singular_vector():
    torch.manual_seed(0)
    a, b = torch.randn(4, 32), torch.randn(16, 4)
    v = prototype(a, b)
    _, _, vh = torch.linalg.svd(b @ a)
    assert abs(float(v @ vh[0])) == pytest.approx(1.0, abs=1e-5)


def test_adaptive_gate_takes_a_second_expert_only_when_unsure(tiny_base, experts, inputs):
    ours, names = _ours(tiny_base, experts, None)
    outputs, mean = {}, {}
    with torch.no_grad():
        for label, spec in {"top1": ArrowSpec(top_k=1), "top3": ArrowSpec(top_k=3),
                            "sure": ArrowSpec(top_k=3, gap=1e-9), "never-sure": ArrowSpec(top_k=3, gap=1.0),
                            "gated": ArrowSpec(top_k=3, gap=0.5)}.items():
            stats = ArrowStats()
            with arrow_lora(ours, names, spec, stats):
                outputs[label] = ours(input_ids=inputs).logits
            mean[label] = stats.mean_experts
    assert mean["top1"] == 1 and mean["top3"] == 3
    # a tiny gap: only exact ties (the experts share their LoRA init, so some prototypes nearly coincide) take more
    torch.testing.assert_close(outputs["sure"], outputs["top1"])
    torch.testing.assert_close(outputs["never-sure"], outputs["top3"])
    assert mean["top1"] <= mean["sure"] < mean["gated"] < mean["top3"]  # the wider the gap, the more experts
    assert not torch.allclose(outputs["gated"], outputs["top3"]) and not torch.allclose(outputs["gated"], outputs["top1"])


def test_arrow_refuses_bad_input(tiny_base, experts):
    ours, names = _ours(tiny_base, experts, None)
    with pytest.raises(ValueError, match="not loaded"):
        with arrow_lora(ours, ["moin__nope"]):
            pass
    with pytest.raises(ValueError, match="at least one"):
        with arrow_lora(ours, []):
            pass
    for bad in ({"top_k": 0}, {"temperature": 0}, {"gap": 0}, {"gap": 1.5}):
        with pytest.raises(ValueError):
            ArrowSpec(**bad)
