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
        default=("q_proj", "v_proj"), metadata={"help": "Module names that get LoRA (same for all experts)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training block."})
    batch_size: int = field(default=4, metadata={"help": "Blocks per optimizer step."})
    tokens_per_expert: int = field(
        default=200_000, metadata={"help": "Token budget: train ceil(budget / (seq_len * batch_size)) steps, "
                                           "repeating the topic's blocks (epochs) as needed."})
    max_steps: int | None = field(default=None, metadata={"help": "Cap on optimizer steps (None: the budget decides)."})
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
        self.weight_decay = _check_range(self.weight_decay, field="weight_decay", low=0)
        if self.grad_clip is not None:
            self.grad_clip = _check_range(self.grad_clip, field="grad_clip", low=0, low_open=True)
        self._check_choices()

    def _check_choices(self) -> None:
        modules = self.target_modules
        if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {modules!r}.")
        self.target_modules = tuple(modules)
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
    """

    expert_id: str
    texts: list[str]
    centroid: np.ndarray
    keywords: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    title: str = ""
    eval_texts: list[str] | None = None

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
