"""A vLLM LoRA resolver plugin: a plain vLLM server serves registry experts by name, verified.

vLLM resolves a request whose ``model`` is no served model and no loaded adapter through the LoRA resolvers
registered with ``vllm.lora.resolver.LoRAResolverRegistry`` (only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``).
moin-hub registers one through vLLM's general plugin entry point group (``vllm.general_plugins``, name
``moin_hub``, see ``pyproject.toml``). Given a name, it:

1. looks the name up in the registry's rows (an expert id or a repo id; anything else is left to the next
   resolver, and vLLM answers 404);
2. downloads that expert through moin-hub's verified pull (:func:`~moin_hub.hub.pull.download_expert`): the
   registry's pinned commit, the sha256 of every file, no pickle in the repo at that commit, an adapter made
   for the registry's base model;
3. returns a ``LoRARequest`` for the verified folder (in the HF cache of the vLLM process).

A tampered adapter (``IntegrityError``), a foreign one (``BaseModelMismatchError``) or a pickle
(``UnsafeFileError``) raises before vLLM sees a path: vLLM turns these ``ValueError`` subclasses into a 400
answer carrying the message, and loads nothing. Unlike vLLM's own Hub resolver, nothing unpinned or
unverified is ever handed to the engine.

Configuration (environment of the vLLM server):

- ``MOIN_REGISTRY``: the registry id (``org/name``). Unset: the plugin registers nothing (so installing
  moin-hub into a vLLM environment changes nothing for servers that do not ask for it);
- ``MOIN_REGISTRY_REVISION``: pin the registry to a branch, tag or commit (default: the head of main, read
  again at each resolution, so that experts pushed later are found);
- ``HF_ENDPOINT`` / ``HF_TOKEN`` / ``HF_HUB_CACHE``: the Hub client's usual settings.

Run it::

    MOIN_REGISTRY=acme/moin-registry VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_PLUGINS=moin_hub \\
        vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 8

then ask for ``"model": "<expert id>"``. vLLM loads general plugins in every process it starts, so importing
this module is cheap: no torch, faiss, sentence-transformers or vLLM, not even moin-hub's Hub modules (they
load on the first resolution, which needs only the registry rows). vLLM itself is imported only by
:func:`register` and :meth:`MoinRegistryResolver.resolve_lora`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._validators import validate_repo_id
from ..errors import ExpertNotFoundError, HubUnavailableError

if TYPE_CHECKING:  # the Hub modules load on the first resolution: a server without MOIN_REGISTRY pays nothing
    from ..hub.config import ExpertRecord
    from ..hub.registry import Registry

logger = logging.getLogger(__name__)

#: The name the resolver is registered under with vLLM.
RESOLVER_NAME = "moin-hub registry"
#: Environment variables read by :func:`register`.
REGISTRY_ENV = "MOIN_REGISTRY"
REVISION_ENV = "MOIN_REGISTRY_REVISION"


@dataclass(frozen=True)
class ResolvedExpert:
    """A registry expert, downloaded and verified: what a ``LoRARequest`` is made of."""

    name: str  # the name it was asked for (vLLM's adapter name)
    expert: ExpertRecord
    path: Path  # the verified adapter folder
    registry_id: str
    registry_revision: str

    @property
    def lora_int_id(self) -> int:
        """A stable positive id of ``(repo_id, commit)`` (vLLM replaces it with its own counter)."""
        digest = hashlib.sha256(f"{self.expert.repo_id}@{self.expert.revision}".encode()).digest()
        return int.from_bytes(digest[:7], "big") or 1


class MoinRegistryResolver:
    """Resolve adapter names to verified registry experts (vLLM's ``LoRAResolver`` interface).

    Args:
        registry_id: the registry (``"org/name"``).
        revision: pin the registry (default: its head of main, read again at each resolution).
        endpoint / token: Hub settings (default: ``$HF_ENDPOINT`` and the client's token lookup).

    Example:
        >>> resolver = MoinRegistryResolver("acme/moin-registry")  # doctest: +SKIP
        >>> resolver.resolve("cooking").path  # doctest: +SKIP
        PosixPath('.../snapshots/<commit>')
    """

    def __init__(self, registry_id: str, *, revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None):
        self.registry_id = validate_repo_id(registry_id, field=REGISTRY_ENV)
        self.revision = revision or None
        self.endpoint = endpoint
        self.token = token
        self._registry: Registry | None = None
        self._lock = threading.Lock()
        #: where resolutions and refusals are logged (:func:`register` uses a child of vLLM's own logger)
        self.log = logger

    def __repr__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"MoinRegistryResolver({self.registry_id}{at})"

    def registry(self) -> Registry:
        """The registry to look names up in: pinned once, or the head of main read now.

        When the head cannot be read (the Hub kept failing) the registry read last is kept, so that experts
        already in the HF cache are still served.

        Raises:
            RegistryNotFoundError / InvalidRegistryError / HubUnavailableError: as :meth:`Registry.load`
                (``HubUnavailableError`` only when no registry was read before).
        """
        from ..hub.registry import Registry

        with self._lock:
            if self._registry is None or self.revision is None:
                try:
                    self._registry = Registry.load(self.registry_id, revision=self.revision,
                                                   endpoint=self.endpoint, token=self.token)
                except HubUnavailableError as err:
                    if self._registry is None:
                        raise
                    self.log.warning("could not read the head of registry %s (%s); keeping %s", self.registry_id,
                                     err, self._registry.revision[:12])
            return self._registry

    def lookup(self, name: str) -> ExpertRecord | None:
        """The registry row named ``name`` (expert id or repo id), or None: only the rows are read."""
        try:
            return self.registry().get(name)
        except ExpertNotFoundError:
            return None

    def resolve(self, name: str) -> ResolvedExpert | None:
        """Download and verify the expert named ``name``; None when the registry has no such expert.

        Blocking (Hub calls): :meth:`resolve_lora` runs it in a thread.

        Raises:
            IntegrityError: a file's sha256 differs from the registry's record (a tampered adapter).
            BaseModelMismatchError: the adapter was made for another base model than the registry's.
            UnsafeFileError: the expert's repo holds a pickle at the pinned commit.
            ExpertNotFoundError: the expert's repo or its pinned commit is gone.
            HubUnavailableError: the Hub kept failing.
        """
        from ..hub.pull import download_expert

        registry = self.registry()
        try:
            record = registry.get(name)
        except ExpertNotFoundError:
            self.log.debug("%r is no expert of %s@%s", name, registry.registry_id, registry.revision[:12])
            return None
        try:
            path = download_expert(record, endpoint=registry.endpoint,
                                   token=self.token if self.token is not None else registry.token,
                                   base_model=registry.manifest.base_model)
        except Exception as err:
            self.log.warning("moin-hub refused expert %r (%s@%s): %s", name, record.repo_id, record.revision[:12],
                           err)
            raise
        self.log.info("moin-hub resolved %r to %s@%s (verified, registry %s@%s)", name, record.repo_id,
                    record.revision[:12], registry.registry_id, registry.revision[:12])
        return ResolvedExpert(name, record, path, registry.registry_id, registry.revision)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """vLLM's hook: a ``vllm.lora.request.LoRARequest`` for a registry expert, or None.

        Raises:
            the errors of :meth:`resolve`: vLLM answers the request with them (400 for a refused adapter)
            and loads nothing.
        """
        from vllm.lora.request import LoRARequest

        resolved = await asyncio.to_thread(self.resolve, lora_name)
        if resolved is None:
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=resolved.lora_int_id, lora_path=str(resolved.path))


def resolver_from_env(environ: Any = None) -> MoinRegistryResolver | None:
    """The resolver configured by ``MOIN_REGISTRY`` (and ``MOIN_REGISTRY_REVISION``), or None when unset.

    Raises:
        ValueError: ``MOIN_REGISTRY`` is no valid repo id.
    """
    environ = os.environ if environ is None else environ
    registry_id = (environ.get(REGISTRY_ENV) or "").strip()
    if not registry_id:
        return None
    return MoinRegistryResolver(registry_id, revision=(environ.get(REVISION_ENV) or "").strip() or None)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver with vLLM when ``MOIN_REGISTRY`` is set.

    vLLM calls it once in each of its processes; it reads no Hub and imports no model library. Without
    ``MOIN_REGISTRY`` it does nothing. Resolvers are consulted only when the server runs with
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (a warning says so otherwise).

    Raises:
        ValueError: ``MOIN_REGISTRY`` is no valid repo id (vLLM then stops at start-up: a misconfigured
            server does not serve silently without its experts).
    """
    resolver = resolver_from_env()
    if resolver is None:
        logger.debug("moin-hub vLLM plugin: %s is not set; no resolver registered", REGISTRY_ENV)
        return
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    LoRAResolver.register(MoinRegistryResolver)  # a virtual subclass: the ABC's interface, no vLLM import above
    resolver.log = logging.getLogger("vllm.moin_hub")  # shown by vLLM's handlers, at vLLM's logging level
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() not in ("1", "true"):
        resolver.log.warning("moin-hub resolver registered for %s, but vLLM consults resolvers only with "
                       "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", resolver.registry_id)
    else:
        resolver.log.info("moin-hub resolver registered for registry %s", resolver.registry_id)
