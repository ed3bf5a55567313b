"""The FastAPI application: the routes, the JSON error handlers and the API key check around them.

The handlers are plain Starlette routes that parse and validate their bodies themselves (`cheers.serve.schema`),
submit a job to the scheduler kept in `app.state.scheduler` and shape the result as OpenAI does. Request parsing
and PNG encoding run in worker threads so the event loop stays free while the model thread works.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from cheers.serve.auth import ApiKeyMiddleware, LocalOriginMiddleware
from cheers.serve.body import edit_form, is_form, json_body, require_json
from cheers.serve.context import Context
from cheers.serve.deps import require_all
from cheers.serve.engine import Completion, TextEngine
from cheers.serve.errors import ApiError, bad
from cheers.serve.observe import AccessMiddleware, Metrics, access_logger
from cheers.serve.runner import ModelRunner
from cheers.serve.scheduler import BatchResult, Job, Scheduler, StreamSink
from cheers.serve.schema import (ChatRequest, ImageRequest, chat_key, image_key, parse_chat_request,
                                 parse_edit_request, parse_image_request)
from cheers.serve.settings import ServeSettings

WEB_DIR = Path(__file__).resolve().parents[1] / "web"


def create_app(model: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving `model` (a loaded `cheers.pipeline.Cheers`)."""
    require_all()
    settings = settings or ServeSettings()
    if settings.api_key is not None and not settings.api_key.strip():
        raise ValueError("the API key is empty, which would leave the server without authentication")
    ctx = Context(model, settings)
    runner = ModelRunner(model, settings.max_batch, settings.threads)
    engine = (TextEngine(model, settings.max_running, settings.max_batch, settings.threads)
              if getattr(model, "tokenizer", None) is not None else None)
    scheduler = Scheduler(runner, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                          settings.max_queue_bytes, engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.close()

    app = FastAPI(title="Cheers API", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler = scheduler
    app.state.context = ctx
    app.state.metrics = Metrics(scheduler)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
    for path, method, handler in ROUTES:
        app.add_route(path, handler, methods=[method])
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    else:
        app.add_middleware(LocalOriginMiddleware, allowed_hosts=settings.allowed_hosts)
    # outermost: every response, refusals included, gets a request id, a metrics count and a log line
    app.add_middleware(AccessMiddleware, metrics=app.state.metrics,
                       log=access_logger() if settings.access_log else None)
    return app


# ---- errors as OpenAI's JSON --------------------------------------------------------------------------------------
def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.response_headers())


async def api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(err)


async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404/405 (unknown path or method) in the same JSON shape as every other error."""
    msg = {404: f"no such endpoint: {request.method} {request.url.path}",
           405: f"method {request.method} not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
    typ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(err.status_code, msg, type=typ, headers=dict(err.headers or {})))


async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = (err.errors() or [{}])[0]
    loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    return error_response(bad(first.get("msg", "invalid request"), loc))


async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
    return error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}", code="internal_error"))


# ---- running a request's job --------------------------------------------------------------------------------------
def _state(request: Request) -> tuple[Context, Scheduler]:
    return request.app.state.context, request.app.state.scheduler


async def run_job(scheduler: Scheduler, job: Job, request: Request) -> BatchResult:
    """Submit `job` and wait for its share of the batch; model errors become 400 (bad input) or 500. A client that
    disconnects meanwhile cancels the job: dropped from the queue, or stopped at its next step or token."""
    fut = scheduler.submit(job)
    watch = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({fut, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not fut.done():
        job.cancel()
        fut.cancel()
        raise ApiError(499, "client closed the request", code="client_closed_request")
    try:
        return fut.result()
    except ApiError:
        raise
    except asyncio.CancelledError:
        raise ApiError(499, "client closed the request", code="client_closed_request") from None
    except (ValueError, OSError) as err:  # the model's own input errors (bad image, too long, ...)
        raise bad(str(err).strip() or type(err).__name__, code="model_rejected") from None
    except Exception as err:  # noqa: BLE001
        raise ApiError(500, f"generation failed: {type(err).__name__}: {err}", code="generation_failed") from None


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (its body has been read already, so the next message says so)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def batch_headers(res: BatchResult) -> dict[str, str]:
    return {"X-Cheers-Batch-Size": str(res.batch_size), "X-Cheers-Batch-Id": str(res.batch_id),
            "X-Cheers-Queue-Ms": f"{res.queue_ms:.1f}", "X-Cheers-Run-Ms": f"{res.run_ms:.1f}"}


# ---- service routes -----------------------------------------------------------------------------------------------
async def health(request: Request) -> JSONResponse:
    """Liveness and readiness for load balancers: 200 while requests are taken, 503 once shutting down."""
    ctx, scheduler = _state(request)
    ready = scheduler.ready
    return JSONResponse({"status": "ok" if ready else "shutting_down", "ready": ready, "model": ctx.model_id,
                         "queued": scheduler.pending_units, "queue_limit": scheduler.max_queue},
                        status_code=200 if ready else 503)


async def favicon(request: Request) -> Response:
    return Response(status_code=204)


async def index(request: Request) -> HTMLResponse:
    page = WEB_DIR / "index.html"
    if not page.exists():
        raise ApiError(404, f"the demo page is not installed ({page} missing)", type="not_found_error")
    return HTMLResponse(page.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


def model_card(ctx: Context) -> dict[str, Any]:
    return {"id": ctx.model_id, "object": "model", "created": ctx.created, "owned_by": "cheers",
            "resolution": ctx.resolution, "context_length": ctx.context,
            "image_defaults": vars(ctx.model.image_defaults), "text_defaults": vars(ctx.model.text_defaults),
            "limits": {k: v for k, v in ctx.settings.public().items() if k.startswith("max_")}}


async def list_models(request: Request) -> JSONResponse:
    ctx, _ = _state(request)
    return JSONResponse({"object": "list", "data": [model_card(ctx)]})


async def get_model(request: Request) -> JSONResponse:
    ctx, _ = _state(request)
    model_id = request.path_params["model_id"]
    if model_id != ctx.model_id:
        raise ApiError(404, f"model '{model_id}' does not exist; this server serves '{ctx.model_id}'",
                       param="model", type="invalid_request_error", code="model_not_found")
    return JSONResponse(model_card(ctx))


async def metrics(request: Request) -> Response:
    body, ctype = request.app.state.metrics.exposition()
    return Response(body, media_type=ctype)


async def stats(request: Request) -> JSONResponse:
    ctx, scheduler = _state(request)
    s = ctx.settings
    decode = scheduler.engine.stats() if scheduler.engine is not None else None
    return JSONResponse({**scheduler.stats.as_dict(), "queued": scheduler.pending_units, "decode": decode,
                         "settings": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms,
                                      "max_queue": s.max_queue}})


# ---- images -------------------------------------------------------------------------------------------------------
async def images_generations(request: Request) -> JSONResponse:
    ctx, scheduler = _state(request)
    body = await json_body(request, ctx.settings.max_body_bytes)
    req = await asyncio.to_thread(parse_image_request, ctx, body)
    return await image_response(request, ctx, scheduler, req, "image", [req.prompt] * req.n)


async def images_edits(request: Request) -> JSONResponse:
    ctx, scheduler = _state(request)
    limit = ctx.settings.max_body_bytes
    require_json(request, form_too=True)
    if is_form(request):
        fields, upload = await edit_form(request, limit)
        req = await asyncio.to_thread(parse_edit_request, ctx, fields, True, upload)
    else:
        body = await json_body(request, limit)
        req = await asyncio.to_thread(parse_edit_request, ctx, body)
    return await image_response(request, ctx, scheduler, req, "edit", [(req.image, req.prompt)] * req.n)


async def image_response(request: Request, ctx: Context, scheduler: Scheduler, req: ImageRequest, task: str,
                         items: list) -> JSONResponse:
    seeds = [req.seed + i for i in range(req.n)]
    nbytes = len(req.prompt) + (ctx.image_bytes if req.image is not None else 0)
    res = await run_job(scheduler, Job(task, image_key(task, req.options), items, seeds, req.options,
                                       nbytes=nbytes), request)
    b64 = await asyncio.to_thread(png_b64, res.value)
    R = ctx.resolution
    data = [{"b64_json": b, "seed": s} for b, s in zip(b64, seeds)]
    return JSONResponse({"created": int(time.time()), "data": data, "size": f"{R}x{R}", "output_format": "png"},
                        headers=batch_headers(res))


def png_b64(images: list) -> list[str]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


# ---- chat ---------------------------------------------------------------------------------------------------------
async def chat_completions(request: Request) -> Response:
    ctx, scheduler = _state(request)
    body = await json_body(request, ctx.settings.max_body_bytes)
    req = await asyncio.to_thread(parse_chat_request, ctx, body)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    nbytes = sum(len(m["content"]) + ctx.image_bytes * len(m["images"]) for m in req.conversation)
    if req.stream:
        sink = StreamSink(asyncio.get_running_loop())
        job = Job("chat_stream", ("chat_stream", cid), [req.conversation], [0], req.options, batchable=False,
                  sink=sink, nbytes=nbytes)
        scheduler.submit(job)  # 503 here, before the stream starts
        return StreamingResponse(stream_chat(ctx, req, job, cid, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    job = Job("chat", chat_key(req), [req.conversation] * req.n, [0] * req.n, req.options, batchable=req.batchable,
              nbytes=nbytes)
    res = await run_job(scheduler, job, request)
    completions: list[Completion] = res.value
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": c.logprobs} if c.logprobs is not None else None,
                "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
    completion = sum(c.tokens for c in completions)
    usage = {"prompt_tokens": req.prompt_tokens * req.n, "completion_tokens": completion,
             "total_tokens": req.prompt_tokens * req.n + completion}
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": ctx.model_id,
                         "choices": choices, "usage": usage, "system_fingerprint": None, "service_tier": "default"},
                        headers=batch_headers(res))


def chunk(ctx: Context, cid: str, created: int, delta: dict, finish: str | None, usage: dict | None = None,
          choices: bool = True, logprobs: list | None = None) -> str:
    """One server-sent event in OpenAI's `chat.completion.chunk` format."""
    lp = {"content": logprobs} if logprobs is not None else None
    data: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": ctx.model_id, "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]
                            if choices else []}
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_error(value: Any) -> ApiError:
    if isinstance(value, ApiError):
        return value
    if isinstance(value, (ValueError, OSError)):
        return bad(str(value), code="model_rejected")
    return ApiError(500, f"generation failed: {type(value).__name__}: {value}", code="generation_failed")


