"""Every error moin-hub raises on purpose.

Each error subclasses :class:`MoinHubError` *and* the built-in exception that matches its meaning, so
callers can catch either (``except LookupError`` keeps working). Errors carry the fields that explain
them (``repo_id``, ``revision``, ``path`` ...), and ``str(error)`` is one line a person can act on: the
CLI prints exactly that line.

Errors of the Hub client itself (``huggingface_hub.errors.*``) are *not* wrapped when they already say
what is wrong; they propagate unchanged.
"""

from __future__ import annotations


class MoinHubError(Exception):
    """Base class of all moin-hub errors.

    Attributes:
        hint: an optional second line for people ("run `moin-hub init-registry` first").
    """

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class RegistryNotFoundError(MoinHubError, LookupError):
    """The registry dataset repo does not exist, or holds no `moin_registry.json`."""

    def __init__(self, registry_id: str, *, revision: str | None = None, reason: str | None = None):
        self.registry_id = registry_id
        self.revision = revision
        at = f" at revision {revision!r}" if revision else ""
        super().__init__(
            f"Registry {registry_id!r}{at} not found" + (f": {reason}" if reason else "."),
            hint="Check the id and --endpoint, or create it with `moin-hub init-registry`.",
        )


class InvalidRegistryError(MoinHubError, ValueError):
    """The registry exists but its manifest or its `experts.parquet` is malformed."""

    def __init__(self, registry_id: str, reason: str):
        self.registry_id = registry_id
        self.reason = reason
        shown = reason if len(reason) <= 500 else f"{reason[:480]}... ({len(reason)} chars)"
        super().__init__(f"Registry {registry_id!r} is invalid: {shown}")


class ExpertNotFoundError(MoinHubError, LookupError):
    """An expert is not in the registry, or its Hub repo (or pinned commit) is gone."""

    def __init__(self, expert: str, *, registry_id: str | None = None, revision: str | None = None,
                 reason: str | None = None):
        self.expert = expert
        self.registry_id = registry_id
        self.revision = revision
        where = f" in registry {registry_id!r}" if registry_id else ""
        at = f" at commit {revision}" if revision else ""
        super().__init__(f"Expert {expert!r}{at}{where} not found" + (f": {reason}" if reason else "."))


class InvalidExpertError(MoinHubError, ValueError):
    """An expert folder (or an expert repo) lacks a file or holds a malformed one."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"Invalid expert {path!r}: {reason}")


class IncompatibleExpertError(MoinHubError, ValueError):
    """An expert does not fit the registry (other base model, other embedder dimension ...)."""

    def __init__(self, message: str, *, repo_id: str | None = None, expected: object = None,
                 actual: object = None):
        self.repo_id = repo_id
        self.expected = expected
        self.actual = actual
        super().__init__(message)


class BaseModelMismatchError(IncompatibleExpertError):
    """The adapter was trained on another base model than the registry's."""

    def __init__(self, *, expected: str, actual: str, repo_id: str | None = None):
        who = f"Expert {repo_id!r}" if repo_id else "The adapter"
        super().__init__(
            f"{who} was trained on base model {actual!r}, but the registry's base model is {expected!r}.",
            repo_id=repo_id, expected=expected, actual=actual,
        )


class EmbedderMismatchError(IncompatibleExpertError):
    """A vector's dimension (or the embedder) differs from the registry's embedder."""

    def __init__(self, *, expected: int | str, actual: int | str, what: str = "centroid",
                 repo_id: str | None = None):
        self.what = what
        super().__init__(
            f"The {what} has dimension {actual}, but the registry's embedder produces {expected}-d vectors.",
            repo_id=repo_id, expected=expected, actual=actual,
        )


class IntegrityError(MoinHubError, ValueError):
    """A downloaded file does not match the sha256 the registry recorded: it is not used."""

    def __init__(self, *, repo_id: str, revision: str, path: str, expected: str, actual: str):
        self.repo_id = repo_id
        self.revision = revision
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"Hash mismatch for {repo_id}@{revision[:12]}:{path}: the registry recorded sha256 "
            f"{expected[:16]}..., the file has {actual[:16]}...; refusing to load it.",
        )


