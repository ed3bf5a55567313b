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

from cheers.serve.auth import ApiKeyMiddleware
from cheers.serve.body import edit_form, is_form, json_body, require_json
from cheers.serve.context import Context
from cheers.serve.deps import require_all
from cheers.serve.errors import ApiError, bad
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
    ctx = Context(model, settings)
    runner = ModelRunner(model, settings.max_batch, settings.threads)
    scheduler = Scheduler(runner, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                          settings.max_queue_bytes)

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
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
    for path, method, handler in ROUTES:
        app.add_route(path, handler, methods=[method])
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    return app


# ---- errors as OpenAI's JSON --------------------------------------------------------------------------------------
def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


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


async def run_job(scheduler: Scheduler, job: Job) -> BatchResult:
    """Submit `job` and wait for its share of the batch; model errors become 400 (bad input) or 500."""
    fut = scheduler.submit(job)
    try:
        return await fut
    except ApiError:
        raise
    except (ValueError, OSError) as err:  # the model's own input errors (bad image, too long, ...)
        raise bad(str(err).strip() or type(err).__name__, code="model_rejected") from None
    except Exception as err:  # noqa: BLE001
        raise ApiError(500, f"generation failed: {type(err).__name__}: {err}", code="generation_failed") from None


def batch_headers(res: BatchResult) -> dict[str, str]:
    return {"X-Cheers-Batch-Size": str(res.batch_size), "X-Cheers-Batch-Id": str(res.batch_id),
            "X-Cheers-Queue-Ms": f"{res.queue_ms:.1f}", "X-Cheers-Run-Ms": f"{res.run_ms:.1f}"}


# ---- service routes -----------------------------------------------------------------------------------------------
async def health(request: Request) -> JSONResponse:
    ctx, scheduler = _state(request)
    return JSONResponse({"status": "ok", "model": ctx.model_id, "queued": scheduler.pending_units})


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


async def stats(request: Request) -> JSONResponse:
    ctx, scheduler = _state(request)
    s = ctx.settings
    return JSONResponse({**scheduler.stats.as_dict(), "queued": scheduler.pending_units,
                         "settings": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms,
                                      "max_queue": s.max_queue}})


# ---- images -------------------------------------------------------------------------------------------------------
async def images_generations(request: Request) -> JSONResponse:
    ctx, scheduler = _state(request)
    body = await json_body(request, ctx.settings.max_body_bytes)
    req = await asyncio.to_thread(parse_image_request, ctx, body)
    return await image_response(ctx, scheduler, req, "image", [req.prompt] * req.n)


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
    return await image_response(ctx, scheduler, req, "edit", [(req.image, req.prompt)] * req.n)


async def image_response(ctx: Context, scheduler: Scheduler, req: ImageRequest, task: str,
                         items: list) -> JSONResponse:
    seeds = [req.seed + i for i in range(req.n)]
    nbytes = len(req.prompt) + (ctx.image_bytes if req.image is not None else 0)
    res = await run_job(scheduler, Job(task, image_key(task, req.options), items, seeds, req.options,
                                       nbytes=nbytes))
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
    res = await run_job(scheduler, job)
    choices, completion = [], 0
    for i, text in enumerate(res.value):
        n_tok = await asyncio.to_thread(count_tokens, ctx, text)
        completion += n_tok
        choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": "length" if n_tok >= req.max_tokens else "stop"})
    usage = {"prompt_tokens": req.prompt_tokens * req.n, "completion_tokens": completion,
             "total_tokens": req.prompt_tokens * req.n + completion}
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": ctx.model_id,
                         "choices": choices, "usage": usage, "system_fingerprint": None},
                        headers=batch_headers(res))


def count_tokens(ctx: Context, text: str) -> int:
    return len(ctx.tok.encode(text)) if text else 0


def chunk(ctx: Context, cid: str, created: int, delta: dict, finish: str | None, usage: dict | None = None,
          choices: bool = True) -> str:
    """One server-sent event in OpenAI's `chat.completion.chunk` format."""
    data: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": ctx.model_id, "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                            if choices else []}
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_chat(ctx: Context, req: ChatRequest, job: Job, cid: str, created: int) -> AsyncIterator[str]:
    """The events of a streamed reply: the role, one chunk per text piece, the finish reason, optionally the
    usage, then `data: [DONE]`; an error mid-stream is sent as an error event."""
    sink = job.sink
    try:
        yield chunk(ctx, cid, created, {"role": "assistant", "content": ""}, None)
        while True:
            kind, value = await sink.queue.get()
            if kind == "piece":
                yield chunk(ctx, cid, created, {"content": value}, None)
                continue
            if kind == "error":
                err = value if isinstance(value, ApiError) else (
                    bad(str(value), code="model_rejected") if isinstance(value, (ValueError, OSError))
                    else ApiError(500, f"generation failed: {type(value).__name__}: {value}"))
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            text = value or ""
            n_tok = await asyncio.to_thread(count_tokens, ctx, text)
            yield chunk(ctx, cid, created, {}, "length" if n_tok >= req.max_tokens else "stop")
            if req.include_usage:
                usage = {"prompt_tokens": req.prompt_tokens, "completion_tokens": n_tok,
                         "total_tokens": req.prompt_tokens + n_tok}
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
    ("/v1/images/generations", "POST", images_generations),
    ("/v1/images/edits", "POST", images_edits),
    ("/v1/chat/completions", "POST", chat_completions),
)
