"""An expert folder on disk: reading it, checking it, and the safety rules for its files.

An expert folder holds::

    adapter_config.json          PEFT LoRA config (base_model_name_or_path = the base's Hub id)
    adapter_model.safetensors    LoRA weights (never a pickle)
    centroid.safetensors         tensor "centroid": float32[dim], the topic centroid
    moin_expert.json             ExpertMetadata: id, keywords, sizes, perplexities, samples

The same rules check a downloaded expert before it is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .._validators import validate_vector
from ..errors import InvalidExpertError, UnsafeFileError
from .config import (
    ADAPTER_CONFIG_FILENAME,
    ADAPTER_WEIGHTS_FILENAME,
    CENTROID_FILENAME,
    EXPERT_METADATA_FILENAME,
    ExpertMetadata,
)

#: File suffixes that may hold pickles; moin-hub never loads them and refuses folders that ship them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")


def refuse_pickles(paths: list[str], *, where: str) -> None:
    """Raise :class:`UnsafeFileError` if any of ``paths`` may be a pickle."""
    for name in paths:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeFileError(
                f"{where}/{name}", "pickle-based files are never loaded; save the adapter with safetensors"
            )


def write_centroid(path: str | Path, centroid: np.ndarray) -> None:
    """Write a centroid as ``centroid.safetensors`` (tensor ``"centroid"``, float32)."""
    vector = validate_vector(centroid)
    save_file({"centroid": vector}, str(path), metadata={"format": "moin-centroid"})


def read_centroid(path: str | Path, *, dim: int | None = None) -> np.ndarray:
    """Read and check the centroid tensor of ``centroid.safetensors``.

    Raises:
        InvalidExpertError: if the file is not safetensors or has no ``"centroid"`` tensor.
        EmbedderMismatchError: if ``dim`` is given and differs.
    """
    try:
        with safe_open(str(path), framework="numpy") as handle:
            if "centroid" not in handle.keys():
                raise InvalidExpertError(str(path), "centroid.safetensors has no tensor named 'centroid'")
            vector = handle.get_tensor("centroid")
    except (SafetensorError, OSError) as err:
        raise InvalidExpertError(str(path), f"cannot read centroid: {err}") from None
    return validate_vector(vector.reshape(-1), dim=dim, field="centroid")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidExpertError(str(path), f"cannot parse {path.name}: {err}") from None
    if not isinstance(data, dict):
        raise InvalidExpertError(str(path), f"{path.name} must hold a JSON object")
    return data


@dataclass
class LoraSummary:
    """What the registry records of an adapter's LoRA config."""

    base_model: str
    base_revision: str | None
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


def summarize_adapter_config(config: dict[str, Any], *, where: str) -> LoraSummary:
    """Check an ``adapter_config.json`` dict is a LoRA config and summarise it."""
    if config.get("peft_type") != "LORA":
        raise InvalidExpertError(where, f"peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InvalidExpertError(where, "adapter_config.json has no base_model_name_or_path")
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):  # peft allows a regex string
        targets = (targets,)
    try:
        rank = int(config.get("r", 0))
        alpha = float(config.get("lora_alpha", 0.0))
    except (TypeError, ValueError):
        raise InvalidExpertError(where, "adapter_config.json has a non-numeric r or lora_alpha") from None
    return LoraSummary(base, config.get("revision"), rank, alpha, tuple(sorted(targets)))


def check_adapter_weights(path: Path) -> int:
    """Check that ``adapter_model.safetensors`` is safetensors with LoRA tensors; return its tensor count."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise InvalidExpertError(str(path), f"not a readable safetensors file: {err}") from None
    if not any("lora_" in key for key in keys):
        raise InvalidExpertError(str(path), "holds no LoRA tensors (no key contains 'lora_')")
    return len(keys)


@dataclass
class ExpertFolder:
    """A checked expert folder, ready to push.

    Use :meth:`ExpertFolder.read`; it raises on the first problem it finds.
    """

    path: Path
    metadata: ExpertMetadata
    centroid: np.ndarray
    lora: LoraSummary
    adapter_config: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path, *, dim: int | None = None) -> ExpertFolder:
        """Read and check an expert folder.

        Args:
            path: the folder.
            dim: the registry embedder's dimension; the centroid must match it.

        Raises:
            InvalidExpertError: a file is missing or malformed.
            UnsafeFileError: the folder ships a pickle.
            EmbedderMismatchError: the centroid's dimension differs from ``dim``.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise InvalidExpertError(str(folder), "not a folder")
        refuse_pickles([p.name for p in folder.iterdir()], where=str(folder))
        for name in (ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME, CENTROID_FILENAME, EXPERT_METADATA_FILENAME):
            if not (folder / name).is_file():
                raise InvalidExpertError(str(folder), f"missing {name}")
        adapter_config = _read_json(folder / ADAPTER_CONFIG_FILENAME)
        lora = summarize_adapter_config(adapter_config, where=str(folder / ADAPTER_CONFIG_FILENAME))
        check_adapter_weights(folder / ADAPTER_WEIGHTS_FILENAME)
        centroid = read_centroid(folder / CENTROID_FILENAME, dim=dim)
        try:
            metadata = ExpertMetadata.from_dict(_read_json(folder / EXPERT_METADATA_FILENAME))
        except ValueError as err:
            raise InvalidExpertError(str(folder / EXPERT_METADATA_FILENAME), str(err)) from None
        return cls(folder, metadata, centroid, lora, adapter_config)

    @property
    def adapter_bytes(self) -> int:
        """Size of the adapter weights file in bytes."""
        return (self.path / ADAPTER_WEIGHTS_FILENAME).stat().st_size
