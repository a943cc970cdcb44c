"""The OpenAI API of `moin-hub serve`: request models, model names, and errors as OpenAI error objects.

Shared with the Ray Serve deployment (:mod:`moin_hub.serving.ray_serve`), which answers the same shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import (
    EmptyQueryError,
    ExpertNotFoundError,
    HubUnavailableError,
    IncompatibleExpertError,
    IntegrityError,
    MoinHubError,
    UnsafeFileError,
    UpstreamError,
)
from ..hub.mixing import MODES, Mixture

logger = logging.getLogger(__name__)

#: ``model`` names that route by content; ``moin:auto`` uses the server's mode.
AUTO_MODEL = "moin:auto"
BASE_MODEL = "moin:base"
MODE_MODELS = {f"moin:{mode}": mode for mode in MODES}

#: A routed request: the mixture of experts it gets, and the ``moin`` object that describes it.
Route = tuple[Mixture, dict[str, Any]]


class Sampling(BaseModel):
    """OpenAI sampling fields shared by completions and chat (unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    model: str = AUTO_MODEL
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionRequest(Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]


class ChatMessage(BaseModel):
    """One message of a chat; ``content`` is a string or OpenAI's list of parts."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = ""


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


class RouteRequest(BaseModel):
    """``POST /v1/route``."""

    input: str | list[str]
    mode: str | None = None
    k: int | None = Field(default=None, ge=1, le=64)
    threshold: float | None = Field(default=None, allow_inf_nan=False)  # a z-score or, without statistics, a cosine


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of streamed ``text`` to hold back: a tail that may begin a stop string,
    or an incomplete character (the tokenizer decodes half a UTF-8 sequence as U+FFFD).

    Example:
        >>> held_back("The end. Then", ["Then we"]), held_back("caf\ufffd", [])
        (4, 1)
    """
    hold = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return max(hold, 1 if text.endswith("\ufffd") else 0)


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(err: BaseException) -> ApiError:
    """The HTTP answer of an exception (the message is one line; no traceback reaches the client)."""
    if isinstance(err, ApiError):
        return err
    message = str(err).splitlines()[0][:500] if str(err) else type(err).__name__
    if isinstance(err, ExpertNotFoundError):
        return ApiError(404, message, code="model_not_found", param="model")
    if isinstance(err, EmptyQueryError):
        return ApiError(400, "The prompt is empty.", code="empty_prompt", param="prompt")
    if isinstance(err, UpstreamError):
        code = {503: "upstream_unavailable", 504: "upstream_timeout"}.get(err.status, "upstream_error")
        return ApiError(err.status, message, type="server_error", code=code)
    if isinstance(err, HubUnavailableError):
        return ApiError(503, message, type="server_error", code="hub_unavailable")
    if isinstance(err, (IntegrityError, UnsafeFileError, IncompatibleExpertError)):
        return ApiError(502, message, type="server_error", code="expert_refused")
    if isinstance(err, (ValueError, MoinHubError)):
        return ApiError(400, message)
    logger.exception("internal error")
    return ApiError(500, "Internal server error (see the server log).", type="server_error", code="internal_error")


def expert_entry(record: Any, weight: float) -> dict[str, Any]:
    """An expert as the ``moin`` object of an answer names it: id, repo, pinned sha, weight."""
    return {"expert_id": record.expert_id, "repo_id": record.repo_id, "revision": record.revision,
            "weight": round(weight, 6)}


def _text_of(content: Any) -> str:
    """The text of a chat message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
