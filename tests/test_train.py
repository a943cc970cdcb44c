"""Training experts and scoring them, on a tiny random Llama (no network, a few seconds per test)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import pytest
import torch

from moin_hub.errors import ExpertTrainingError, InvalidExpertError, MoinHubError
from moin_hub.hub.config import ExpertMetadata
from moin_hub.hub.expert import ExpertFolder
from moin_hub.hub.loading import load_base
from moin_hub.pipeline.evaluate import evaluate_experts
from moin_hub.pipeline.jobs import TopicJob, TrainConfig
from moin_hub.pipeline.scoring import build_blocks, perplexity
from moin_hub.pipeline.train import train_dense, train_expert, train_experts
from tests._tiny import TOPIC_TEXTS

BASE_REPO = "test-org/tiny-llama"
BASE_SHA = "0123456789abcdef0123456789abcdef01234567"
EXPERT_FILES = {"adapter_config.json", "adapter_model.safetensors", "centroid.safetensors", "moin_expert.json",
                "training.json"}
#: Small blocks and a high learning rate: a few dozen steps visibly fit a topic of the random model.
CONFIG = TrainConfig(seq_len=32, batch_size=4, tokens_per_expert=3_000, learning_rate=1e-2, bf16=False,
                     torch_threads=1)


def job(topic: str, **overrides) -> TopicJob:
    rng = np.random.default_rng(len(topic))
    fields = {"texts": TOPIC_TEXTS[topic], "centroid": rng.normal(size=8), "keywords": [topic],
              "samples": TOPIC_TEXTS[topic][:2], "title": topic.title(), "eval_texts": TOPIC_TEXTS[topic]}
    return TopicJob(overrides.pop("expert_id", topic), **{**fields, **overrides})


def train(base, topic: str, out, config: TrainConfig = CONFIG, **overrides):
    return train_expert(base, job(topic, **overrides), out, config, base_model_id=BASE_REPO,
                        base_revision=BASE_SHA, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """Cooking and football experts trained once for the module (astronomy has none)."""
    out = tmp_path_factory.mktemp("experts")
    return {topic: train(tiny_base, topic, out) for topic in ("cooking", "football")}


def _listing(folder):
    return {p.name: sorted(q.name for q in p.iterdir()) for p in folder.iterdir()}


#: What ``training.json`` may differ in between two runs of the same training: clocks, threads, the time stamp.
VOLATILE = {"seconds", "tokens_per_second", "eval_seconds", "torch_threads", "created_at"}


def _contents(folder):
    """Every expert's files by sha256 of their bytes (``training.json`` without its volatile fields)."""
    out = {}
    for expert in sorted(folder.iterdir()):
        for path in sorted(expert.iterdir()):
            if path.name == "training.json":
                record = {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}
                record["config"] = {k: v for k, v in record["config"].items() if k not in VOLATILE}
                out[f"{expert.name}/{path.name}"] = record
            else:
                out[f"{expert.name}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_expert_folder_has_exactly_the_expected_files(trained):
    folder = trained["cooking"]
    assert {p.name for p in folder.iterdir()} == EXPERT_FILES
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    checked = ExpertFolder.read(folder, dim=8)  # what `push_expert` reads
    assert checked.lora.base_model == BASE_REPO
    assert checked.lora.base_revision == BASE_SHA
    assert checked.lora.target_modules == ("q_proj", "v_proj")
    assert checked.metadata.n_docs == len(TOPIC_TEXTS["cooking"])
    assert checked.metadata.n_tokens == CONFIG.steps * CONFIG.tokens_per_step
    assert checked.metadata.keywords == ["cooking"] and checked.metadata.title == "Cooking"


def test_training_lowers_loss_and_perplexity(trained, tiny_base):
    record = json.loads((trained["cooking"] / "training.json").read_text())
    assert record["final_loss"] < record["initial_loss"] - 0.1
    assert record["steps"] == CONFIG.steps and record["tokens_per_second"] > 0
    assert TrainConfig.from_dict(record["config"]) == CONFIG
    assert record["torch_threads"] == 1 and record["device"] == "cpu" and record["bf16"] is False
    meta = ExpertMetadata.from_dict(json.loads((trained["cooking"] / "moin_expert.json").read_text()))
    assert meta.perplexity < meta.base_perplexity
    assert meta.eval_tokens > 0


def test_plain_peft_loads_the_adapter(trained, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = json.loads((trained["cooking"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_REPO and config["revision"] == BASE_SHA
    model = PeftModel.from_pretrained(base, str(trained["cooking"]))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init


def test_finished_expert_is_not_retrained(trained):
    folder = trained["cooking"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def must_not_load():
        raise AssertionError("a finished expert was loaded again")

    start = time.perf_counter()
    assert train(must_not_load, "cooking", folder.parent) == folder
    assert time.perf_counter() - start < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


def test_crash_leaves_no_half_expert_and_rerun_completes(tiny_base, tmp_path, monkeypatch):
    from moin_hub.pipeline import train as _train

    real_step, calls = _train._train_step, []

    def crash_at_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(_train, "_train_step", crash_at_third_step)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(tiny_base, "astronomy", tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    folder = train(tiny_base, "astronomy", tmp_path)
    assert {p.name for p in folder.iterdir()} == EXPERT_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["astronomy"]


def test_stale_temp_folder_of_a_killed_run_is_removed(tiny_base, tmp_path):
    stale = tmp_path / ".astronomy.tmp-999999999"  # no such pid
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    train(tiny_base, "astronomy", tmp_path, dataclasses.replace(CONFIG, max_steps=2))
    assert [p.name for p in tmp_path.iterdir()] == ["astronomy"]


def test_unfinished_folder_in_the_way_is_refused(tiny_base, tmp_path):
    (tmp_path / "cooking").mkdir()
    with pytest.raises(InvalidExpertError, match="not a finished expert"):
        train(tiny_base, "cooking", tmp_path)


def test_failure_of_one_job_is_reported_after_the_others_finish(tiny_base, tmp_path):
    jobs = [job("cooking"), job("cooking", expert_id="too-short", texts=["Too short."]), job("football")]
    with pytest.raises(ExpertTrainingError) as info:
        train_experts(jobs, tmp_path, CONFIG, base_model_dir_or_loader=tiny_base, base_model_id=BASE_REPO,
                      base_revision=BASE_SHA, progress=False)
    assert isinstance(info.value, MoinHubError) and isinstance(info.value, RuntimeError)
    assert list(info.value.failures) == ["too-short"]
    assert "fewer tokens than one block" in info.value.failures["too-short"]
    assert "too-short" in str(info.value)
    assert sorted(p.name for p in info.value.finished) == ["cooking", "football"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cooking", "football"]


def test_two_workers_give_the_same_experts_as_one(tiny_base, tmp_path):
    small = dataclasses.replace(CONFIG, max_steps=3, torch_threads=None)
    jobs = [job(topic, eval_texts=None) for topic in TOPIC_TEXTS]
    kwargs = {"base_model_dir_or_loader": tiny_base, "base_model_id": BASE_REPO, "base_revision": BASE_SHA,
              "progress": False}
    one = train_experts(jobs, tmp_path / "one", small, workers=1, **kwargs)
    two = train_experts(jobs, tmp_path / "two", small, workers=2, **kwargs)
    assert [p.name for p in one] == [p.name for p in two] == list(TOPIC_TEXTS)
    assert _listing(tmp_path / "one") == _listing(tmp_path / "two")
    assert _contents(tmp_path / "one") == _contents(tmp_path / "two")  # byte for byte: weights, centroid, card data
    threads = json.loads((two[0] / "training.json").read_text())["torch_threads"]
    assert threads == max(1, len(os.sched_getaffinity(0)) // 2)


@pytest.mark.e2e
def test_ray_executor_trains_each_expert_as_its_own_task(tiny_base, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    for name, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    small = dataclasses.replace(CONFIG, max_steps=3)
    jobs = [job(topic, eval_texts=None) for topic in ("cooking", "football")]
    kwargs = {"base_model_dir_or_loader": tiny_base, "base_model_id": BASE_REPO, "base_revision": BASE_SHA,
              "progress": False}
    local = train_experts(jobs, tmp_path / "local", small, workers=1, **kwargs)
    on_ray = train_experts(jobs, tmp_path / "ray", small, executor="ray", **kwargs)
    assert not ray.is_initialized()  # the local cluster it started is shut down again
    assert [p.name for p in on_ray] == [p.name for p in local] == ["cooking", "football"]
    for a, b in zip(local, on_ray, strict=True):  # same seed, same steps: the same adapter, wherever it ran
        assert {p.name for p in b.iterdir()} == EXPERT_FILES
        assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()


def test_ray_executor_without_ray_names_the_extra(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(ImportError, match=r"pip install 'moin-hub\[ray\]'"):
        train_experts([job("cooking")], tmp_path, CONFIG, executor="ray", base_model_dir_or_loader=tiny_base,
                      base_model_id=BASE_REPO, base_revision=BASE_SHA)
    assert list(tmp_path.iterdir()) == []


def test_dense_baseline_gets_the_total_budget(tiny_base, tmp_path):
    config = dataclasses.replace(CONFIG, max_steps=2)
    folder = train_dense(tiny_base, [job(t) for t in TOPIC_TEXTS], tmp_path, config, base_model_id=BASE_REPO,
                         base_revision=BASE_SHA, progress=False)
    record = json.loads((folder / "training.json").read_text())
    assert folder.name == "dense" and record["steps"] == 2 * len(TOPIC_TEXTS)
    assert record["tokens"] == 2 * len(TOPIC_TEXTS) * config.tokens_per_step
    assert record["phase"] == {"name": "dense", "steps": 2 * len(TOPIC_TEXTS), "warmup": 0, "schedule": "cosine"}
    assert TrainConfig.from_dict(record["config"]) == config  # the run's config; the phase says what dense did
    assert ExpertFolder.read(folder).metadata.n_docs == sum(len(t) for t in TOPIC_TEXTS.values())


@pytest.mark.parametrize(("field", "value"), [
    ("rank", 0), ("alpha", -1), ("dropout", 1.0), ("learning_rate", 0), ("seq_len", 1), ("batch_size", 2.5),
    ("tokens_per_expert", -5), ("max_steps", 0), ("warmup_ratio", 1.5), ("schedule", "step"),
    ("weight_decay", -0.1), ("grad_clip", 0), ("seed", -1), ("bf16", "yes"), ("torch_threads", 0),
    ("target_modules", []), ("target_modules", "q_proj"), ("seed_fraction", 1.0), ("seed_fraction", -0.1),
])
def test_train_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_round_trips_through_json():
    config = TrainConfig(rank=4, target_modules=("q_proj", "k_proj", "v_proj"), max_steps=7, bf16=True)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"rank": 4, "lr": 1e-3})
    assert TrainConfig(tokens_per_expert=50_000).steps == 49
    assert TrainConfig(tokens_per_expert=50_000, max_steps=10).steps == 10


def test_topic_job_is_checked():
    with pytest.raises(ValueError, match="texts is empty"):
        job("cooking", texts=[])
    with pytest.raises(ValueError, match="centroid"):
        job("cooking", centroid=np.zeros(8))
    with pytest.raises(ValueError, match="expert_id"):
        job("cooking", expert_id="../escape")


def test_perplexity_is_exp_of_mean_token_nll(tiny_base):
    model, tokenizer = load_base(tiny_base)
    texts = TOPIC_TEXTS["football"]
    blocks = build_blocks(tokenizer, texts, 16)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=blocks).logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, blocks[:, 1:, None]).mean().item()
    ppl, n_tokens = perplexity(model, tokenizer, texts, seq_len=16, batch_size=3, bf16=False)
    assert n_tokens == blocks.shape[0] * 15
    assert ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert perplexity(model, tokenizer, texts, seq_len=16, batch_size=5, bf16=False)[0] == pytest.approx(ppl)
    assert perplexity(model, tokenizer, texts, seq_len=16, bf16=False, max_tokens=20)[1] == 2 * 15
    with pytest.raises(ValueError, match="fewer tokens than one block"):
        perplexity(model, tokenizer, ["Short."], seq_len=64)


def test_blocks_are_eos_separated_and_full(tiny_base):
    _, tokenizer = load_base(tiny_base)
    blocks = build_blocks(tokenizer, ["a b c", "d e f"], 2)
    stream = tokenizer("a b c", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks.flatten().tolist()[: len(stream)] == stream
    assert blocks.shape[1] == 2 and build_blocks(tokenizer, [], 4).shape == (0, 4)


def test_evaluate_experts_oracle_beats_base_and_routing_is_scored(trained, tiny_base):
    model, tokenizer = load_base(tiny_base)
    eval_sets = {topic: TOPIC_TEXTS[topic] for topic in TOPIC_TEXTS}
    n = len(TOPIC_TEXTS["football"])
    routed = {"cooking": ["cooking"] * n, "football": ["football", "cooking"] * (n // 2), "astronomy": [None] * n}
    scores = evaluate_experts(model, tokenizer, trained, eval_sets, routed=routed, seq_len=32, bf16=False)
    topics = scores["topics"]
    for topic in ("cooking", "football"):
        assert topics[topic]["oracle_ppl"] < topics[topic]["base_ppl"]
    assert topics["cooking"]["routed_ppl"] == pytest.approx(topics["cooking"]["oracle_ppl"])
    assert topics["cooking"]["routed_to_own"] == 1.0 and topics["football"]["routed_to_own"] == 0.5
    assert topics["astronomy"]["oracle_ppl"] is None
    assert topics["astronomy"]["routed_ppl"] == pytest.approx(topics["astronomy"]["base_ppl"])
    assert scores["overall"]["base_tokens"] == sum(t["base_tokens"] for t in topics.values())
    assert not any("lora" in name for name, _ in model.named_modules())  # the base is given back clean
    assert all(t["dense_ppl"] is None for t in topics.values())

    # a dense baseline is scored on every topic; scoring the cooking expert as one must match its oracle score
    with_dense = evaluate_experts(model, tokenizer, trained, eval_sets, dense_dir=trained["cooking"], seq_len=32,
                                  bf16=False)["topics"]
    assert with_dense["cooking"]["dense_ppl"] == pytest.approx(with_dense["cooking"]["oracle_ppl"])
    assert with_dense["astronomy"]["dense_ppl"] != pytest.approx(with_dense["astronomy"]["base_ppl"])
    with pytest.raises(ValueError, match="not in expert_dirs"):
        evaluate_experts(model, tokenizer, trained, eval_sets, routed={"cooking": ["nope"] * n})


def _manual_mixture_ppl(tiny_base, trained, weights: dict[str, float], texts) -> float:
    """Perplexity of ``texts``, each scored alone on its first 32 tokens (with EOS), under a weighted ``cat``
    adapter built by hand with PEFT on a fresh base (one expert: that adapter; none: the base model)."""
    import math

    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    from moin_hub.hub.loading import adapter_name, quiet_peft

    model, tokenizer = load_base(tiny_base)
    if weights:
        (first, *rest) = weights
        with quiet_peft():
            model = PeftModel.from_pretrained(model, str(trained[first]), adapter_name=adapter_name(first))
            for expert_id in rest:
                model.load_adapter(str(trained[expert_id]), adapter_name=adapter_name(expert_id))
        if rest:
            model.add_weighted_adapter([adapter_name(e) for e in weights], list(weights.values()),
                                       adapter_name="by-hand", combination_type="cat")
            model.set_adapter("by-hand")
    nll, n = 0.0, 0
    with torch.inference_mode():
        for text in texts:  # one text at a time, no padding: an independent check of texts_nll's batching
            ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:32]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            nll += F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="sum").item()
            n += len(ids) - 1
    return math.exp(nll / n)


def test_routing_modes_are_scored_with_mixtures_built_once(trained, tiny_base, monkeypatch):
    from moin_hub.hub.loading import adapter_name
    from moin_hub.hub.mixing import mix_weights
    from moin_hub.pipeline import modes as modes_module
    from moin_hub.pipeline.modes import MIX_DECIMALS

    built = []
    real_weighted = modes_module.weighted_experts

    def counting_weighted(model, mixture):
        built.append((tuple(adapter_name(e) for e in mixture.experts), tuple(mixture.weights)))
        return real_weighted(model, mixture)

    monkeypatch.setattr(modes_module, "weighted_experts", counting_weighted)
    model, tokenizer = load_base(tiny_base)
    eval_sets = {topic: TOPIC_TEXTS[topic] for topic in TOPIC_TEXTS}
    n = len(TOPIC_TEXTS["cooking"])
    # cooking: a confident router (topk's softmax puts ~1e-7 on football); football: two close experts;
    # astronomy (no expert of its own): a tie between the two
    per_topic = {"cooking": [("cooking", 0.9), ("football", 0.1)], "football": [("football", 0.60), ("cooking", 0.58)],
                 "astronomy": [("football", 0.3), ("cooking", 0.3)]}
    ranked = {topic: [cands] * n for topic, cands in per_topic.items()}
    routed = {topic: [cands[0][0]] * n for topic, cands in per_topic.items()}
    scores = evaluate_experts(model, tokenizer, trained, eval_sets, routed=routed, ranked=ranked, seq_len=32,
                              bf16=False)
    # each distinct two-expert mixture was made active once, shared by topk and adaptive and by all its texts;
    # its perplexity is that of PEFT's `cat` adapter built by hand (below)
    assert sorted(built) == [(("moin__football", "moin__cooking"), (0.5, 0.5)),
                             (("moin__football", "moin__cooking"), (0.6, 0.4))]
    topics, overall = scores["topics"], scores["overall"]
    assert scores["mixing"] == {"modes": ["top1", "topk", "adaptive"], "k": 3, "temperature": 0.05, "mass": 0.8,
                                "threshold": None, "decimals": MIX_DECIMALS}
    assert "oracle" not in topics["astronomy"]["modes"]  # no expert of its own
    for s in [*topics.values(), overall]:  # every mode, and the base model, scores the same tokens
        assert len({m["tokens"] for r, m in s["modes"].items() if r != "oracle"}) == 1
        assert s["modes"]["top1"]["mean_experts"] == 1
        assert s["modes"]["base"]["mean_experts"] == 0 and s["modes"]["base"]["base_only"] == 1
    assert topics["football"]["modes"]["base"]["ppl"] == pytest.approx(
        _manual_mixture_ppl(tiny_base, trained, {}, TOPIC_TEXTS["football"]), rel=1e-6)
    # a mixture of one expert with weight 1 is exactly that expert
    cooking = topics["cooking"]["modes"]
    assert cooking["topk"]["ppl"] == cooking["adaptive"]["ppl"] == cooking["top1"]["ppl"] == cooking["oracle"]["ppl"]
    assert cooking["oracle"]["tokens"] == cooking["top1"]["tokens"]
    assert cooking["topk"]["mean_experts"] == 1
    assert cooking["top1"]["ppl"] == pytest.approx(
        _manual_mixture_ppl(tiny_base, trained, {"cooking": 1.0}, TOPIC_TEXTS["cooking"]), rel=1e-6)
    # two experts: the same perplexity as a weighted adapter built by hand with those (rounded) weights
    weights = [round(w, MIX_DECIMALS) for w in mix_weights([0.60, 0.58], mode="topk")]
    assert weights == [0.6, 0.4]
    by_hand = _manual_mixture_ppl(tiny_base, trained, {"football": 0.6, "cooking": 0.4}, TOPIC_TEXTS["football"])
    football = topics["football"]["modes"]
    assert football["topk"]["ppl"] == pytest.approx(by_hand, rel=1e-6)
    assert football["topk"]["ppl"] != pytest.approx(football["top1"]["ppl"], rel=1e-3)  # the mixture is no top1
    assert football["topk"]["mean_experts"] == 2 and football["topk"]["mixtures"] == 1
    assert football["adaptive"]["ppl"] == football["topk"]["ppl"]  # 0.6 < mass 0.8: adaptive takes both too
    tie = _manual_mixture_ppl(tiny_base, trained, {"football": 0.5, "cooking": 0.5}, TOPIC_TEXTS["astronomy"])
    assert topics["astronomy"]["modes"]["topk"]["ppl"] == pytest.approx(tie, rel=1e-6)
    # adaptive: 1 expert for cooking, 2 for football and astronomy
    assert overall["modes"]["adaptive"]["mean_experts"] == pytest.approx(5 / 3)
    assert 1 <= overall["modes"]["adaptive"]["mean_experts"] <= 3
    assert overall["modes"]["topk"]["mixtures"] == 3 and overall["modes"]["top1"]["mixtures"] == 2
    assert not any("lora" in name for name, _ in model.named_modules())  # mixture slot and experts are gone

    # k=1: topk is top1; a threshold leaves the unsure astronomy queries to the base model
    one = evaluate_experts(model, tokenizer, trained, eval_sets, ranked=ranked, modes=("top1", "topk"), k=1,
                           threshold=0.5, seq_len=32, bf16=False)
    for s in [*one["topics"].values(), one["overall"]]:
        assert s["modes"]["topk"]["ppl"] == s["modes"]["top1"]["ppl"]
    astronomy = one["topics"]["astronomy"]
    assert astronomy["modes"]["top1"]["ppl"] == astronomy["modes"]["base"]["ppl"]
    assert astronomy["modes"]["top1"]["base_only"] == 1 and astronomy["modes"]["top1"]["mean_experts"] == 0
    assert one["overall"]["modes"]["top1"]["base_only"] == pytest.approx(1 / 3)
    assert set(one["overall"]["modes"]) == {"top1", "topk", "base", "oracle"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"modes": ("top1", "best")}, "mode"), ({"k": 0}, "k"), ({"mass": 0}, "mass"), ({"temperature": -1}, "temperature"),
    ({"threshold": float("nan")}, "threshold"),
    ({"ranked": {"cooking": [[("cooking", 0.1), ("football", 0.5)]]}}, "sorted best first"),
    ({"ranked": {"cooking": [[("nope", 0.1)]]}}, "not in expert_dirs"),
    ({"ranked": {"cooking": []}}, "candidate lists for 1 texts"),
])
def test_evaluate_experts_refuses_bad_modes_and_rankings(kwargs, message):
    with pytest.raises(ValueError, match=message):  # checked before any model is touched
        evaluate_experts(None, None, {"cooking": "x", "football": "y"}, {"cooking": ["a text"]}, **kwargs)


def test_bf16_auto_follows_the_hardware(monkeypatch):
    from moin_hub.pipeline import scoring as _evaluate

    assert _evaluate.resolve_bf16(True, "cpu") is True and _evaluate.resolve_bf16(False, "cpu") is False
    for fast in (True, False):
        monkeypatch.setattr(_evaluate, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert _evaluate.resolve_bf16("auto", "cpu") is fast
    with pytest.raises(ValueError, match="bf16"):
        _evaluate.resolve_bf16("maybe", "cpu")