class UnsafeFileError(MoinHubError, ValueError):
    """A file moin-hub refuses to load (a pickle, a path outside its folder ...)."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"Refusing {path!r}: {reason}")


class EmptyQueryError(MoinHubError, ValueError):
    """The query to route is empty (or only whitespace)."""

    def __init__(self) -> None:
        super().__init__("The query is empty: give some text to route.")


class RegistryConflictError(MoinHubError, RuntimeError):
    """The registry kept changing under us: the update was retried and never went through."""

    def __init__(self, registry_id: str, attempts: int):
        self.registry_id = registry_id
        self.attempts = attempts
        super().__init__(
            f"Registry {registry_id!r} changed on every one of {attempts} attempts; the update was not written.",
            hint="Try again; raise --max-retries if many people push at once.",
        )


class ExpertTrainingError(MoinHubError, RuntimeError):
    """Training some experts failed; the others finished and stay on disk.

    Attributes:
        failures: ``{expert_id: "ErrorType: message"}`` of the experts that failed.
        finished: folders of the experts that are done (trained now or before).
    """

    def __init__(self, failures: dict[str, str], *, finished: list | None = None):
        self.failures = dict(failures)
        self.finished = list(finished or [])
        listed = "; ".join(f"{expert_id}: {reason}" for expert_id, reason in self.failures.items())
        super().__init__(
            f"{len(self.failures)} expert(s) failed to train ({len(self.finished)} finished): {listed}",
            hint="Fix the cause and run again: finished experts are skipped, only the failed ones retrain.",
        )


class InvalidTopicModelError(MoinHubError, ValueError):
    """A saved topic model (``topics.json`` + ``centroids.safetensors`` + ``assignments.json``) is malformed."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"Invalid topic model {path!r}: {reason}")


class AssetNotFoundError(MoinHubError, FileNotFoundError):
    """An offline asset (the GGUF base model, the embedder, the Brown Corpus) is missing or cannot be fetched.

    Attributes:
        asset: the package, file or folder that is missing.
        reason: what is wrong with it. The hint says how to install or fetch it.
    """

    def __init__(self, asset: str, reason: str, *, hint: str | None = None):
        self.asset = asset
        self.reason = reason
        super().__init__(f"Asset {asset!r} is not available: {reason}", hint=hint)


class InvalidCorpusError(MoinHubError, ValueError):
    """Input documents cannot be read: a missing text column, a malformed JSON line, an unknown split ..."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"Cannot read documents from {source!r}: {reason}")


class HubUnavailableError(MoinHubError, ConnectionError):
    """The Hub kept failing (5xx, 429, timeouts, dropped connections) through every retry.

    Nothing half-written is left behind: a push that fails this way either never registered the expert
    or registered it completely, so it can simply be run again.

    Attributes:
        operation: what was being done ("commit to acme/expert", "download ...").
        attempts: how many times it was tried.
        cause: the last error, as ``"Type: message"``.
    """

    def __init__(self, operation: str, attempts: int, cause: BaseException):
        self.operation = operation
        self.attempts = attempts
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        self.cause = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
        super().__init__(f"The Hub failed {attempts} time(s) during {operation}: {self.cause}",
                         hint="The Hub may be down or overloaded; nothing half-written was left, run it again later.")


class UpstreamError(MoinHubError, ConnectionError):
    """An inference server that `moin-hub serve --backend vllm` forwards to failed: it did not answer, timed
    out, or answered with an error that is not the client's fault.

    Attributes:
        url: the upstream's base URL.
        reason: what went wrong, one line.
        status: the HTTP status the proxy answers with (503 unreachable, 504 timed out, 502 otherwise).
        upstream_status: the status the upstream answered with, if it answered.
    """

    def __init__(self, url: str, reason: str, *, status: int = 502, upstream_status: int | None = None):
        self.url = url
        self.reason = reason
        self.status = status
        self.upstream_status = upstream_status
        super().__init__(f"Upstream {url} {reason}",
                         hint="Check that the vLLM server runs there with --enable-lora and "
                              "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.")


__all__ = [
    "AssetNotFoundError",
    "BaseModelMismatchError",
    "EmbedderMismatchError",
    "EmptyQueryError",
    "ExpertNotFoundError",
    "ExpertTrainingError",
    "HubUnavailableError",
    "IncompatibleExpertError",
    "IntegrityError",
    "InvalidCorpusError",
    "InvalidExpertError",
    "InvalidRegistryError",
    "InvalidTopicModelError",
    "MoinHubError",
    "RegistryConflictError",
    "RegistryNotFoundError",
    "UnsafeFileError",
    "UpstreamError",
]
