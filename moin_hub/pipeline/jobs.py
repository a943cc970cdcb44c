"""What the training step takes: how every expert is trained (:class:`TrainConfig`) and one expert's data
(:class:`TopicJob`). Both are checked when made, and :class:`TrainConfig` is stamped into every expert's
``training.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .._validators import validate_finite_or_none, validate_positive_int, validate_vector
from ..hub.config import _Serializable, validate_expert_id

SCHEDULES = ("cosine", "linear", "constant")
#: The ``target_modules`` value that adapts every linear layer but the output head (PEFT's shorthand).
ALL_LINEAR = "all-linear"


def _check_range(value: Any, *, field: str, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = True) -> float:
    """Check that ``value`` is a finite real number in the given interval and return it as float."""
    number = validate_finite_or_none(value, field=field)
    if number is None or isinstance(value, bool):
        raise ValueError(f"{field} must be a number, got {value!r}.")
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{field} must be in {interval}, got {value!r}.")
    return number


def _optional_positive_int(value: int | None, *, field: str) -> None:
    if value is not None:
        validate_positive_int(value, field=field)


@dataclass
class TrainConfig(_Serializable):
    """How every expert is trained. Keep it the SAME for all experts of a registry: equal rank and
    target modules let a server hot-swap adapters in place.

    The default learning rate, 5e-4, is at the high end of what LoRA uses (the LoRA paper: 2e-4 for
    GPT-2 M/L, 4e-4 to 5e-4 for RoBERTa), because an expert gets only ~200 steps (200k tokens of
    4x256-token batches); with warmup, cosine decay and gradient clipping at 1.0 that is stable on
    SmolLM2-135M, and lower rates leave much of the topic's gain on the table in so few steps.

    Example:
        >>> TrainConfig(rank=16, alpha=32, tokens_per_expert=50_000).steps
        49
        >>> TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
        True
    """

    _kind: ClassVar[str] = "train config"

    rank: int = field(default=8, metadata={"help": "LoRA rank r (same for all experts)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)."})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={"help": "Module names that get LoRA (same for all experts), or ('all-linear',): every linear "
                          "layer but the output head, as the MoIN paper adapts them."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training block."})
    batch_size: int = field(default=4, metadata={"help": "Blocks per optimizer step."})
    tokens_per_expert: int = field(
        default=200_000, metadata={"help": "Token budget: train ceil(budget / (seq_len * batch_size)) steps, "
                                           "repeating the topic's blocks (epochs) as needed."})
    max_steps: int | None = field(default=None, metadata={"help": "Cap on optimizer steps (None: the budget decides)."})
    seed_fraction: float = field(
        default=0.75, metadata={"help": "Branch-train: the share, in [0, 1), of the TOTAL budget (topics x "
                                        "tokens_per_expert) spent first on one shared seed LoRA trained on all "
                                        "topics; every expert starts from the seed and spends the rest of its "
                                        "share on its topic alone. 0: experts start from scratch (plain MoIN, "
                                        "as the paper). The default 0.75 is the best of the measured fractions "
                                        "(README, 'Do experts beat one LoRA?')."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of the steps with linear warmup."})
    schedule: str = field(default="cosine", metadata={"help": "Decay after warmup: 'cosine', 'linear' or 'constant'."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the LoRA weights."})
    grad_clip: float | None = field(default=1.0, metadata={"help": "Max gradient norm (None: no clipping)."})
    seed: int = field(default=0, metadata={"help": "Seed of the LoRA init and of the block order."})
    bf16: bool | str = field(
        default="auto", metadata={"help": "Autocast to bf16: True, False or 'auto' (a CPU with fast bf16 kernels, "
                                           "or a CUDA GPU with bf16; an AVX2-only CPU is ~30x slower in bf16)."})
    torch_threads: int | None = field(
        default=None, metadata={"help": "torch threads per expert (None: cores // workers; all cores in-process)."})
    device: str | None = field(default=None, metadata={"help": "'cpu', 'cuda', ... (None: cuda if available)."})
    eval_max_tokens: int | None = field(
        default=20_000, metadata={"help": "Held-out tokens scored for the expert's perplexity (None: all)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass when scoring."})

    def __post_init__(self) -> None:
        for name in ("rank", "seq_len", "batch_size", "tokens_per_expert", "eval_batch_size"):
            validate_positive_int(getattr(self, name), field=name)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len!r}.")
        for name in ("max_steps", "torch_threads", "eval_max_tokens"):
            _optional_positive_int(getattr(self, name), field=name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}.")
        self.alpha = _check_range(self.alpha, field="alpha", low=0, low_open=True)
        self.dropout = _check_range(self.dropout, field="dropout", low=0, high=1)
        self.learning_rate = _check_range(self.learning_rate, field="learning_rate", low=0, high=1, low_open=True)
        self.warmup_ratio = _check_range(self.warmup_ratio, field="warmup_ratio", low=0, high=1)
        self.seed_fraction = _check_range(self.seed_fraction, field="seed_fraction", low=0, high=1)
        self.weight_decay = _check_range(self.weight_decay, field="weight_decay", low=0)
        if self.grad_clip is not None:
            self.grad_clip = _check_range(self.grad_clip, field="grad_clip", low=0, low_open=True)
        self._check_choices()

    def _check_choices(self) -> None:
        modules = self.target_modules
        if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {modules!r}.")
        self.target_modules = tuple(modules)
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"target_modules: {ALL_LINEAR!r} stands alone, got {modules!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not (isinstance(self.bf16, bool) or self.bf16 == "auto"):
            raise ValueError(f"bf16 must be True, False or 'auto', got {self.bf16!r}.")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device must be a string like 'cpu' or 'cuda:0', got {self.device!r}.")

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step: ``seq_len * batch_size``."""
        return self.seq_len * self.batch_size

    @property
    def steps(self) -> int:
        """Optimizer steps of one expert: the token budget in whole steps, capped by ``max_steps``."""
        steps = math.ceil(self.tokens_per_expert / self.tokens_per_step)
        return min(steps, self.max_steps) if self.max_steps else steps

    @property
    def peft_target_modules(self) -> str | list[str]:
        """``target_modules`` as PEFT's ``LoraConfig`` takes it (``"all-linear"`` or a list of names)."""
        return ALL_LINEAR if self.target_modules == (ALL_LINEAR,) else list(self.target_modules)


