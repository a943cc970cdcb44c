"""Branch-train (BTM-style) experts: the token accounting, the seed, experts that start from it, all-linear."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from moin_hub.errors import InvalidExpertError
from moin_hub.hub.client import sha256_file
from moin_hub.pipeline.jobs import Budget, TrainConfig, plan_budget
from moin_hub.pipeline.train import train_expert, train_seed
from tests.test_train import BASE_REPO, BASE_SHA, CONFIG, job

TOPICS = ("cooking", "football", "astronomy")


@pytest.mark.parametrize("topics", [1, 2, 3, 6, 16])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("tokens", [1_000, 4_096, 24_576, 200_000])
def test_seed_and_experts_take_exactly_the_dense_budget(topics, fraction, tokens):
    config = TrainConfig(tokens_per_expert=tokens, batch_size=2, seed_fraction=fraction)
    budget = plan_budget(config, topics)
    assert budget.seed_steps + topics * budget.expert_steps == budget.dense_steps == topics * config.steps
    assert budget.seed_tokens + topics * budget.expert_tokens == budget.dense_tokens
    assert budget.dense_tokens == topics * config.steps * config.tokens_per_step
    assert budget.expert_steps >= 1
    if fraction == 0:
        assert budget.seed_steps == 0 and budget.seed_phase(config) is None
        assert budget.expert_phase(config).name == "expert"
    else:
        assert budget.seed_steps >= topics
        assert abs(budget.seed_fraction - fraction) <= 1 / config.steps  # whole steps, at least 1 each side
        assert budget.expert_phase(config).warmup == 0  # the branch continues the seed's run: no 2nd warmup
        assert budget.seed_phase(config).schedule == "constant"  # the branches do the decay
    assert budget.dense_phase(config).steps == budget.dense_steps
    assert Budget(**{k: v for k, v in budget.to_dict().items() if k in
                     {"topics", "tokens_per_step", "seed_steps", "expert_steps"}}) == budget


def test_budget_refuses_what_cannot_branch():
    with pytest.raises(ValueError, match="only 1 step"):
        plan_budget(TrainConfig(tokens_per_expert=100, seed_fraction=0.5), 4)
    with pytest.raises(ValueError, match="seed_fraction"):
        TrainConfig(seed_fraction=1.0)
    with pytest.raises(ValueError, match="all-linear"):
        TrainConfig(target_modules=("all-linear", "q_proj"))


BRANCH = dataclasses.replace(CONFIG, seed_fraction=0.5)


@pytest.fixture(scope="module")
def seed_dir(tiny_base, tmp_path_factory):
    jobs = [job(t) for t in TOPICS]
    return train_seed(tiny_base, jobs, tmp_path_factory.mktemp("seed"), BRANCH, base_model_id=BASE_REPO,
                      base_revision=BASE_SHA, progress=False)


def test_seed_trains_its_share_on_all_topics(seed_dir):
    record = json.loads((seed_dir / "training.json").read_text())
    budget = plan_budget(BRANCH, len(TOPICS))
    assert record["phase"] == budget.seed_phase(BRANCH).to_dict()
    assert record["steps"] == budget.seed_steps and record["tokens"] == budget.seed_tokens
    assert record["final_loss"] < record["initial_loss"]
    assert "seed" not in record  # the seed itself starts from a fresh LoRA


def test_expert_continues_from_the_seed_weights(seed_dir, tiny_base, tmp_path, monkeypatch):
    from peft import get_peft_model_state_dict

    from moin_hub.pipeline import train as _train

    seed_weights = load_file(str(seed_dir / "adapter_model.safetensors"))
    real_step, first = _train._train_step, {}

    def record_first_step(model, *args, **kwargs):
        if not first:
            first.update({k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()})
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(_train, "_train_step", record_first_step)
    budget = plan_budget(BRANCH, len(TOPICS))
    folder = train_expert(tiny_base, job("cooking"), tmp_path, BRANCH, base_model_id=BASE_REPO,
                          base_revision=BASE_SHA, phase=budget.expert_phase(BRANCH), init_from=seed_dir,
                          progress=False)
    assert set(first) == set(seed_weights)
    for name, tensor in seed_weights.items():  # the first step starts exactly at the seed
        torch.testing.assert_close(first[name], tensor, rtol=0, atol=0)
    trained = load_file(str(folder / "adapter_model.safetensors"))
    assert any(not torch.equal(trained[k], seed_weights[k]) for k in seed_weights)  # and then it learned
    record = json.loads((folder / "training.json").read_text())
    assert record["seed"]["sha256"] == sha256_file(seed_dir / "adapter_model.safetensors")
    assert record["phase"] == {"name": "branch", "steps": budget.expert_steps, "warmup": 0, "schedule": "cosine"}
    assert record["tokens"] == budget.expert_tokens


def test_a_seed_of_another_shape_is_refused(seed_dir, tiny_base, tmp_path):
    other = dataclasses.replace(BRANCH, rank=BRANCH.rank * 2)
    with pytest.raises(InvalidExpertError, match="differ"):
        train_expert(tiny_base, job("cooking"), tmp_path, other, base_model_id=BASE_REPO, base_revision=BASE_SHA,
                     init_from=seed_dir, progress=False)
    assert not any(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(InvalidExpertError, match="not a finished seed"):
        train_expert(tiny_base, job("cooking"), tmp_path, BRANCH, base_model_id=BASE_REPO, base_revision=BASE_SHA,
                     init_from=tmp_path / "nowhere", progress=False)


def test_all_linear_experts_load_with_plain_peft(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = dataclasses.replace(CONFIG, target_modules=("all-linear",), tokens_per_expert=512)
    folder = train_expert(tiny_base, job("football"), tmp_path, config, base_model_id=BASE_REPO,
                          base_revision=BASE_SHA, progress=False)
    saved = set(json.loads((folder / "adapter_config.json").read_text())["target_modules"])
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= saved
    assert "lm_head" not in saved
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(folder))
    adapted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == saved


def test_a_finished_folder_is_checked_against_the_run(seed_dir):
    from moin_hub.errors import MoinHubError
    from moin_hub.pipeline.steps import check_finished

    budget = plan_budget(BRANCH, len(TOPICS))
    check_finished(seed_dir, BRANCH, budget.seed_phase(BRANCH))  # the run that made it
    # the same seed asked for as another split of the budget (6 topics of half the tokens): the same steps
    other_split = dataclasses.replace(BRANCH, tokens_per_expert=BRANCH.tokens_per_expert // 2)
    same_steps = plan_budget(other_split, 2 * len(TOPICS)).seed_phase(other_split)
    assert same_steps == budget.seed_phase(BRANCH)
    check_finished(seed_dir, other_split, same_steps)
    with pytest.raises(MoinHubError, match="rank: 8 -> 4"):
        check_finished(seed_dir, dataclasses.replace(BRANCH, rank=4), budget.seed_phase(BRANCH))
    fewer = dataclasses.replace(BRANCH, seed_fraction=0.25)
    with pytest.raises(MoinHubError, match="seed_fraction: 0.5 -> 0.25.*seed steps"):
        check_finished(seed_dir, fewer, plan_budget(fewer, len(TOPICS)).seed_phase(fewer))


def test_seed_and_dense_jobs_do_not_depend_on_the_clustering():
    from moin_hub.pipeline.train import _all_topics_job

    jobs = [job(t) for t in TOPICS]
    texts = [t for j in jobs for t in j.texts]
    regrouped = [job("cooking", expert_id="a", texts=texts[::2]), job("football", expert_id="b", texts=texts[1::2])]
    assert _all_topics_job(jobs, "seed", "").texts == _all_topics_job(regrouped, "seed", "").texts


def test_the_commands_default_to_the_library_seed_fraction():
    """`train` and `demo` spell their default without importing the pipeline (fast --help): keep them in step."""
    from moin_hub.cli.demo import command as demo_command
    from moin_hub.cli.pipeline import train_command
    from moin_hub.pipeline.demo import DemoConfig

    def default(command, name):
        return next(p.default for p in command.params if p.name == name)

    assert default(train_command, "seed_fraction") == default(demo_command, "seed_fraction") == 0.75
    assert TrainConfig().seed_fraction == DemoConfig().seed_fraction == 0.75