async def stream_chat(ctx: Context, req: ChatRequest, job: Job, cid: str, created: int) -> AsyncIterator[str]:
    """The events of a streamed reply: the role, one chunk per text piece, the finish reason, optionally the
    usage, then `data: [DONE]`; an error mid-stream is sent as an error event."""
    sink = job.sink
    want_lp = req.options.get("logprobs") is not None
    try:
        yield chunk(ctx, cid, created, {"role": "assistant", "content": ""}, None, logprobs=[] if want_lp else None)
        while True:
            msg = await sink.queue.get()
            kind, value = msg[0], msg[1]
            if kind == "piece":
                yield chunk(ctx, cid, created, {"content": value}, None,
                            logprobs=(msg[2] if len(msg) > 2 else []) if want_lp else None)
                continue
            if kind == "error":
                yield f"data: {json.dumps(stream_error(value).body())}\n\n"
                break
            done: Completion = value[0]
            yield chunk(ctx, cid, created, {}, done.finish_reason)
            if req.include_usage:
                usage = {"prompt_tokens": req.prompt_tokens, "completion_tokens": done.tokens,
                         "total_tokens": req.prompt_tokens + done.tokens}
                yield chunk(ctx, cid, created, {}, None, usage=usage, choices=False)
            break
        yield "data: [DONE]\n\n"
    finally:
        sink.cancelled.set()  # the client went away (or we are done): stop generating


ROUTES = (
    ("/health", "GET", health),
    ("/favicon.ico", "GET", favicon),
    ("/", "GET", index),
    ("/v1/models", "GET", list_models),
    ("/v1/models/{model_id:path}", "GET", get_model),
    ("/v1/stats", "GET", stats),
    ("/metrics", "GET", metrics),
    ("/v1/images/generations", "POST", images_generations),
    ("/v1/images/edits", "POST", images_edits),
    ("/v1/chat/completions", "POST", chat_completions),
)
