"""Ray Serve: topic experts spread over replicas, each request sent to a replica that already holds its expert.

Two deployments make one application (:func:`build_app`):

- :class:`MoinIngress` (HTTP, FastAPI): ``POST /v1/completions`` (OpenAI's request and response shapes),
  ``GET /v1/experts``, ``GET /v1/models``, ``GET /health``. It routes each prompt with the registry's router
  (the embedder and the centroid index only; no base model lives here) and calls the experts deployment with
  ``multiplexed_model_id=<expert id>``.
- :class:`MoinExperts`: each replica holds ONE base model in an :class:`~moin_hub.serving.engine.ExpertEngine`. Ray
  Serve's model multiplexing treats every expert as a "model": ``@serve.multiplexed`` loads it on first use
  (the adapter is pinned in the engine) and keeps at most ``max_experts_per_replica`` per replica, least
  recently used first out. When Ray evicts an expert it calls the model object's ``__del__``
  (``ray/serve/multiplex.py``, ``_ModelMultiplexWrapper.unload_model_lru``: in a worker thread, before the
  next expert is loaded), which unpins the adapter; the engine, whose budget is the same N, deletes it from
  the base model as the newcomer arrives, so the two LRUs hold the same experts. Replicas report the experts
  they hold to Ray's controller (every 0.1 s), and handles send a request to a replica holding its expert;
  if none does, to the replica holding the fewest, which then loads it.

Requests for one expert are batched per replica with ``@serve.batch``: Ray 2.60 splits every batch by
multiplexed model id before calling the batch function (``ray/serve/batching.py``), and the function groups
again by the expert id it is passed (and by sampling settings), so one padded ``generate_batch`` never mixes
experts, whatever the Ray version does. Mixtures of several
experts (``moin:topk`` / ``moin:adaptive`` of ``moin-hub serve``) are not offered here: a multiplexed request
names one model. ``moin:auto`` (alias ``moin:top1``) routes to the nearest expert; ``moin:base`` uses no
expert (any replica answers); an expert id or repo id forces that expert.

Multi-GPU and multi-node:

- one replica per GPU: ``build_app(..., replicas=<GPUs>, replica_num_gpus=1)``; Ray sets
  ``CUDA_VISIBLE_DEVICES`` so each replica's engine loads its base model on its own GPU (``cuda``). Fractions
  (``replica_num_gpus=0.5``) put two replicas, two base models, on one GPU.
- on a cluster (``ray start --head`` then ``ray start --address=<head>:6379`` on each node), replicas are
  placed on any node with a free GPU; every node needs moin-hub installed and Hub access (its own HF cache
  fills with the experts it serves). The registry commit is resolved once in :func:`build_app`, so every
  replica and the ingress serve the same commit.
- the total expert capacity is ``replicas * max_experts_per_replica``; popular experts stay where they are
  loaded, and a request whose expert is nowhere loads it on the least loaded replica.

Run it from Python, ``serve.run(build_app("acme/moin-registry", endpoint=...))``, or from the shell with the
application builder :func:`app_builder`::

    serve run moin_hub.serving.ray_serve:app_builder registry_id=acme/moin-registry replicas=4 replica_num_gpus=1

Ray is an optional extra: ``pip install 'moin-hub[ray]'``.
"""

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

try:
    from ray import serve
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("The Ray Serve deployment needs Ray, an optional extra: pip install 'moin-hub[ray]'") from None
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray.exceptions import RayTaskError

from .._validators import short_repr, validate_positive_int, validate_repo_id
from .._version import __version__
from ..errors import (
    EmptyQueryError,
)
from ..hub.client import resolve_endpoint
from ..hub.mixing import Mixture
from ..hub.registry import Registry
from ..hub.router import Router
from .engine import ExpertEngine
from .generation import Completion
from .openai_api import AUTO_MODEL, BASE_MODEL, ApiError
from .openai_api import api_error as _serve_api_error

logger = logging.getLogger(__name__)