@dataclass(frozen=True)
class Phase:
    """The steps and learning-rate schedule of one LoRA's training: linear warmup over ``warmup`` steps, then
    ``schedule`` (cosine / linear decay to 0, or constant) until ``steps``."""

    name: str
    steps: int
    warmup: int
    schedule: str

    def __post_init__(self) -> None:
        validate_positive_int(self.steps, field="steps")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}], got {self.warmup!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "warmup": self.warmup, "schedule": self.schedule}


def scratch_phase(config: TrainConfig, steps: int | None = None, name: str = "expert") -> Phase:
    """An ordinary run of ``steps`` steps (default ``config.steps``): warmup, then ``config.schedule``."""
    steps = config.steps if steps is None else steps
    return Phase(name, steps, min(steps, round(config.warmup_ratio * steps)), config.schedule)


@dataclass(frozen=True)
class Budget:
    """The token accounting of one training run, in whole optimizer steps of ``tokens_per_step`` tokens.

    A shared seed (``seed_steps``, on all topics) and ``topics`` experts (``expert_steps`` each, on their
    topic alone) together take exactly the dense baseline's steps: ``seed_steps + topics * expert_steps ==
    dense_steps == topics * TrainConfig.steps``.

    Example:
        >>> b = plan_budget(TrainConfig(tokens_per_expert=4096, batch_size=2, seed_fraction=0.5), topics=6)
        >>> (b.seed_steps, b.expert_steps, b.dense_steps)
        (24, 4, 48)
        >>> b.seed_tokens + b.topics * b.expert_tokens == b.dense_tokens
        True
    """

    topics: int
    tokens_per_step: int
    seed_steps: int
    expert_steps: int

    @property
    def dense_steps(self) -> int:
        return self.seed_steps + self.topics * self.expert_steps

    @property
    def seed_tokens(self) -> int:
        return self.seed_steps * self.tokens_per_step

    @property
    def expert_tokens(self) -> int:
        return self.expert_steps * self.tokens_per_step

    @property
    def dense_tokens(self) -> int:
        return self.dense_steps * self.tokens_per_step

    @property
    def seed_fraction(self) -> float:
        """The seed's actual share of the total (the asked fraction, rounded to whole steps per topic)."""
        return self.seed_steps / self.dense_steps

    def expert_phase(self, config: TrainConfig) -> Phase:
        """How each expert trains: from scratch (warmup, then the config's decay) or, after a seed, as the
        seed's continuation: no second warmup, the decay over the branch's own steps. Seed + branch are
        then one warmup-stable-decay run whose decay is spent on the expert's topic alone."""
        if not self.seed_steps:
            return scratch_phase(config, self.expert_steps)
        return Phase("branch", self.expert_steps, 0, config.schedule)

    def seed_phase(self, config: TrainConfig) -> Phase | None:
        """How the shared seed trains (None without one): the warmup the dense run would have, then a constant
        learning rate; the decay is left to the experts that branch from it."""
        if not self.seed_steps:
            return None
        return Phase("seed", self.seed_steps, min(self.seed_steps, round(config.warmup_ratio * self.dense_steps)),
                     "constant")

    def dense_phase(self, config: TrainConfig) -> Phase:
        """How the dense baseline trains: all ``dense_steps`` as one ordinary run (warmup, then decay)."""
        return scratch_phase(config, self.dense_steps, "dense")

    def to_dict(self) -> dict[str, Any]:
        return {"topics": self.topics, "tokens_per_step": self.tokens_per_step, "seed_steps": self.seed_steps,
                "expert_steps": self.expert_steps, "dense_steps": self.dense_steps, "seed_tokens": self.seed_tokens,
                "expert_tokens": self.expert_tokens, "dense_tokens": self.dense_tokens,
                "seed_fraction": round(self.seed_fraction, 6)}


