"""moin-hub: Mixture of Introvert Experts on the Hugging Face Hub.

Public API (everything else is internal and may change):

- :class:`Registry` / :func:`init_registry`: the registry dataset that indexes experts.
- :func:`push_expert`: push one expert folder as its own model repo and register it.
- :class:`Router` / :func:`pull` / :func:`load_expert`: route a query, download and load its expert.
- :class:`ExpertEngine`: serve many experts on one base model (adapter cache, mixtures, batched generation).
- :class:`LocalHub`: a Hub-compatible server on loopback for offline work and tests.
- :mod:`moin_hub.errors`: the typed errors all of these raise.

Two documented entry points live in a subpackage: ``moin_hub.serving.space_app`` (``build_app``,
``env_threshold``: the Space's ``app.py``) and ``moin_hub.serving.ray_serve:app_builder`` (Ray Serve's
``serve run``). The implementation is split into stages, each importing only the ones below it:
:mod:`moin_hub.cli` -> :mod:`moin_hub.pipeline` / :mod:`moin_hub.serving` -> :mod:`moin_hub.hub` ->
``errors`` / ``_validators``, with :mod:`moin_hub.local_hub` on its own (README, "Layout").

Heavy dependencies (torch, transformers, faiss) load on first use, so ``import moin_hub`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from ._version import __version__

__all__ = [
    "EmbedderSpec",
    "ExpertEngine",
    "ExpertMetadata",
    "ExpertRecord",
    "LocalHub",
    "PinnedModel",
    "PullResult",
    "Registry",
    "RegistryManifest",
    "Route",
    "Router",
    "__version__",
    "errors",
    "init_registry",
    "load_expert",
    "pull",
    "push_expert",
    "remove_expert",
]

# name -> module that defines it; imported lazily on first attribute access.
_LAZY = {
    "EmbedderSpec": ".hub.config",
    "ExpertEngine": ".serving.engine",
    "ExpertMetadata": ".hub.config",
    "ExpertRecord": ".hub.config",
    "PinnedModel": ".hub.config",
    "RegistryManifest": ".hub.config",
    "LocalHub": ".local_hub.server",
    "Registry": ".hub.registry",
    "init_registry": ".hub.registry",
    "push_expert": ".hub.push",
    "remove_expert": ".hub.push",
    "Route": ".hub.router",
    "Router": ".hub.router",
    "PullResult": ".hub.pull",
    "pull": ".hub.pull",
    "load_expert": ".hub.loading",
}

if TYPE_CHECKING:  # pragma: no cover
    from .hub.config import EmbedderSpec, ExpertMetadata, ExpertRecord, PinnedModel, RegistryManifest
    from .hub.loading import load_expert
    from .hub.pull import PullResult, pull
    from .hub.push import push_expert, remove_expert
    from .hub.registry import Registry, init_registry
    from .hub.router import Route, Router
    from .local_hub.server import LocalHub
    from .serving.engine import ExpertEngine


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moin_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