#: ``model`` names that route by content (top1); ``BASE_MODEL`` uses no expert at all.
AUTO_ALIASES = (AUTO_MODEL, "moin:top1")
#: Request limits of the ingress.
MAX_TOKENS_LIMIT = 512
MAX_PROMPT_CHARS = 20_000
MAX_STOPS = 4
#: Per-replica batching of requests for one expert.
MAX_BATCH_SIZE = 8
BATCH_WAIT_S = 0.01


# ------------------------------------------------------------------------------------------ requests and errors


def api_error(err: BaseException) -> ApiError:
    """The HTTP answer of an exception, as in `moin-hub serve` (:func:`moin_hub.serving.openai_api.api_error`).

    An error raised inside an experts replica reaches the ingress wrapped in Ray's ``RayTaskError``; its
    ``cause`` is the original error.
    """
    if isinstance(err, RayTaskError) and isinstance(err.cause, BaseException):
        err = err.cause
    return _serve_api_error(err)


@dataclass(frozen=True)
class CompletionParams:
    """A checked ``POST /v1/completions`` body (the OpenAI fields this deployment honours)."""

    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def generation(self) -> dict[str, Any]:
        """What an experts replica needs (everything but ``model``)."""
        fields = asdict(self)
        fields.pop("model")
        return fields


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"{name} must be a number in {bracket}{low}, {high}], got {short_repr(value)}.",
                       param=name)
    return float(value)


def parse_completion_request(body: Any) -> CompletionParams:
    """Check an OpenAI completions body; raise :class:`ApiError` (400) naming the bad field and value.

    Example:
        >>> parse_completion_request({"prompt": "Bake bread", "max_tokens": 8}).max_tokens
        8
    """
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    model = body.get("model", AUTO_MODEL)
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, f"model must be a non-empty string, got {short_repr(model)}.", param="model")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, f"prompt must be a string (or a list of one string), got {short_repr(prompt)}.",
                       param="prompt")
    if not prompt.strip():
        raise EmptyQueryError()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}.",
                       param="prompt")
    if body.get("stream"):
        raise ApiError(400, "Streaming is not supported; send stream=false.", param="stream", code="unsupported")
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"Only n=1 is supported, got {short_repr(body.get('n'))}.", param="n",
                       code="unsupported")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ApiError(400, f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], got {short_repr(max_tokens)}.",
                       param="max_tokens")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop if stop is not None else ()
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings, got {short_repr(stop)}.",
                       param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed must be an integer, got {short_repr(seed)}.", param="seed")
    return CompletionParams(model.strip(), prompt, max_tokens, _number(body, "temperature", 1.0, 0.0, 2.0),
                            _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), tuple(stops), seed)


# ------------------------------------------------------------------------------------------ the experts


class HeldExpert:
    """The "model" Ray's multiplexer keeps for one expert: while it is held, the expert's adapter is pinned in
    the replica's engine.

    Ray calls :meth:`__del__` explicitly when it evicts the expert (then replaces it on the instance, but
    Python's garbage collector still calls the class's ``__del__`` later), so releasing is idempotent and
    never raises: an exception there would fail the load of the expert that caused the eviction.
    """

    def __init__(self, engine: ExpertEngine, expert_id: str):
        self.engine = engine
        self.expert_id = expert_id
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> bool:
        """Unpin the adapter (the engine deletes it when the next expert needs the room); True the first time."""
        with self._lock:
            if self._released:
                return False
            self._released = True
        self.engine.unpin(self.expert_id)
        return True

    def __del__(self) -> None:
        try:
            self.release()
        except Exception as err:  # noqa: BLE001 - a finaliser must not raise (see the class docstring)
            logger.warning("unpinning expert %s failed: %s", self.expert_id, err)


