"""The default backend of `moin-hub serve`: generation on moin-hub's own engine, batched across experts.

:class:`EngineBackend` holds the :class:`~moin_hub.serving.batching.ExpertBatcher` (started and stopped with
the app), turns routed requests into batch jobs on the one base model, and streams tokens as server-sent
events. The app around it (API, routing, errors) is :mod:`moin_hub.serving.server`'s.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..hub.config import ExpertRecord
from ..hub.mixing import Mixture
from .batching import ExpertBatcher, Job
from .engine import ExpertEngine
from .generation import Completion, truncate_at_stop
from .metrics import ServerMetrics, render_metrics
from .openai_api import ChatRequest, CompletionRequest, Route, Sampling, api_error, held_back

if TYPE_CHECKING:
    from .server import ServeConfig


def _usage(outputs: Sequence[Completion]) -> dict[str, int]:
    prompt = sum(o.prompt_tokens for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class EngineBackend:
    """Generation on moin-hub's own engine: one base model in this process, requests batched across experts
    by an :class:`~moin_hub.serving.batching.ExpertBatcher` (the default backend of `moin-hub serve`)."""

    name = "engine"

    def __init__(self, engine: ExpertEngine):
        self.engine = engine
        self._batcher: ExpertBatcher | None = None

    async def start(self, config: ServeConfig, metrics: ServerMetrics) -> None:
        self._batcher = ExpertBatcher(self.engine, max_batch_size=config.max_batch_size,
                                      window_ms=config.batch_window_ms, on_batch=metrics.batch_sizes.observe)

    async def stop(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        self.engine.close()

    def _submit(self, job: Job) -> Future:
        """Hand a job to the batcher."""
        if self._batcher is None:
            raise RuntimeError("the server is not started")
        return self._batcher.submit(job)

    async def _run(self, mixture: Mixture, prompt_ids: list[int], max_tokens: int, stop: tuple[str, ...],
                   req: Sampling) -> Completion:
        job = Job(mixture, prompt_ids, max_tokens, req.temperature, req.top_p, stop, req.seed)
        return await asyncio.wrap_future(self._submit(job))

    async def completions(self, req: CompletionRequest, prompts: list[str], routes: list[Route], max_tokens: int,
                          stop: tuple[str, ...]) -> Any:
        from starlette.concurrency import run_in_threadpool

        if req.stream:
            mixture, moin = routes[0]
            ids = await run_in_threadpool(self.engine.encode, prompts[0], reserve=max_tokens)
            return self._stream("completion", req, mixture, moin, ids, max_tokens, stop)
        tasks = []
        for prompt, (mixture, _) in zip(prompts, routes, strict=True):
            ids = await run_in_threadpool(self.engine.encode, prompt, reserve=max_tokens)
            tasks.append(self._run(mixture, ids, max_tokens, stop, req))
        outputs = await asyncio.gather(*tasks)
        choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason, "logprobs": None,
                    "moin": routes[i][1]} for i, o in enumerate(outputs)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": _usage(outputs), "moin": routes[0][1]}

    async def chat(self, req: ChatRequest, messages: list[dict[str, str]], route: Route, max_tokens: int,
                   stop: tuple[str, ...]) -> Any:
        from starlette.concurrency import run_in_threadpool

        mixture, moin = route
        ids = await run_in_threadpool(self.engine.encode_chat, messages, reserve=max_tokens)
        if req.stream:
            return self._stream("chat", req, mixture, moin, ids, max_tokens, stop)
        output = await self._run(mixture, ids, max_tokens, stop, req)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},
                             "finish_reason": output.finish_reason, "logprobs": None}],
                "usage": _usage([output]), "moin": moin}

    def _stream(self, kind: str, req: Sampling, mixture: Mixture, moin: dict[str, Any], prompt_ids: list[int],
                max_tokens: int, stops: tuple[str, ...]) -> Any:
        """Server-sent events as OpenAI streams them: chunks of new text, a last chunk with the finish reason,
        then ``[DONE]``. Stop strings are honoured across chunks; a client that goes away stops generation."""
        from fastapi.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def push(token: int | None) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        job = Job(mixture, prompt_ids, max_tokens, req.temperature, req.top_p, (), req.seed, on_token=push,
                  cancel=cancel)
        future = self._submit(job)
        future.add_done_callback(lambda _: push(None))
        ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        tokenizer = self.engine.tokenizer

        def chunk(text: str, finish: str | None, *, first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            body = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                    "created": created, "model": req.model, "choices": [choice]}
            if first:
                body["moin"] = moin
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> Any:
            new_ids: list[int] = []
            sent, finish = "", None
            try:
                yield chunk("", None, first=True)
                while (token := await tokens.get()) is not None:
                    if token == tokenizer.eos_token_id:
                        continue
                    new_ids.append(token)
                    text, stopped = truncate_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), stops)
                    safe = text if stopped else text[: len(text) - held_back(text, stops)]
                    if len(safe) > len(sent):
                        yield chunk(safe[len(sent):], None)
                        sent = safe
                    if stopped:
                        cancel.set()
                        finish = "stop"
                        break
                if finish is None:
                    try:
                        result = await asyncio.wrap_future(future)
                    except Exception as err:  # noqa: BLE001 - the stream has begun: the error is its last event
                        yield f"data: {json.dumps(api_error(err).body())}\n\n"
                        return
                    final, stopped = truncate_at_stop(result.text, stops)
                    if len(final) > len(sent):
                        yield chunk(final[len(sent):], None)
                    finish = "stop" if stopped else result.finish_reason
                yield chunk("", finish)
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def experts_view(self, records: Sequence[ExpertRecord]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        cache = self.engine.cache_info()
        loaded = {(s["repo_id"], s["revision"]): s for s in cache["loaded"]}
        states = []
        for record in records:
            slot = loaded.get((record.repo_id, record.revision))
            states.append({"loaded": slot is not None, "pinned": bool(slot and slot["pinned"]),
                           "in_use": slot["in_use"] if slot else 0})
        return states, {k: v for k, v in cache.items() if k != "loaded"}

    def health(self) -> dict[str, Any]:
        return {"loaded": len(self.engine.cached_experts()), "base_model_loaded": self.engine._base is not None}

    def metrics_text(self, metrics: ServerMetrics) -> str:
        return render_metrics(self.engine, metrics, self._batcher.pending() if self._batcher else 0)
