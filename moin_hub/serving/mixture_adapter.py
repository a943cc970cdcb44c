"""A mixture of experts as one LoRA adapter folder, merged once and cached: how vLLM serves ``topk``/``adaptive``.

vLLM applies one LoRA per request. A mixture (:class:`~moin_hub.hub.mixing.Mixture`: expert ids and weights)
is therefore merged into one adapter with PEFT's ``add_weighted_adapter(..., combination_type="cat")``, the
same combination moin-hub's own engine activates (:func:`~moin_hub.hub.mixing.apply_mixture`): the experts'
``A`` matrices stacked, each scaled by its weight and LoRA scaling, their ``B`` matrices side by side, so the
merged update is exactly ``sum_i w_i * delta_i``. Its rank is the SUM of the experts' ranks (two rank-8
experts make a rank-16 adapter): compare :attr:`MergedAdapter.rank` with the server's ``--max-lora-rank``.

The merge needs no base model: PEFT runs on a skeleton holding only the modules the adapters target, whose
shapes come from the adapters' own tensors (the base weights are never read, whatever the base's size).

Each distinct mixture is merged once into ``cache_dir/<name>/``, ``name`` being ``moin-mix-`` + a hash of the
experts' ``(repo_id, commit)`` and their weights rounded to :data:`WEIGHT_DECIMALS` decimals (the order of the
experts does not matter). The folder holds ``adapter_config.json``, ``adapter_model.safetensors`` and
``moin_mixture.json`` (the experts, their commits, weights and ranks, and the sha256 of the two adapter
files, checked before a cached folder is reused).

Serving it: ``POST /v1/load_lora_adapter {"lora_name": merged.name, "lora_path": str(merged.path)}`` (with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), then requests with ``"model": merged.name``. The path is read by the
vLLM server, so ``cache_dir`` must be on a disk it sees (the same machine, or a shared volume). vLLM refuses to
load a name twice (unless ``load_inplace``): since the name is a function of the mixture, a caller keeps track
of what each server holds, or treats "already loaded" as success.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import IncompatibleExpertError
from ..hub.client import sha256_file
from ..hub.config import ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME, ExpertRecord
from ..hub.registry import Registry

logger = logging.getLogger(__name__)

#: The metadata file of a merged folder.
MIXTURE_FILENAME = "moin_mixture.json"
#: Weights are rounded to this many decimals, in the cache key and in the merge itself.
WEIGHT_DECIMALS = 4
NAME_PREFIX = "moin-mix-"
_PEFT_PREFIX = "base_model.model."
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()

#: Where the experts' verified folders come from: a registry, anything with a ``registry`` (an engine), or a
#: function ``record -> folder``.
Source = Registry | Any | Callable[[ExpertRecord], Path]


@dataclass(frozen=True)
class MergedAdapter:
    """A mixture merged into one LoRA adapter folder.

    Attributes:
        path: the folder (``adapter_config.json``, ``adapter_model.safetensors``, ``moin_mixture.json``).
        name: a stable adapter name for the mixture (also the folder's name): load it under this name.
        rank: the merged adapter's LoRA rank, the sum of the experts' ranks (``cat``); vLLM refuses adapters
            whose rank exceeds its ``--max-lora-rank``.
        experts: the experts, in the merge's (canonical) order.
        weights: their weights, rounded to :data:`WEIGHT_DECIMALS` decimals, in the same order.
        created: True when merged by this call, False when the cached folder was reused.
    """

    path: Path
    name: str
    rank: int
    experts: tuple[ExpertRecord, ...]
    weights: tuple[float, ...]
    created: bool


def mixture_name(experts: Sequence[ExpertRecord], weights: Sequence[float]) -> str:
    """The stable name of a mixture: a hash of the experts' ``(repo_id, commit)`` and rounded weights.

    Example:
        >>> from moin_hub.hub.config import ExpertRecord
        >>> a = ExpertRecord("a", "org/a", "1" * 40, (1.0,))
        >>> b = ExpertRecord("b", "org/b", "2" * 40, (1.0,))
        >>> mixture_name([a, b], [0.6, 0.4]) == mixture_name([b, a], [0.4, 0.60000001])
        True
    """
    pairs = _canonical(experts, weights)
    key = json.dumps([[e.repo_id, e.revision, w] for e, w in pairs], separators=(",", ":"))
    return NAME_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:20]


def _canonical(experts: Sequence[ExpertRecord], weights: Sequence[float]) -> list[tuple[ExpertRecord, float]]:
    """Experts sorted by ``(repo_id, commit)`` with their rounded weights; the inputs checked."""
    experts, weights = list(experts), [float(w) for w in weights]
    if not experts or len(experts) != len(weights):
        raise ValueError(f"a mixture needs one weight per expert and at least one expert, got {len(experts)} "
                         f"experts and {len(weights)} weights.")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"mixture weights must be finite and > 0, got {weights}.")
    keys = [(e.repo_id, e.revision) for e in experts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"an expert appears twice in the mixture: {[e.expert_id for e in experts]}.")
    rounded = [round(w, WEIGHT_DECIMALS) for w in weights]
    if any(w <= 0 for w in rounded):
        raise ValueError(f"mixture weights must be >= {10 ** -WEIGHT_DECIMALS} once rounded, got {weights}.")
    return sorted(zip(experts, rounded, strict=True), key=lambda pair: (pair[0].repo_id, pair[0].revision))


def _fetcher(source: Source) -> Callable[[ExpertRecord], Path]:
    """``record -> verified folder`` for a registry, an engine (its registry), or a function."""
    registry = source if isinstance(source, Registry) else getattr(source, "registry", None)
    if isinstance(registry, Registry):
        from ..hub.pull import download_expert

        return lambda record: download_expert(record, endpoint=registry.endpoint, token=registry.token,
                                              base_model=registry.manifest.base_model)
    if callable(source):
        return source
    raise TypeError(f"source must be a Registry, an engine with a registry, or a function record -> folder; "
                    f"got {type(source).__name__}.")


def _lock(name: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(name, threading.Lock())


def materialize_mixture(source: Source, experts: Sequence[ExpertRecord], weights: Sequence[float],
                        cache_dir: str | Path, *, max_rank: int | None = None) -> MergedAdapter:
    """Merge a mixture into one LoRA adapter folder under ``cache_dir``, once; later calls reuse it.

    Args:
        source: where the experts' verified folders come from: a :class:`~moin_hub.Registry` (moin-hub's
            verified pull at each expert's pinned commit), an :class:`~moin_hub.ExpertEngine` (its registry),
            or a function ``record -> folder`` (e.g. a backend's own verified download).
        experts: the experts of the mixture (registry rows), in any order.
        weights: their weights (> 0; rounded to :data:`WEIGHT_DECIMALS` decimals), e.g. ``Mixture.weights``.
        cache_dir: where merged folders are kept (created if needed).
        max_rank: refuse, before downloading or merging, a mixture whose rank would exceed this (vLLM's
            ``--max-lora-rank``); the rank is read from the registry rows.

    Returns:
        A :class:`MergedAdapter`: ``path``, ``name`` (load it under this name) and ``rank``.

    Raises:
        ValueError: no expert, weights that do not match, non-positive weights, an expert twice.
        IncompatibleExpertError: the rank exceeds ``max_rank``; the experts adapt different base models; an
            adapter that is not plain linear LoRA (DoRA, embeddings, extra trained modules).
        and the errors of the verified pull (``IntegrityError`` ...) when ``source`` is a registry or engine.

    Example:
        >>> plan = engine.plan("How long should dough rise?", mode="topk")  # doctest: +SKIP
        >>> records = [engine.registry.get(e) for e in plan.mixture.experts]  # doctest: +SKIP
        >>> merged = materialize_mixture(engine, records, plan.mixture.weights, Path("mixtures"))  # doctest: +SKIP
        >>> merged.name, merged.rank  # then POST /v1/load_lora_adapter {lora_name, lora_path}  # doctest: +SKIP
        ('moin-mix-3f1c...', 16)
    """
    pairs = _canonical(experts, weights)
    name = mixture_name(experts, weights)
    known = [e.lora_rank for e, _ in pairs]
    if max_rank is not None and all(known) and sum(known) > max_rank:
        raise IncompatibleExpertError(
            f"The mixture of {[e.expert_id for e, _ in pairs]} has LoRA rank {sum(known)} (the sum of its experts' "
            f"ranks {known}), above the maximum {max_rank}.", expected=max_rank, actual=sum(known))
    cache_dir = Path(cache_dir)
    target = cache_dir / name
    with _lock(name):
        cached = _read_cached(target)
        if cached is not None:
            return MergedAdapter(target, name, cached, tuple(e for e, _ in pairs), tuple(w for _, w in pairs),
                                 created=False)
        fetch = _fetcher(source)
        folders = [Path(fetch(expert)) for expert, _ in pairs]
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = cache_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            rank = _merge(folders, [w for _, w in pairs], staging, max_rank=max_rank)
            _write_metadata(staging, name, rank, pairs)
            if target.exists():  # a broken folder (failed checks) or another process's: replace a broken one
                if _read_cached(target) is None:
                    shutil.rmtree(target)
            try:
                os.rename(staging, target)
            except OSError:  # another process renamed its own (identical) folder there first
                if _read_cached(target) is None:
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("merged mixture %s (rank %d) of %s", name, rank, [(e.expert_id, w) for e, w in pairs])
        return MergedAdapter(target, name, rank, tuple(e for e, _ in pairs), tuple(w for _, w in pairs),
                             created=True)


def _read_cached(folder: Path) -> int | None:
    """The rank of a complete cached folder whose files match its metadata, else None."""
    try:
        meta = json.loads((folder / MIXTURE_FILENAME).read_text(encoding="utf-8"))
        if all(sha256_file(folder / path) == digest for path, digest in meta["files"].items()):
            return int(meta["rank"])
        logger.warning("cached mixture %s does not match its metadata; merging it again", folder.name)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_metadata(folder: Path, name: str, rank: int, pairs: list[tuple[ExpertRecord, float]]) -> None:
    config = json.loads((folder / ADAPTER_CONFIG_FILENAME).read_text(encoding="utf-8"))
    meta = {
        "name": name,
        "combination_type": "cat",
        "rank": rank,
        "base_model": config.get("base_model_name_or_path"),
        "experts": [{"expert_id": e.expert_id, "repo_id": e.repo_id, "revision": e.revision, "weight": w,
                     "lora_rank": e.lora_rank} for e, w in pairs],
        "files": {f: sha256_file(folder / f) for f in (ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME)},
        "created_by": f"moin-hub {__version__}",
    }
    (folder / MIXTURE_FILENAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _linear_shapes(weights_file: Path, where: str) -> dict[str, tuple[int, int]]:
    """``{module path: (in_features, out_features)}`` of a plain linear LoRA adapter, from its tensors."""
    from safetensors import safe_open

    shapes: dict[str, list[int | None]] = {}
    with safe_open(str(weights_file), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            for part, index in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if key.startswith(_PEFT_PREFIX) and key.endswith(part) and len(shape) == 2:
                    module = key[len(_PEFT_PREFIX):-len(part)]
                    shapes.setdefault(module, [None, None])[0 if part == ".lora_A.weight" else 1] = shape[index]
                    break
            else:
                raise IncompatibleExpertError(f"Expert {where}: tensor {key!r} is not plain linear LoRA; only "
                                              "lora_A/lora_B weights of linear layers can be merged.")
    if not shapes or any(None in pair for pair in shapes.values()):
        raise IncompatibleExpertError(f"Expert {where}: its LoRA tensors come without lora_A/lora_B pairs.")
    return {module: (pair[0], pair[1]) for module, pair in shapes.items()}


def _skeleton(shapes: dict[str, tuple[int, int]]) -> Any:
    """A module tree holding only ``nn.Linear`` layers of these shapes at these paths, with no real weights.

    Each weight is one zero expanded to its shape (no memory): PEFT reads the layers' shapes, device and dtype
    to build LoRA layers, and a ``cat`` merge never reads base weights.
    """
    import torch
    from torch import nn

    root = nn.Module()
    for path, (n_in, n_out) in sorted(shapes.items()):
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        layer = nn.Linear(n_in, n_out, bias=False, device="meta")
        layer.weight = nn.Parameter(torch.zeros((), dtype=torch.float32).expand(n_out, n_in), requires_grad=False)
        node.add_module(leaf, layer)
    return root


def _merge(folders: list[Path], weights: list[float], out: Path, *, max_rank: int | None) -> int:
    """PEFT ``add_weighted_adapter(cat)`` of the adapters in ``folders`` on a skeleton; save to ``out``."""
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from safetensors.torch import save_file

    from ..hub.loading import quiet_peft

    configs = [LoraConfig.from_pretrained(str(folder)) for folder in folders]
    bases = {config.base_model_name_or_path for config in configs}
    if len(bases) != 1:
        raise IncompatibleExpertError(f"The experts of a mixture must adapt one base model, got {sorted(map(str, bases))}.")
    for folder, config in zip(folders, configs, strict=True):
        if config.use_dora or config.modules_to_save:
            raise IncompatibleExpertError(f"Expert {folder.name}: DoRA or extra trained modules cannot be merged.")
    rank = sum(max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs)
    if max_rank is not None and rank > max_rank:
        raise IncompatibleExpertError(f"The mixture has LoRA rank {rank} (the sum of its experts' ranks), above "
                                      f"the maximum {max_rank}.", expected=max_rank, actual=rank)
    shapes: dict[str, tuple[int, int]] = {}
    for folder in folders:
        for module, shape in _linear_shapes(folder / ADAPTER_WEIGHTS_FILENAME, folder.name).items():
            if shapes.setdefault(module, shape) != shape:
                raise IncompatibleExpertError(f"The experts disagree on the shape of {module}: {shapes[module]} "
                                              f"vs {shape}; they cannot adapt the same base model.")
    task_type = configs[0].task_type
    slots = [f"moin__part{i}" for i in range(len(folders))]
    with quiet_peft():
        model = None
        for slot, folder, config in zip(slots, folders, configs, strict=True):
            config.task_type = None  # a plain PeftModel: the skeleton is no causal LM
            config.inference_mode = True
            if model is None:
                model = PeftModel(_skeleton(shapes), config, adapter_name=slot)
            else:
                model.add_adapter(slot, config)
            result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"), adapter_name=slot)
            missing = [k for k in result.missing_keys if slot in k]
            if missing:
                raise IncompatibleExpertError(f"Expert {folder.name}: {len(missing)} LoRA tensors are missing from its "
                                              f"weights file (e.g. {missing[0]!r}).")
        model.add_weighted_adapter(slots, weights, adapter_name="moin__mixture", combination_type="cat")
        state = get_peft_model_state_dict(model, adapter_name="moin__mixture", save_embedding_layers=False)
    merged = model.peft_config["moin__mixture"]
    merged.task_type = task_type
    merged.inference_mode = True
    out.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS_FILENAME),
              metadata={"format": "pt"})
    merged.save_pretrained(str(out))  # adapter_config.json, as PEFT writes it
    return merged.r