@serve.deployment(name="MoinExperts")
class MoinExperts:
    """One base model per replica, experts multiplexed onto it (see the module docstring).

    Args:
        registry_id / revision / endpoint / token: the registry (``revision`` should be a commit sha, so every
            replica serves the same experts).
        base_model: override the registry's base model (see :class:`~moin_hub.serving.engine.ExpertEngine`).
        max_experts: experts held per replica: Ray's multiplexing limit and the engine's adapter budget.
        batch_wait_s: how long a replica waits for more requests of the same expert before it runs a batch.
    """

    def __init__(self, registry_id: str, *, revision: str | None = None, endpoint: str | None = None,
                 token: str | None = None, base_model: str | None = None, max_experts: int = 4,
                 batch_wait_s: float = BATCH_WAIT_S):
        validate_positive_int(max_experts, field="max_experts")
        # one replica per actor process, so setting the decorator's (per process) queue here is per replica
        self._generate.set_batch_wait_timeout_s(float(batch_wait_s))
        self.engine = ExpertEngine(registry_id, revision=revision, endpoint=endpoint, token=token,
                                   base_model=base_model, cache_size=max_experts)
        self.engine.max_context()  # loads the base model now: a replica is ready when it can generate
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else f"local-{uuid.uuid4().hex[:8]}"

        async def load_expert_model(expert_id: str) -> HeldExpert:
            return await self._load(expert_id)

        # the limit is per application, so the decorator is applied per instance (to a plain function: Ray
        # keeps its LRU as an attribute of what it decorates)
        self.get_expert = serve.multiplexed(max_num_models_per_replica=max_experts)(load_expert_model)

    async def _load(self, expert_id: str) -> HeldExpert:
        await asyncio.to_thread(self.engine.pin, expert_id)  # pulled (verified), loaded, kept until released
        logger.info("replica %s holds expert %s", self.replica_id, expert_id)
        return HeldExpert(self.engine, expert_id)

    async def complete(self, params: dict[str, Any]) -> dict[str, Any]:
        """Generate for one request with the expert of its multiplexed model id ("" = the base model).

        Returns:
            An OpenAI completions dict; its ``moin`` object names the expert, the replica, the experts the
            replica holds (least recently used first) and its engine's load/eviction counters.
        """
        expert_id = serve.get_multiplexed_model_id()
        if expert_id:
            await self.get_expert(expert_id)
        return await self._generate(expert_id, params)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _generate(self, expert_ids: list[str], params: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._run_batch, expert_ids, params)

    def _run_batch(self, expert_ids: Sequence[str], params: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        groups: dict[tuple, list[int]] = {}
        for i, (expert_id, p) in enumerate(zip(expert_ids, params, strict=True)):
            groups.setdefault((expert_id, p["temperature"], p["top_p"], p["seed"]), []).append(i)
        results: list[dict[str, Any]] = [{}] * len(params)
        for (expert_id, temperature, top_p, seed), rows in groups.items():
            mixture = Mixture((expert_id,), (1.0,), "top1") if expert_id else Mixture((), (), "base")
            prompts = [self.engine.encode(params[i]["prompt"], reserve=params[i]["max_tokens"]) for i in rows]
            outputs = self.engine.generate_batch(prompts, mixture, max_new_tokens=[params[i]["max_tokens"] for i in rows],
                                                 temperature=temperature, top_p=top_p, seed=seed,
                                                 stop=[params[i]["stop"] for i in rows])
            for i, output in zip(rows, outputs, strict=True):
                results[i] = self._answer(expert_id, output, len(rows))
        return results

    def _answer(self, expert_id: str, output: Completion, batch_size: int) -> dict[str, Any]:
        cache = self.engine.cache_info()
        stats = self.engine.stats.snapshot()
        completion = len(output.token_ids)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": expert_id or BASE_MODEL,
            "choices": [{"index": 0, "text": output.text, "finish_reason": output.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": output.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": output.prompt_tokens + completion},
            "moin": {"expert": expert_id or None, "replica": self.replica_id, "batch_size": batch_size,
                     "experts_loaded": [s["expert_id"] for s in cache["loaded"]],
                     "experts_held": [s["expert_id"] for s in cache["loaded"] if s["pinned"]],
                     "adapter_loads": int(stats["loads"]), "evictions": int(stats["evictions"])},
        }

    def info(self) -> dict[str, Any]:
        """This replica's id and its engine's cache (for debugging through a handle)."""
        return {"replica": self.replica_id, "cache": self.engine.cache_info(), "stats": self.engine.stats.snapshot()}


# ------------------------------------------------------------------------------------------ the ingress

api = FastAPI(title="moin-hub on Ray Serve", version=__version__,
              description="OpenAI-compatible completions routed to topic LoRA experts (MoIN), on Ray Serve.")


@serve.deployment(name="MoinIngress")
@serve.ingress(api)
class MoinIngress:
    """HTTP front: routes each prompt to its expert and calls :class:`MoinExperts` multiplexed by expert id.

    Args:
        experts: the handle of the experts deployment (from ``MoinExperts.bind(...)``).
        registry_id / revision / endpoint / token: the same registry commit as the experts deployment.
    """

    def __init__(self, experts: Any, registry_id: str, *, revision: str | None = None,
                 endpoint: str | None = None, token: str | None = None):
        self.experts = experts
        self.router = Router.from_registry(registry_id, revision=revision, endpoint=endpoint, token=token)
        if len(self.router.registry):
            self.router.embedder  # noqa: B018 - loads the embedder now, not on the first request

    @property
    def registry(self) -> Registry:
        return self.router.registry

    def choose(self, model: str, prompt: str) -> tuple[str, dict[str, Any]]:
        """The expert id a request gets ("" for the base model) and the ``moin.route`` object describing why."""
        info: dict[str, Any] = {"registry": self.registry.registry_id, "registry_revision": self.registry.revision}
        if model == BASE_MODEL:
            return "", {**info, "mode": "base"}
        if model in AUTO_ALIASES:
            route = self.router.route(prompt, k=1)
            best = route.best
            return best.expert.expert_id, {**info, "mode": "top1", "expert_id": best.expert.expert_id,
                                           "similarity": round(best.similarity, 6),
                                           "route_ms": round(route.embed_ms + route.search_ms, 3)}
        if model.startswith("moin:"):
            raise ApiError(400, f"model {model!r} is not offered by the Ray deployment; use {AUTO_MODEL}, "
                                f"{BASE_MODEL} or an expert id.", param="model", code="unsupported")
        record = self.registry.get(model)  # ExpertNotFoundError -> 404 model_not_found
        return record.expert_id, {**info, "mode": "forced", "expert_id": record.expert_id}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        try:
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "The body is not valid JSON.") from None
            params = parse_completion_request(body)
            expert_id, route = await asyncio.to_thread(self.choose, params.model, params.prompt)
            handle = self.experts.options(multiplexed_model_id=expert_id) if expert_id else self.experts
            answer = await handle.complete.remote(params.generation())
        except Exception as err:  # noqa: BLE001 - every failure is answered as an OpenAI error object
            error = api_error(err)
            return JSONResponse(error.body(), status_code=error.status)
        answer["model"] = params.model
        answer["moin"]["route"] = route
        return JSONResponse(answer)

    @api.get("/v1/experts")
    async def list_experts(self) -> JSONResponse:
        data = [{"id": r.expert_id, "object": "expert", "repo_id": r.repo_id, "revision": r.revision,
                 "title": r.title, "keywords": list(r.keywords), "n_docs": r.n_docs} for r in self.registry]
        return JSONResponse({"object": "list", "registry": self.registry.registry_id,
                             "registry_revision": self.registry.revision,
                             "base_model": self.registry.manifest.base_model.to_dict(), "data": data})

    @api.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        names = [AUTO_MODEL, BASE_MODEL, *(r.expert_id for r in self.registry)]
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "created": created,
                                                         "owned_by": "moin-hub"} for n in names]})

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "registry": self.registry.registry_id,
                             "registry_revision": self.registry.revision, "experts": len(self.registry),
                             "version": __version__})


