"""Config dataclasses of the saved artefacts: registry manifest, expert metadata, registry rows.

Each dataclass documents its fields (``metadata={"help": ...}``), checks itself in ``__post_init__``,
round-trips through ``to_dict`` / ``from_dict``, and stamps the producing moin-hub version.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

import numpy as np

from .._validators import (
    is_commit_sha,
    short_repr,
    validate_commit_sha,
    validate_finite_or_none,
    validate_positive_int,
    validate_relative_path,
    validate_repo_id,
)
from .._version import __version__

#: Version of the registry layout this code writes (2: sharded rows under ``data/``, see hub/shards.py).
REGISTRY_FORMAT_VERSION = 2
#: Layout versions this code reads (1: one ``experts.parquet``).
READABLE_FORMAT_VERSIONS = (1, 2)
REGISTRY_FORMAT_NAME = "moin-registry"
MANIFEST_FILENAME = "moin_registry.json"
EXPERTS_FILENAME = "experts.parquet"
EXPERT_METADATA_FILENAME = "moin_expert.json"
CENTROID_FILENAME = "centroid.safetensors"
ADAPTER_CONFIG_FILENAME = "adapter_config.json"
ADAPTER_WEIGHTS_FILENAME = "adapter_model.safetensors"
#: Files of an expert repo whose sha256 the registry records and `pull` verifies.
VERIFIED_EXPERT_FILES = (
    ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME, CENTROID_FILENAME, EXPERT_METADATA_FILENAME,
)

#: Folder of a registry repo holding plot images shown in its card, and the image suffixes allowed there.
PLOTS_DIR = "plots"
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".webp")

_EXPERT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T", bound="_Serializable")


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string with seconds precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def validate_expert_id(expert_id: str) -> str:
    """Check an expert id: 1-96 chars of letters, digits, '.', '_' or '-', starting alphanumeric."""
    if not isinstance(expert_id, str) or not _EXPERT_ID_RE.match(expert_id):
        raise ValueError(
            f"expert_id={short_repr(expert_id)} must be 1-96 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return expert_id


def validate_similarity_stats(mean: float | None, std: float | None) -> tuple[float | None, float | None]:
    """Check an expert's similarity statistics: both or neither, finite, ``-1 <= mean <= 1``, ``std > 0``."""
    if mean is None and std is None:
        return None, None
    mean = validate_finite_or_none(mean, field="sim_mean")
    std = validate_finite_or_none(std, field="sim_std")
    if mean is None or std is None:
        raise ValueError("sim_mean and sim_std go together; give both or neither.")
    if not -1.0 <= mean <= 1.0 or std <= 0:
        raise ValueError(f"sim_mean={mean!r} must be in [-1, 1] and sim_std={std!r} positive.")
    return float(mean), float(std)