def plan_budget(config: TrainConfig, topics: int) -> Budget:
    """Split the run's total budget (``topics`` x ``config.steps`` steps) into a seed and the experts' branches.

    Each topic gives ``round(seed_fraction * steps)`` of its steps to the seed (at least 1 when
    ``seed_fraction > 0``, and never all of them: an expert keeps at least one step on its topic).

    Raises:
        ValueError: ``topics`` is not a positive integer, or a branch-train run whose experts have a single
            step each (nothing to give the seed).
    """
    validate_positive_int(topics, field="topics")
    per_topic = config.steps
    to_seed = 0
    if config.seed_fraction > 0:
        if per_topic < 2:
            raise ValueError(f"seed_fraction={config.seed_fraction}: each expert has only {per_topic} step; "
                             "give a larger tokens_per_expert to branch from a seed.")
        to_seed = min(per_topic - 1, max(1, round(config.seed_fraction * per_topic)))
    return Budget(topics=topics, tokens_per_step=config.tokens_per_step, seed_steps=topics * to_seed,
                  expert_steps=per_topic - to_seed)


@dataclass
class TopicJob:
    """One expert to train: a topic's documents, its centroid, and what its card shows.

    Args:
        expert_id: id of the expert (and name of its folder).
        texts: training documents of the topic.
        centroid: the topic's centroid in the embedder's space (written to ``centroid.safetensors``).
        keywords / samples / title: copied into ``moin_expert.json``.
        eval_texts: held-out documents; when given, the expert's and the base model's perplexity on them
            are measured and recorded.
        sim_mean / sim_std: how close the topic's own queries are to its centroid (cosine mean and
            standard deviation), copied into ``moin_expert.json`` so the registry row calibrates routing
            scores (:meth:`~moin_hub.ExpertRecord.calibrated`); None: not measured.
    """

    expert_id: str
    texts: list[str]
    centroid: np.ndarray
    keywords: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    title: str = ""
    eval_texts: list[str] | None = None
    sim_mean: float | None = None
    sim_std: float | None = None

    def __post_init__(self) -> None:
        validate_expert_id(self.expert_id)
        where = f"job {self.expert_id!r}"
        for name in ("texts", "eval_texts", "keywords", "samples"):
            value = getattr(self, name)
            if value is None and name == "eval_texts":
                continue
            if isinstance(value, str) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"{where}: {name} must be a list of strings.")
            setattr(self, name, list(value))
        if not self.texts:
            raise ValueError(f"{where}: texts is empty; an expert needs training documents.")
        self.centroid = validate_vector(self.centroid, field=f"{where}: centroid")