# ------------------------------------------------------------------------------------------ the application


def build_app(registry_id: str, *, endpoint: str | None = None, token: str | None = None,
              revision: str | None = None, replicas: int = 2, max_experts_per_replica: int = 4,
              replica_num_cpus: float = 0.5, replica_num_gpus: float = 0, ingress_num_cpus: float = 0.5,
              base_model: str | None = None, batch_wait_s: float = BATCH_WAIT_S) -> Any:
    """The Ray Serve application: :class:`MoinIngress` in front of ``replicas`` :class:`MoinExperts` replicas.

    The registry is loaded here once and its commit sha handed to every replica and the ingress, so the whole
    application serves one registry commit (deploy again to follow a new one).

    Args:
        registry_id: the registry dataset, ``"org/name"``.
        endpoint: the Hub endpoint (default ``$HF_ENDPOINT`` or huggingface.co), resolved here so replicas on
            other nodes use the same one.
        token: Hub token for private repos. It travels in the deployments' arguments (kept by Ray's
            controller); prefer ``HF_TOKEN`` in each node's environment or a ``runtime_env``.
        revision: registry branch, tag or commit (default: head of main, resolved to its commit now).
        replicas: experts replicas, each holding one base model (one per GPU on a GPU cluster).
        max_experts_per_replica: experts (LoRA adapters) each replica keeps loaded, least recently used out.
        replica_num_cpus / replica_num_gpus: Ray resources of each experts replica (``replica_num_gpus=1``:
            one GPU each). Size them to the cluster: a replica that cannot be placed makes ``serve.run`` wait.
        ingress_num_cpus: Ray CPUs of the ingress replica (router + embedder).
        base_model: override the registry's base model (``"org/name[@rev]"`` or a folder present on every node).
        batch_wait_s: seconds a replica waits for more requests of one expert before running a batch
            (``@serve.batch``'s ``batch_wait_timeout_s``; default 0.01).

    Returns:
        The bound application, for ``serve.run`` (or ``serve run`` through :func:`app_builder`).

    Raises:
        RegistryNotFoundError: the registry does not exist.
        ValueError: a bad id or number.

    Example:
        >>> from ray import serve  # doctest: +SKIP
        >>> serve.run(build_app("acme/moin-registry", replicas=4, replica_num_gpus=1))  # doctest: +SKIP
        >>> # POST http://127.0.0.1:8000/v1/completions {"model": "moin:auto", "prompt": "..."}
    """
    validate_repo_id(registry_id, field="registry_id")
    validate_positive_int(replicas, field="replicas")
    validate_positive_int(max_experts_per_replica, field="max_experts_per_replica")
    for name, value in (("replica_num_cpus", replica_num_cpus), ("replica_num_gpus", replica_num_gpus),
                        ("ingress_num_cpus", ingress_num_cpus), ("batch_wait_s", batch_wait_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {short_repr(value)}.")
    endpoint = resolve_endpoint(endpoint)
    commit = Registry.load(registry_id, revision=revision, endpoint=endpoint, token=token).revision
    experts = MoinExperts.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": replica_num_cpus, "num_gpus": replica_num_gpus},
    ).bind(registry_id, revision=commit, endpoint=endpoint, token=token, base_model=base_model,
           max_experts=max_experts_per_replica, batch_wait_s=batch_wait_s)
    return MoinIngress.options(ray_actor_options={"num_cpus": ingress_num_cpus}).bind(
        experts, registry_id, revision=commit, endpoint=endpoint, token=token)


def app_builder(args: dict[str, str]) -> Any:
    """:func:`build_app` from ``serve run`` arguments (strings), e.g.
    ``serve run moin_hub.serving.ray_serve:app_builder registry_id=acme/moin-registry replicas=4 replica_num_gpus=1``.
    """
    known = {"registry_id": str, "endpoint": str, "token": str, "revision": str, "replicas": int,
             "max_experts_per_replica": int, "replica_num_cpus": float, "replica_num_gpus": float,
             "ingress_num_cpus": float, "base_model": str, "batch_wait_s": float}
    unknown = sorted(set(args) - set(known))
    if unknown or "registry_id" not in args:
        optional = ", ".join(name for name in known if name != "registry_id")
        raise ValueError(f"app_builder takes registry_id=... and optionally {optional}; got {sorted(args)}.")
    kwargs = {name: known[name](value) for name, value in args.items()}
    return build_app(kwargs.pop("registry_id"), **kwargs)
