"""The HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions
(plain and SSE-streamed), /health and /metrics, with OpenAI-style errors."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.sequence import Sequence
from .engine import AsyncEngine, QueueFullError
from .metrics import CONTENT_TYPE
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, bad, sampling_params
from .responses import Shapes, TextDelta, sse

RETRY_AFTER_S = 1


def build_app(engine: AsyncEngine, model_name: str, api_key: Optional[str] = None,
              request_timeout: Optional[float] = None) -> FastAPI:
    """The server's app; it starts ``engine``'s loop on startup and stops it on shutdown."""
    llm = engine.llm

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="KernelForge", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return JSONResponse(APIError(400, f"{where}: {first.get('msg')}", param).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), e.status_code)

    def check_request(request: Request, model: Optional[str]) -> None:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "invalid API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        if model is not None and model != model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves "
                           f"'{model_name}'", "model", code="model_not_found")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        check_request(request, None)
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                             "created": int(time.time()),
                                             "owned_by": "kernelforge",
                                             "max_model_len": llm.max_model_len}]}

    def prompt_ids(prompt, param: str) -> tuple[Optional[str], list[int]]:
        try:
            return llm._prompt_ids(prompt)
        except (ValueError, TypeError) as e:
            code = "context_length_exceeded" if "max_model_len" in str(e) else None
            raise APIError(400, f"{param}: {e}", param, code=code) from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_request(request, req.model)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise bad("prompt", "must not be empty")
        checked = [prompt_ids(x, "prompt") for x in prompts]
        params = [sampling_params(req, len(ids), llm.max_model_len) for _, ids in checked]
        return await run(request, req, Shapes(False, model_name, llm.tokenizer), checked, params)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_request(request, req.model)
        if llm.tokenizer is None or not llm.tokenizer.chat_template:
            raise bad("messages", "this model has no chat template: use /v1/completions")
        try:
            text = llm.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        except Exception as e:              # noqa: BLE001  the template's own raise_exception
            raise bad("messages", f"the chat template refused them: {e}") from None
        checked = [prompt_ids(text, "messages")]
        params = [sampling_params(req, len(checked[0][1]), llm.max_model_len)]
        return await run(request, req, Shapes(True, model_name, llm.tokenizer), checked, params)

    async def run(request: Request, req: Union[CompletionRequest, ChatCompletionRequest],
                  shapes: Shapes, checked: list, params: list):
        queue: asyncio.Queue = asyncio.Queue()
        handles = []
        try:
            for i, ((text, ids), sp) in enumerate(zip(checked, params)):
                handles.append(engine.add(Sequence(ids, sp, text), queue, i))
        except QueueFullError as e:
            for h in handles:
                engine.abort(h)
            raise APIError(503, f"the server is busy: {e}; retry later", type="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        deadline = None if request_timeout is None else time.monotonic() + request_timeout
        gen = Generation(shapes, llm.tokenizer, checked, params, queue, deadline)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(gen.stream(include_usage, lambda: abort(handles)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(gen.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():          # the client left: nobody reads the answer
                collect.cancel()
            abort(handles)
        if collect.cancelled():
            return Response(status_code=499)
        return collect.result()

    def abort(handles) -> None:
        for h in handles:
            engine.abort(h)

    return app


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Generation:
    """Turns one HTTP request's deltas (from the engine) into its response or stream."""

    def __init__(self, shapes: Shapes, tokenizer, checked, params, queue, deadline):
        self.shapes, self.queue, self.deadline = shapes, queue, deadline
        self.texts = [TextDelta(tokenizer, sp.stop) for sp in params]
        self.want_lp = [sp.logprobs is not None for sp in params]
        self.prompt_tokens = sum(len(ids) for _, ids in checked)
        self.completion_tokens = 0
        self.left = len(params)

    async def deltas(self):
        while self.left:
            timeout = None if self.deadline is None else self.deadline - time.monotonic()
            try:
                i, d = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                raise APIError(504, "the request timed out (--request-timeout)",
                               type="timeout") from None
            if d.error is not None:
                raise APIError(500, f"the request failed: {d.error}", type="internal_error")
            self.completion_tokens += len(d.token_ids)
            self.left -= d.finished
            yield i, d

    async def collect(self) -> dict:
        choices = [{"text": "", "finish_reason": None, "ids": [], "lps": []} for _ in self.texts]
        try:
            async for i, d in self.deltas():
                self.texts[i].push(d.token_ids, d.finished)
                choices[i]["ids"] += d.token_ids
                choices[i]["lps"] += d.logprobs
                if d.finished:
                    choices[i]["finish_reason"] = d.finish_reason
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return self.shapes.response(
            [{"text": t.text, "finish_reason": c["finish_reason"],
              "logprobs": self.shapes.logprobs(c["ids"], c["lps"] if lp else None)}
             for t, c, lp in zip(self.texts, choices, self.want_lp)],
            self.prompt_tokens, self.completion_tokens)

    async def stream(self, include_usage: bool, abort):
        s = self.shapes
        try:
            if s.chat:
                yield sse(s.chunk(0, None, role=True))
            offsets = [0] * len(self.texts)
            async for i, d in self.deltas():
                text = self.texts[i].push(d.token_ids, d.finished)
                lp = s.logprobs(d.token_ids, d.logprobs if self.want_lp[i] else None, offsets[i])
                offsets[i] += len(text)
                if text or lp or d.finished:
                    yield sse(s.chunk(i, text, d.finish_reason if d.finished else None, lp))
            if include_usage:
                yield sse(s.usage_chunk(self.prompt_tokens, self.completion_tokens))
        except APIError as e:
            yield sse(e.body())
        finally:
            abort()
        yield sse("[DONE]")