def similarity_stats(vectors: np.ndarray, centroid: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the cosines of ``vectors`` (rows) to ``centroid``.

    Example:
        >>> similarity_stats(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1.0, 1.0]))
        (0.707107, 1e-06)
    """
    rows = np.asarray(vectors, dtype=np.float64)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    center = np.asarray(centroid, dtype=np.float64)
    sims = rows @ (center / np.linalg.norm(center))
    return round(float(sims.mean()), 6), round(max(float(sims.std()), 1e-6), 6)


class _Serializable:
    """Mixin: ``to_dict`` / ``from_dict`` that refuse unknown keys and name missing ones."""

    _kind: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ValueError(f"{cls._kind} must be a JSON object, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls._kind} has unknown field(s) {unknown}; known: {sorted(names)}.")
        try:
            return cls(**data)
        except TypeError as err:  # a missing required field
            raise ValueError(f"{cls._kind}: {err}") from None


@dataclass(frozen=True)
class PinnedModel(_Serializable):
    """A Hub model pinned to a commit: the base model or the embedder of a registry."""

    _kind: ClassVar[str] = "pinned model"

    repo_id: str = field(metadata={"help": "Hub model id, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'."})
    revision: str = field(metadata={"help": "Full 40-hex commit sha the registry is pinned to."})

    def __post_init__(self) -> None:
        validate_repo_id(self.repo_id, field=f"{self._kind}.repo_id", namespaced=False)
        validate_commit_sha(self.revision, field=f"{self._kind}.revision")


@dataclass(frozen=True)
class EmbedderSpec(PinnedModel):
    """The sentence embedder that makes centroids and query vectors, pinned to a commit."""

    _kind: ClassVar[str] = "embedder"

    dim: int = field(default=0, metadata={"help": "Embedding dimension (384 for all-MiniLM-L6-v2)."})
    normalize: bool = field(default=True, metadata={"help": "Vectors are L2-normalised before search."})

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_positive_int(self.dim, field="embedder.dim")


@dataclass(frozen=True)
class RegistryManifest(_Serializable):
    """Contents of ``moin_registry.json``: what every expert of a registry must agree on.

    Example:
        >>> m = RegistryManifest(base_model=PinnedModel("org/base", "a" * 40),
        ...                      embedder=EmbedderSpec("org/emb", "b" * 40, dim=384))
        >>> RegistryManifest.from_dict(m.to_dict()) == m
        True
    """

    _kind: ClassVar[str] = "registry manifest"

    base_model: PinnedModel = field(metadata={"help": "The frozen base model every expert adapts."})
    embedder: EmbedderSpec = field(metadata={"help": "The embedder of centroids and queries."})
    distance: str = field(default="cosine", metadata={"help": "Routing similarity; only 'cosine' in v1."})
    format: str = field(default=REGISTRY_FORMAT_NAME, metadata={"help": "Always 'moin-registry'."})
    format_version: int = field(default=REGISTRY_FORMAT_VERSION, metadata={"help": "Layout version."})
    created_by: str = field(default=f"moin-hub {__version__}", metadata={"help": "Producer and version."})
    created_at: str = field(default_factory=utc_now, metadata={"help": "ISO-8601 UTC creation time."})
    description: str = field(default="", metadata={"help": "Free text shown on the registry card."})
    default_threshold: float | None = field(default=None, metadata={
        "help": "Calibrated routing threshold on the experts' z-scores (set by `moin-hub registry calibrate`)."})
    calibration: dict | None = field(default=None, metadata={
        "help": "How default_threshold was chosen: query counts, kept and rejected rates."})
    fallback: dict | None = field(default=None, metadata={
        "help": "The fallback expert's row (e.g. branch-train's shared seed): a routed query below the threshold "
                "gets it instead of the bare base model. Never routed to by its centroid."})

    def __post_init__(self) -> None:
        if self.fallback is not None:  # kept as the row's JSON form, so that manifests compare equal
            try:
                record = (self.fallback if isinstance(self.fallback, ExpertRecord)
                          else ExpertRecord.from_dict(dict(self.fallback)))
            except (TypeError, ValueError) as err:
                raise ValueError(f"fallback is not a valid expert row: {err}") from None
            object.__setattr__(self, "fallback", json.loads(json.dumps(record.to_dict())))
        if self.default_threshold is not None:
            object.__setattr__(self, "default_threshold",
                               validate_finite_or_none(self.default_threshold, field="default_threshold"))
        # from_dict hands nested dicts: turn them into their dataclasses.
        if isinstance(self.base_model, dict):
            object.__setattr__(self, "base_model", PinnedModel.from_dict(self.base_model))
        if isinstance(self.embedder, dict):
            object.__setattr__(self, "embedder", EmbedderSpec.from_dict(self.embedder))
        if self.format != REGISTRY_FORMAT_NAME:
            raise ValueError(f"format={self.format!r} is not a moin registry ({REGISTRY_FORMAT_NAME!r}).")
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"format_version={self.format_version!r} is not supported by moin-hub {__version__} "
                f"(reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); upgrade moin-hub."
            )
        if self.distance != "cosine":
            raise ValueError(f"distance={self.distance!r} is not supported; only 'cosine'.")


@dataclass
class ExpertMetadata(_Serializable):
    """Contents of ``moin_expert.json`` in an expert folder: what a trained expert knows about itself.

    The centroid itself lives in ``centroid.safetensors`` (tensor ``"centroid"``).
    """

    _kind: ClassVar[str] = "expert metadata"

    expert_id: str = field(metadata={"help": "Short id, unique in a registry, e.g. 'topic-03'."})
    keywords: list[str] = field(default_factory=list, metadata={"help": "Topic keywords (c-TF-IDF)."})
    n_docs: int = field(default=0, metadata={"help": "Training documents in this topic."})
    n_tokens: int = field(default=0, metadata={"help": "Training tokens the expert saw."})
    perplexity: float | None = field(default=None, metadata={"help": "Expert perplexity on held-out text."})
    base_perplexity: float | None = field(default=None, metadata={"help": "Base model perplexity, same text."})
    eval_tokens: int = field(default=0, metadata={"help": "Held-out tokens behind the two perplexities."})
    samples: list[str] = field(default_factory=list, metadata={"help": "A few sample documents of the topic."})
    title: str = field(default="", metadata={"help": "Optional human title of the topic."})
    created_by: str = field(default=f"moin-hub {__version__}", metadata={"help": "Producer and version."})
    sim_mean: float | None = field(default=None, metadata={
        "help": "Mean cosine of the topic's own documents to its centroid (calibrates routing scores)."})
    sim_std: float | None = field(default=None, metadata={"help": "Standard deviation of those cosines (> 0)."})

    def __post_init__(self) -> None:
        validate_expert_id(self.expert_id)
        self.sim_mean, self.sim_std = validate_similarity_stats(self.sim_mean, self.sim_std)
        if not isinstance(self.keywords, list) or not all(isinstance(k, str) for k in self.keywords):
            raise ValueError(f"keywords must be a list of strings, got {self.keywords!r}.")
        if not isinstance(self.samples, list) or not all(isinstance(s, str) for s in self.samples):
            raise ValueError("samples must be a list of strings.")
        for name in ("n_docs", "n_tokens", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {short_repr(value)}.")
        self.perplexity = validate_finite_or_none(self.perplexity, field="perplexity")
        self.base_perplexity = validate_finite_or_none(self.base_perplexity, field="base_perplexity")


@dataclass(frozen=True)
class FileDigest(_Serializable):
    """A file of an expert repo with its size and sha256, as recorded in the registry."""

    _kind: ClassVar[str] = "file digest"

    path: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        validate_relative_path(self.path, field="file.path")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise ValueError(f"file {self.path!r}: sha256={self.sha256!r} is not 64 lowercase hex digits.")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"file {self.path!r}: size={self.size!r} must be a non-negative integer.")


@dataclass(frozen=True)
class ExpertRecord(_Serializable):
    """One row of ``experts.parquet``: an expert, where it lives, and how to verify it."""

    _kind: ClassVar[str] = "expert record"

    expert_id: str = field(metadata={"help": "Id unique in the registry."})
    repo_id: str = field(metadata={"help": "Hub model repo holding the adapter."})
    revision: str = field(metadata={"help": "Pinned 40-hex commit sha of that repo."})
    centroid: tuple[float, ...] = field(metadata={"help": "Topic centroid in the embedder's space."})
    keywords: tuple[str, ...] = ()
    n_docs: int = 0
    n_tokens: int = 0
    perplexity: float | None = None
    base_perplexity: float | None = None
    lora_rank: int = 0
    lora_alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    adapter_bytes: int = 0
    files: tuple[FileDigest, ...] = ()
    title: str = ""
    created_at: str = field(default_factory=utc_now)
    created_by: str = f"moin-hub {__version__}"
    sim_mean: float | None = field(default=None, metadata={
        "help": "Mean cosine of the expert's own documents (or examples) to its centroid."})
    sim_std: float | None = field(default=None, metadata={"help": "Standard deviation of those cosines."})

    def __post_init__(self) -> None:
        sim_mean, sim_std = validate_similarity_stats(self.sim_mean, self.sim_std)
        object.__setattr__(self, "sim_mean", sim_mean)
        object.__setattr__(self, "sim_std", sim_std)
        validate_expert_id(self.expert_id)
        validate_repo_id(self.repo_id, field="repo_id")
        if not is_commit_sha(self.revision):
            raise ValueError(f"expert {self.expert_id!r}: revision={self.revision!r} is not a 40-hex commit sha.")
        # stored as float32 in parquet: round here so that records round-trip exactly
        object.__setattr__(self, "centroid", tuple(np.asarray(self.centroid, dtype=np.float32).tolist()))
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        files = tuple(f if isinstance(f, FileDigest) else FileDigest.from_dict(dict(f)) for f in self.files)
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "perplexity", validate_finite_or_none(self.perplexity, field="perplexity"))
        object.__setattr__(
            self, "base_perplexity", validate_finite_or_none(self.base_perplexity, field="base_perplexity")
        )

    def calibrated(self, similarity: float) -> float | None:
        """A query's similarity as a z-score against the expert's own documents, or None without statistics.

        Example:
            >>> r = ExpertRecord("e", "org/e", "a" * 40, (1.0, 0.0), sim_mean=0.6, sim_std=0.1)
            >>> round(r.calibrated(0.4), 6)
            -2.0
        """
        if self.sim_mean is None or self.sim_std is None:
            return None
        return (similarity - self.sim_mean) / self.sim_std

    @property
    def digests(self) -> dict[str, str]:
        """``{path: sha256}`` of the files `pull` verifies."""
        return {f.path: f.sha256 for f in self.files}
