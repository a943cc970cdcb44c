"""A test double of a vLLM OpenAI server's HTTP API: models, runtime LoRA loading, completions, streams.

Only the HTTP surface `moin-hub serve --backend vllm` uses, with knobs to make it slow or failing. The text it
"generates" names the model (base or adapter) that answered, so a test sees where a request went. The
end-to-end tests in ``test_serve_vllm_e2e.py`` run real vLLM instead.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handlers' string annotations here

BASE = "fake-base"


@dataclass
class FakeVllm:
    """The state and knobs of one fake upstream."""

    loras: dict[str, str] = field(default_factory=dict)  # name -> path, in load order
    loads: list[str] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)  # model -> requests generating with it now
    busy_unloads: list[str] = field(default_factory=list)  # adapters unloaded while a request used them
    most_loaded: int = 0
    load_delay: float = 0.0
    generate_delay: float = 0.0
    chunk_delay: float = 0.0  # between the chunks of a stream
    streams_cut: int = 0  # streams whose client (moin-hub) went away before the end
    fail_status: int | None = None  # answer every generation request with this status
    fail_message: str = "boom"
    refuse_loads: bool = False

    def app(self) -> Any:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

        app = FastAPI()

        def error(status: int, message: str) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": "Error", "param": None, "code": status}},
                                status_code=status)

        @app.get("/v1/models")
        async def models() -> Any:
            data = [{"id": BASE, "object": "model", "root": "/models/base", "parent": None, "max_model_len": 512}]
            data += [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in self.loras.items()]
            return {"object": "list", "data": data}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Any:
            body = await request.json()
            name, path = body["lora_name"], body["lora_path"]
            if name in self.loras:
                return error(400, f"The lora adapter '{name}' has already been loaded.")
            await asyncio.sleep(self.load_delay)
            if self.refuse_loads or not (Path(path) / "adapter_config.json").is_file():
                return error(500, f"Loading lora {name} failed: No adapter found for {path}")
            self.loras[name] = path
            self.loads.append(name)
            self.most_loaded = max(self.most_loaded, len(self.loras))
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Any:
            name = (await request.json())["lora_name"]
            if self.loras.pop(name, None) is None:
                return error(404, f"The lora adapter '{name}' cannot be found.")
            self.unloads.append(name)
            if self.running.get(name):
                self.busy_unloads.append(name)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        async def generate(request: Request, chat: bool) -> Any:
            body = await request.json()
            self.requests.append(body)
            model = body.get("model")
            if model != BASE and model not in self.loras:
                return error(404, f"The model `{model}` does not exist.")
            if self.fail_status is not None:
                return error(self.fail_status, self.fail_message)
            self.running[model] = self.running.get(model, 0) + 1
            try:
                await asyncio.sleep(self.generate_delay)
            finally:
                self.running[model] -= 1
            source = body["messages"][-1]["content"] if chat else body["prompt"]
            words = [f"<{model}>", *source.split()][: body.get("max_tokens", 16)]
            usage = {"prompt_tokens": len(source.split()), "completion_tokens": len(words),
                     "total_tokens": len(source.split()) + len(words)}
            kind = "chat.completion" if chat else "text_completion"
            if not body.get("stream"):
                text = " ".join(words)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": text, "finish_reason": "length", "logprobs": None})
                return {"id": "cmpl-fake", "object": kind, "created": int(time.time()), "model": model,
                        "choices": [choice], "usage": usage}

            def chunk(piece: str | None, finish: str | None, *, role: bool = False) -> str:
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": piece or "", "finish_reason": finish}
                data = {"id": "cmpl-fake", "object": kind + ".chunk" if chat else kind, "created": 0,
                        "model": model, "choices": [choice], "usage": None}
                return f"data: {json.dumps(data)}\n\n"

            async def events() -> Any:
                done = False
                try:
                    if chat:
                        yield chunk(None, None, role=True)
                    for i, word in enumerate(words):
                        yield chunk(word if i == 0 else " " + word, None)
                        await asyncio.sleep(self.chunk_delay)
                    done = True
                finally:
                    self.streams_cut += not done
                yield chunk(None, "length")
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield "data: " + json.dumps({"id": "cmpl-fake", "object": kind, "created": 0, "model": model,
                                                 "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            return await generate(request, chat=True)

        return app


class RunningApp:
    """An ASGI app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app: Any, port: int = 0):
        import uvicorn

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "the fake upstream did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> RunningApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
