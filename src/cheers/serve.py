"""`cheers serve`: an OpenAI-style HTTP API (FastAPI + uvicorn) with request batching and a web demo page.

Endpoints
    POST /v1/chat/completions   messages with text and image parts (data URLs); `stream: true` gives server-sent
                                events in OpenAI's chunk format ending with `data: [DONE]`; usage counts
    POST /v1/images/generations prompt, n, size "RxR", seed, steps, cfg | cfg_scale, shift, sampler, cfg_interval
                                -> PNG b64_json
    POST /v1/images/edits       multipart (image file + prompt, like OpenAI) or JSON with a data-URL image; the
                                generation fields and edit_start (t0 in [0, 0.99], larger keeps more of the source)
    GET  /v1/models, /v1/models/{id}, /v1/stats (batching statistics), /health, / (the demo page)

Batching: every request becomes a job with a *key* (task + sampling settings). One dispatcher coroutine takes jobs
from an asyncio queue, waits up to `max_wait_ms` after the oldest job for more jobs with the same key (up to
`max_batch` images / conversations), and runs the group as one `generate_image` / `edit` / `chat` call in the single
model thread. Jobs arriving while the model is busy wait in the queue and are grouped when it frees up; a job that
arrives alone on an idle server (nothing else came within `max_wait_ms` before it) runs at once. Queued work
is capped (`max_queue`): above it requests get 503 instead of piling up in memory. A batch that fails is re-run job
by job so that one bad request never fails its neighbours; a failing request never stops the server.

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status naming the offending field.
The optional API key (`--api-key` or $CHEERS_API_KEY) is required as `Authorization: Bearer KEY` (or `X-API-Key`)
on every API endpoint; `/health` and the static demo page (which asks for the key and sends it) stay open.

Only the standard library is imported at module level, so `cheers --help` stays fast and the subcommand exists
even without the `serve` extra (it then says what to install).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import itertools
import json
import math
import os
import re
import secrets
import sys
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

WEB_DIR = Path(__file__).resolve().parent / "web"
OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})
SAMPLERS = ("euler", "heun", "midpoint", "renoise")  # cheers.sampling.SAMPLERS (kept torch-free here)
_MISSING = object()


# ---- settings ---------------------------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    """Server limits and batching parameters (all configurable from the command line)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_batch: int = 16  # images or conversations per model call
    max_wait_ms: float = 20.0  # how long the oldest queued job waits for companions
    max_queue: int = 64  # queued + running images/conversations before 503
    max_body_bytes: int = 25 * 2**20
    max_image_bytes: int = 16 * 2**20  # one decoded image file
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # images in one chat request
    max_tokens: int = 1024  # upper bound of max_tokens
    max_prompt_tokens: int | None = None  # default: the model's context
    max_n: int = 8  # images / choices per request
    max_steps: int = 250
    threads: int | None = None  # torch intra-op threads of the model thread (default: torch's, one per core)
    warmup: bool = True
    log_level: str = "info"

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        d["api_key_required"] = bool(self.api_key)
        return d


def parse_size(text: str | int) -> int:
    """'25MB', '512KB', '1GB', '1000' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", str(text), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 25MB, 512KB or a number of bytes)")
    unit = (m.group(2) or "b").lower()[:1]
    return int(float(m.group(1)) * {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit])


# ---- errors -----------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered to the client as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "overloaded_error"}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---- field access with named errors -----------------------------------------------------------------------------
class Fields:
    """Typed reads from a JSON object (or form fields, whose values are strings) that name the field on error."""

    def __init__(self, data: Any, prefix: str = "", form: bool = False, what: str = "request body"):
        if not isinstance(data, dict):
            raise _bad(f"{prefix or what} must be a JSON object, got {_json_type(data)}", prefix or None)
        self.data = data
        self.prefix = prefix
        self.form = form

    def param(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def only(self, allowed: set[str] | frozenset[str]) -> None:
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            names = ", ".join(f"'{u}'" for u in unknown)
            raise _bad(f"unknown field{'s' if len(unknown) > 1 else ''} {names}"
                       f"{' in ' + self.prefix if self.prefix else ''}; accepted fields: {', '.join(sorted(allowed))}",
                       self.param(unknown[0]), code="unknown_field")

    def _raw(self, name: str, default: Any) -> Any:
        v = self.data.get(name)
        if v is None or (self.form and v == ""):
            if default is _MISSING:
                raise _bad(f"missing required field '{self.param(name)}'", self.param(name), code="missing_field")
            return default
        return v

    def str(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None,
            nonempty: bool = False) -> Any:
        v = self._raw(name, default)
        if v is default:
            return v
        if not isinstance(v, str):
            raise _bad(f"'{self.param(name)}' must be a string, got {_json_type(v)}", self.param(name))
        if nonempty and not v.strip():
            raise _bad(f"'{self.param(name)}' must not be empty", self.param(name))
        if choices is not None and v not in choices:
            raise _bad(f"'{self.param(name)}' must be one of {', '.join(choices)}; got {v!r}", self.param(name))
        return v

    def int(self, name: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> Any:
        v = self._raw(name, default)
        if v is default:
            return v
        if self.form and isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:
                raise _bad(f"'{self.param(name)}' must be an integer, got {v!r}", self.param(name)) from None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(f"'{self.param(name)}' must be an integer, got {_json_type(v)}", self.param(name))
        _check_range(self.param(name), v, lo, hi)
        return v

    def float(self, name: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> Any:
        v = self._raw(name, default)
        if v is default:
            return v
        if self.form and isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise _bad(f"'{self.param(name)}' must be a number, got {v!r}", self.param(name)) from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(f"'{self.param(name)}' must be a finite number, got {_json_type(v)}", self.param(name))
        if lo_open and lo is not None and v <= lo:
            raise _bad(f"'{self.param(name)}' must be > {lo}, got {v}", self.param(name))
        _check_range(self.param(name), v, None if lo_open else lo, hi)
        return float(v)

    def interval(self, name: str, default: tuple[float, float]) -> tuple[float, float]:
        """[lo, hi] (a form field: "lo,hi") with 0 <= lo <= hi <= 1."""
        v = self._raw(name, default)
        if v is default:
            return v
        if self.form and isinstance(v, str):
            v = v.split(",")
        try:
            lo, hi = (float(x) for x in v if not isinstance(x, bool))
        except (TypeError, ValueError):
            raise _bad(f"'{self.param(name)}' must be two numbers [lo, hi], got {v!r}", self.param(name)) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
            raise _bad(f"'{self.param(name)}' must satisfy 0 <= lo <= hi <= 1, got [{lo}, {hi}]", self.param(name))
        return lo, hi

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        v = self._raw(name, default)
        if v is default:
            return v
        if self.form and isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
            return v.lower() in ("true", "1")
        if not isinstance(v, bool):
            raise _bad(f"'{self.param(name)}' must be true or false, got {_json_type(v)}", self.param(name))
        return v


def _check_range(param: str, v: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and v < lo:
        raise _bad(f"'{param}' must be >= {lo}, got {v}", param)
    if hi is not None and v > hi:
        raise _bad(f"'{param}' must be <= {hi}, got {v}", param)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


# ---- scheduler --------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One request: `units` images or conversations that share `key` (task + sampling settings)."""

    task: str  # "image" | "edit" | "chat" | "chat_stream"
    key: tuple
    items: list  # one entry per unit: prompt / (image, instruction) / conversation
    seeds: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    batchable: bool = True
    sink: "StreamSink | None" = None
    future: Any = None
    t_submit: float = 0.0
    gap: float = math.inf  # seconds since the previous request arrived

    @property
    def units(self) -> int:
        return len(self.items)


@dataclass
class BatchResult:
    value: Any  # this job's slice of the batch output
    batch_size: int  # units in the model call this job ran in
    batch_id: int
    queue_ms: float
    run_ms: float


class StreamSink:
    """Text pieces of a streaming job, handed from the model thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, piece: str) -> None:  # model thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("piece", piece))


class BatchStats:
    def __init__(self) -> None:
        self.batches: dict[str, Counter] = {}
        self.requests: Counter = Counter()
        self.rejected = 0
        self.failed = 0
        self.largest = 0
        self.recent: deque = deque(maxlen=64)

    def record(self, task: str, units: int, jobs: int, run_ms: float, batch_id: int) -> None:
        self.batches.setdefault(task, Counter())[units] += 1
        self.requests[task] += jobs
        self.largest = max(self.largest, units)
        self.recent.append({"id": batch_id, "task": task, "size": units, "requests": jobs, "ms": round(run_ms, 1)})

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": {t: {"count": sum(c.values()), "sizes": {str(k): v for k, v in sorted(c.items())}}
                        for t, c in self.batches.items()},
            "requests": dict(self.requests),
            "largest_batch": self.largest,
            "rejected_queue_full": self.rejected,
            "failed_requests": self.failed,
            "recent": list(self.recent),
        }


class Scheduler:
    """Groups compatible jobs into batches and runs them one at a time in a single model thread.

    `execute(task, jobs)` runs in that thread and returns one `(ok, value_or_exception)` per job.
    """

    def __init__(self, execute: Callable[[str, list[Job]], list[tuple[bool, Any]]], max_batch: int = 16,
                 max_wait_ms: float = 20.0, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.execute = execute
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.pending_units = 0
        self.stats = BatchStats()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_submit = -math.inf

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cheers-model")
        self._task = asyncio.create_task(self._dispatch(), name="cheers-dispatcher")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> asyncio.Future:
        """Queue `job`; its future resolves to a `BatchResult` (or raises). 503 when the queue is full."""
        assert self._loop is not None and self._queue is not None, "scheduler not started"
        if self.pending_units + job.units > self.max_queue:
            self.stats.rejected += 1
            raise ApiError(503, f"server busy: {self.pending_units} images/conversations queued or running "
                                f"(limit {self.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        job.future = self._loop.create_future()
        job.t_submit = time.monotonic()
        job.gap, self._last_submit = job.t_submit - self._last_submit, job.t_submit
        self.pending_units += job.units
        self._queue.put_nowait(job)
        return job.future

    # -- dispatcher (event loop) --
    def _drain(self, pending: list[Job]) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())

    def _dropped(self, job: Job) -> bool:
        """A job whose client went away before it ran: forget it."""
        gone = job.future.done() or (job.sink is not None and job.sink.cancelled.is_set())
        if gone:
            self.pending_units -= job.units
            if not job.future.done():
                job.future.cancel()
        return gone

    def _compatible_units(self, pending: list[Job], head: Job) -> int:
        return sum(j.units for j in pending if j.batchable and j.key == head.key)

    def _take(self, pending: list[Job]) -> tuple[list[Job], list[Job]]:
        head = pending[0]
        batch, rest, units = [head], [], head.units
        for j in pending[1:]:
            if head.batchable and j.batchable and j.key == head.key and units + j.units <= self.max_batch:
                batch.append(j)
                units += j.units
            else:
                rest.append(j)
        return batch, rest

    async def _dispatch(self) -> None:
        assert self._queue is not None
        pending: list[Job] = []
        while True:
            if not pending:
                pending.append(await self._queue.get())
            self._drain(pending)
            pending = [j for j in pending if not self._dropped(j)]
            if not pending:
                continue
            head = pending[0]
            # a request that arrived alone on an idle server runs at once: waiting only adds latency when
            # clients send one request at a time; under concurrent load requests arrive close together
            alone = len(pending) == 1 and head.gap > self.max_wait
            if head.batchable and not alone:
                deadline = head.t_submit + self.max_wait
                while self._compatible_units(pending, head) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        pending.append(await asyncio.wait_for(self._queue.get(), left))
                    except asyncio.TimeoutError:
                        break
                    self._drain(pending)
            batch, pending = self._take(pending)
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a scheduler bug must not leave requests hanging forever
                failure = ApiError(500, f"scheduler error: {type(err).__name__}: {err}")
                for job in batch:
                    if not job.future.done():
                        self.pending_units -= job.units
                        if job.sink is not None:
                            job.sink.queue.put_nowait(("error", failure))
                            job.future.set_result(None)
                        else:
                            job.future.set_exception(failure)

    async def _run(self, batch: list[Job]) -> None:
        assert self._loop is not None
        batch_id = next(self._ids)
        units = sum(j.units for j in batch)
        t0 = time.monotonic()
        try:
            results = await self._loop.run_in_executor(self._executor, self.execute, batch[0].task, batch)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # the executor itself failed
            results = [(False, err)] * len(batch)
        run_ms = (time.monotonic() - t0) * 1000
        self.stats.record(batch[0].task, units, len(batch), run_ms, batch_id)
        for job, (ok, value) in zip(batch, results):
            self.pending_units -= job.units
            if not ok:
                self.stats.failed += 1
            if job.sink is not None:  # streaming: the outcome goes to the stream, nobody awaits the future
                job.sink.queue.put_nowait(("end", value) if ok else ("error", value))
                if not job.future.done():
                    job.future.set_result(None)
                continue
            if job.future.done():
                continue
            if ok:
                job.future.set_result(BatchResult(value, units, batch_id, (t0 - job.t_submit) * 1000, run_ms))
            else:
                job.future.set_exception(value)


# ---- running batches on the model -------------------------------------------------------------------------------
class ModelRunner:
    """Turns a batch of jobs into one pipeline call (runs in the model thread)."""

    def __init__(self, model: Any, max_batch: int, threads: int | None = None):
        self.model = model
        self.max_batch = max_batch
        self.threads = threads
        self._threads_set = False

    def __call__(self, task: str, jobs: list[Job]) -> list[tuple[bool, Any]]:
        if self.threads and not self._threads_set:  # per thread in some OpenMP builds: set it here
            import torch

            torch.set_num_threads(self.threads)
            self._threads_set = True
        try:
            outs = self._call(task, jobs)
        except Exception as err:  # noqa: BLE001 - reported to the client, the server goes on
            if len(jobs) == 1:
                return [(False, err)]
            return [self(task, [j])[0] for j in jobs]  # isolate the failing request
        return [(True, o) for o in outs]

    def _call(self, task: str, jobs: list[Job]) -> list[Any]:
        m = self.model
        seeds = [s for j in jobs for s in j.seeds]
        opts = dict(jobs[0].options)
        if task == "image":
            prompts = [p for j in jobs for p in j.items]
            return _split(m.generate_image(prompts, seed=seeds, batch_size=self.max_batch, **opts), jobs)
        if task == "edit":
            images = [im for j in jobs for im, _ in j.items]
            instructions = [ins for j in jobs for _, ins in j.items]
            return _split(m.edit(images, instructions, seed=seeds, batch_size=self.max_batch, **opts), jobs)
        if task == "chat":
            convs = [c for j in jobs for c in j.items]
            if opts.get("seed") is None:
                opts["seed"] = secrets.randbelow(2**31)
            return _split(m.chat(convs, **opts), jobs)
        if task == "chat_stream":
            (job,) = jobs
            if opts.get("seed") is None:
                opts["seed"] = secrets.randbelow(2**31)
            pieces = m.chat(job.items[0], stream=True, **opts)
            text = []
            try:
                for piece in pieces:
                    if job.sink.cancelled.is_set():
                        break
                    text.append(piece)
                    job.sink.put(piece)
            finally:
                close = getattr(pieces, "close", None)
                if close:
                    close()
            return ["".join(text)]
        raise ValueError(f"unknown task {task!r}")


def _split(outputs: list, jobs: list[Job]) -> list[list]:
    res, i = [], 0
    for j in jobs:
        res.append(list(outputs[i:i + j.units]))
        i += j.units
    return res


# ---- request parsing --------------------------------------------------------------------------------------------
class Context:
    """What request parsing needs to know about the model and the limits."""

    def __init__(self, model: Any, settings: ServeSettings):
        self.model = model
        self.settings = settings
        cfg = model.config
        self.resolution: int = int(cfg.resolution)
        self.image_tokens: int = int(cfg.num_image_tokens)
        self.context: int = int(cfg.text.max_position_embeddings)
        self.max_prompt = min(self.context, settings.max_prompt_tokens or self.context)
        self.tok = model.tokenizer
        self.model_id = settings.model_name or _default_model_name(model)
        self.created = int(time.time())
        t = cfg.tokens
        self.reserved = {t.pad, t.chat_start, t.chat_end, t.image, t.image_gen, t.img_start, t.img_end, t.no_mean}

    def check_model(self, f: Fields) -> None:
        name = f.str("model", None)
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", type="invalid_request_error", code="model_not_found")

    def check_text(self, text: str, param: str) -> None:
        """Refuse the model's control tokens inside user text (they would forge image slots or turns)."""
        if not self.tok:
            return
        bad = [i for i in self.tok.encode(text) if i < 0 or i in self.reserved]
        if bad:
            names = sorted({(self.tok.id_to_token(i) if i >= 0 else "<image>") or str(i) for i in bad})
            raise _bad(f"'{param}' contains the reserved token(s) {', '.join(names)}; send images as image_url "
                       "parts and plain text otherwise", param, code="reserved_token")

    def positions(self, ids: list[int]) -> int:
        """Sequence positions of an encoded prompt: each image placeholder expands to the model's image tokens;
        prompts without an image carry one (the reference's noise picture)."""
        n_ph = sum(1 for x in ids if x < 0)
        return len(ids) - n_ph + self.image_tokens * max(n_ph, 1)

    def check_prompt_length(self, n: int, extra: int, param: str, extra_name: str) -> None:
        if n > self.max_prompt:
            limit = (f"exceeds the model's context of {self.context}" if self.max_prompt == self.context
                     else f"is over the limit of {self.max_prompt}")
            raise _bad(f"'{param}' is {n} tokens (images included), which {limit} tokens; shorten it", param,
                       code="context_length_exceeded")
        if n + extra > self.context:
            raise _bad(f"'{param}' is {n} tokens and {extra_name} adds {extra}: {n + extra} exceeds the model's "
                       f"context of {self.context} tokens; shorten the prompt or lower {extra_name}", param,
                       code="context_length_exceeded")

    def tokenizer(self):
        if self.tok is None:
            raise ApiError(501, "this model directory has no tokenizer; text tasks are unavailable",
                           type="server_error", code="no_tokenizer")
        return self.tok

    def decode_image(self, data: bytes, param: str):
        from cheers.processor import ImageError, load_image

        if len(data) > self.settings.max_image_bytes:
            raise _bad(f"'{param}': image is {len(data)} bytes, over the limit of {self.settings.max_image_bytes}",
                       param, code="image_too_large")
        if not data:
            raise _bad(f"'{param}': empty image data", param, code="invalid_image")
        try:
            return load_image(bytes(data), max_pixels=self.settings.max_image_pixels)
        except ImageError as err:
            raise _bad(f"'{param}' is not a usable image: {err.cause}", param, code="invalid_image") from None

    def image_from_url(self, url: Any, param: str):
        if not isinstance(url, str):
            raise _bad(f"'{param}' must be a data URL string, got {_json_type(url)}", param)
        if re.match(r"(?i)https?://", url):
            raise _bad(f"'{param}': remote image URLs are not fetched; send the image inline as a data URL "
                       "(data:image/png;base64,...)", param, code="invalid_image_url")
        if not url.startswith("data:") or "," not in url:
            raise _bad(f"'{param}' must be a data URL like data:image/png;base64,...", param,
                       code="invalid_image_url")
        header, payload = url[5:].split(",", 1)
        parts = header.split(";")
        media = parts[0].strip().lower()
        if media and not (media.startswith("image/") or media == "application/octet-stream"):
            raise _bad(f"'{param}': media type '{media}' is not an image", param, code="invalid_image")
        if "base64" not in [p.strip().lower() for p in parts[1:]]:
            raise _bad(f"'{param}': only base64 data URLs are accepted (data:image/png;base64,...)", param,
                       code="invalid_image_url")
        payload = re.sub(r"\s+", "", payload)
        if len(payload) * 3 // 4 > self.settings.max_image_bytes + 3:
            raise _bad(f"'{param}': image is about {len(payload) * 3 // 4} bytes, over the limit of "
                       f"{self.settings.max_image_bytes}", param, code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"'{param}': the data URL is not valid base64", param, code="invalid_image") from None
        return self.decode_image(data, param)

    def image_options(self, f: Fields) -> tuple[dict[str, Any], int, int]:
        """steps/cfg/shift/sampler (model defaults filled in, so equal settings batch), n and the seed."""
        d = self.model.image_defaults
        s = self.settings
        cfg = f.float("cfg", None, 0.0, 100.0)
        cfg_scale = f.float("cfg_scale", None, 0.0, 100.0)
        if cfg is not None and cfg_scale is not None and cfg != cfg_scale:
            raise _bad(f"'cfg' ({cfg}) and 'cfg_scale' ({cfg_scale}) disagree; give one of them", "cfg_scale")
        opts = {
            "steps": f.int("steps", int(d.steps), 1, s.max_steps),
            "cfg_scale": float(cfg if cfg is not None else cfg_scale if cfg_scale is not None else d.cfg_scale),
            "shift": f.float("shift", float(d.shift), 0.0, 100.0, lo_open=True),
            "sampler": f.str("sampler", d.sampler, choices=SAMPLERS),
            "cfg_interval": f.interval("cfg_interval", tuple(d.cfg_interval)),
        }
        n = f.int("n", 1, 1, min(s.max_n, s.max_queue))
        seed = f.int("seed", None, 0, 2**63 - 1 - n)
        if seed is None:
            seed = secrets.randbelow(2**31)
        size = f.str("size", "auto")
        R = self.resolution
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size)
        if size != "auto" and not (m and int(m.group(1)) == R and int(m.group(2)) == R):
            raise _bad(f"unsupported size {size!r}: this model makes {R}x{R} images only", f.param("size"),
                       code="unsupported_size")
        f.str("response_format", "b64_json", choices=("b64_json",))
        f.str("output_format", "png", choices=("png",))
        self.check_model(f)
        f.str("user", None)
        return opts, n, seed


IMAGE_FIELDS = frozenset({"model", "prompt", "n", "size", "seed", "steps", "cfg", "cfg_scale", "shift", "sampler",
                          "cfg_interval", "response_format", "output_format", "user"})
EDIT_FIELDS = IMAGE_FIELDS | {"image", "images", "edit_start"}
EDIT_FORM_FIELDS = IMAGE_FIELDS | {"image", "image[]", "edit_start"}
CHAT_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                         "repetition_penalty", "stop", "seed", "stream", "stream_options", "n", "user"})
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ImageRequest:
    prompt: str
    n: int
    seed: int
    options: dict[str, Any]
    image: Any = None  # edits: the source PIL image


def parse_image_request(ctx: Context, body: Any) -> ImageRequest:
    f = Fields(body)
    f.only(IMAGE_FIELDS)
    prompt = f.str("prompt", nonempty=True)
    opts, n, seed = ctx.image_options(f)
    tok = ctx.tokenizer()
    ctx.check_text(prompt, "prompt")
    ids = tok.encode_prompt(prompt, task="t2i")
    ctx.check_prompt_length(ctx.positions(ids), ctx.image_tokens + 1, "prompt", "the generated image")
    return ImageRequest(prompt, n, seed, opts)


def parse_edit_request(ctx: Context, body: Any, form: bool = False, upload: tuple[str, bytes] | None = None
                       ) -> ImageRequest:
    """JSON: `image` (data URL) or `images: [{"image_url": data URL}]`; multipart: the uploaded `image` file."""
    f = Fields(body, form=form)
    f.only(EDIT_FORM_FIELDS if form else EDIT_FIELDS)
    prompt = f.str("prompt", nonempty=True)
    opts, n, seed = ctx.image_options(f)
    # start time of the edit (t0 = 1 would leave no step): larger keeps more of the source picture
    opts["edit_start"] = f.float("edit_start", float(ctx.model.image_defaults.edit_start), 0.0, 0.99)
    if form:
        if upload is None:
            raise _bad("missing required file 'image' (multipart/form-data upload)", "image", code="missing_field")
        image = ctx.decode_image(upload[1], "image")
    elif body.get("image") is not None:
        if body.get("images") is not None:
            raise _bad("give 'image' or 'images', not both", "images")
        image = ctx.image_from_url(body["image"], "image")
    elif body.get("images") is not None:
        ims = body["images"]
        if not isinstance(ims, list) or len(ims) != 1:
            raise _bad("'images' must be an array with exactly one image (one source image per edit)", "images")
        im = ims[0]
        if isinstance(im, dict):
            Fields(im, "images[0]").only({"image_url"})
            im = im.get("image_url")
        image = ctx.image_from_url(im, "images[0].image_url")
    else:
        raise _bad("missing required field 'image' (a data URL, or upload a file with multipart/form-data)",
                   "image", code="missing_field")
    tok = ctx.tokenizer()
    ctx.check_text(prompt, "prompt")
    ids = tok.encode_prompt(f"<im_start><image><im_end>\n{prompt}", task="edit")
    ctx.check_prompt_length(ctx.positions(ids), ctx.image_tokens + 1, "prompt", "the generated image")
    return ImageRequest(prompt, n, seed, opts, image)


@dataclass
class ChatRequest:
    conversation: list[dict[str, Any]]
    options: dict[str, Any]
    n: int
    stream: bool
    include_usage: bool
    prompt_tokens: int
    max_tokens: int
    batchable: bool


def parse_chat_request(ctx: Context, body: Any) -> ChatRequest:
    s = ctx.settings
    f = Fields(body)
    f.only(CHAT_FIELDS)
    ctx.check_model(f)
    f.str("user", None)
    msgs = f._raw("messages", _MISSING)
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    tok = ctx.tokenizer()
    conversation, layout, n_images = [], [], 0
    for i, m in enumerate(msgs):
        mf = Fields(m, f"messages[{i}]")
        mf.only(MESSAGE_FIELDS)
        role = mf.str("role", choices=tuple(ROLES))
        mf.str("name", None)
        content = m.get("content")
        texts, images = [], []
        if content is None:
            if role != "assistant":
                raise _bad(f"missing required field 'messages[{i}].content'", f"messages[{i}].content")
        elif isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for k, part in enumerate(content):
                p = f"messages[{i}].content[{k}]"
                pf = Fields(part, p)
                kind = pf.str("type", choices=("text", "image_url"))
                if kind == "text":
                    pf.only({"type", "text"})
                    texts.append(pf.str("text"))
                else:
                    pf.only({"type", "image_url"})
                    iu = part.get("image_url")
                    if isinstance(iu, dict):
                        Fields(iu, f"{p}.image_url").only({"url", "detail"})
                        images.append(ctx.image_from_url(iu.get("url"), f"{p}.image_url.url"))
                    else:
                        images.append(ctx.image_from_url(iu, f"{p}.image_url"))
                    n_images += 1
                    if n_images > s.max_images:
                        raise _bad(f"too many images: more than {s.max_images} in one request", p,
                                   code="too_many_images")
        else:
            raise _bad(f"'messages[{i}].content' must be a string or an array of content parts, got "
                       f"{_json_type(content)}", f"messages[{i}].content")
        text = "\n".join(texts)
        ctx.check_text(text, f"messages[{i}].content")
        conversation.append({"role": ROLES[role], "content": text, "images": images})
        layout.append({"role": ROLES[role],
                       "content": "".join("<im_start><image><im_end>\n" for _ in images) + text})

    t = ctx.model.text_defaults
    max_tokens = f.int("max_completion_tokens", None, 1, s.max_tokens)
    mt = f.int("max_tokens", None, 1, s.max_tokens)
    if max_tokens is not None and mt is not None and mt != max_tokens:
        raise _bad("'max_tokens' and 'max_completion_tokens' disagree; give one of them", "max_tokens")
    max_tokens = max_tokens or mt or min(int(t.max_new_tokens), s.max_tokens)
    temperature = f.float("temperature", float(t.temperature), 0.0, 2.0)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) and x for x in stop):
        stops = tuple(stop)
    else:
        raise _bad("'stop' must be a string or an array of at most 4 non-empty strings", "stop")
    seed = f.int("seed", None, 0, 2**63 - 1)
    opts = {
        "max_new_tokens": max_tokens,
        "temperature": temperature,
        "top_p": f.float("top_p", float(t.top_p), 0.0, 1.0, lo_open=True),
        "top_k": f.int("top_k", int(t.top_k), 0, None),
        "repetition_penalty": f.float("repetition_penalty", float(t.repetition_penalty), 0.0, 10.0, lo_open=True),
        "stop": list(stops),
        "seed": seed if temperature > 0 else 0,
    }
    n = f.int("n", 1, 1, min(s.max_n, s.max_queue))
    stream = f.bool("stream", False)
    include_usage = False
    if body.get("stream_options") is not None:
        so = Fields(body["stream_options"], "stream_options")
        so.only({"include_usage", "continuous_usage_stats"})
        include_usage = so.bool("include_usage", False)
        so.bool("continuous_usage_stats", False)
        if not stream:
            raise _bad("'stream_options' is only allowed with stream: true", "stream_options")
    if stream and n > 1:
        raise _bad("stream: true supports n = 1 only", "n")
    ids = tok.encode_prompt(layout, task="chat")
    prompt_tokens = ctx.positions(ids)
    ctx.check_prompt_length(prompt_tokens, max_tokens, "messages", "max_tokens")
    # sampled replies with a fixed seed run alone so that the seed reproduces them whatever else is queued
    batchable = not (temperature > 0 and seed is not None)
    return ChatRequest(conversation, opts, n, stream, include_usage, prompt_tokens, max_tokens, batchable)


def _chat_key(req: ChatRequest) -> tuple:
    o = req.options
    return ("chat", o["max_new_tokens"], o["temperature"], o["top_p"], o["top_k"], o["repetition_penalty"],
            tuple(o["stop"]), o["seed"] if o["temperature"] > 0 else 0)


def _image_key(task: str, opts: dict[str, Any]) -> tuple:
    return (task, opts["steps"], opts["cfg_scale"], opts["shift"], opts["sampler"], opts["cfg_interval"])


def _png_b64(images: list) -> list[str]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _default_model_name(model: Any) -> str:
    src = str(getattr(model, "source", "") or "")
    if src.startswith("preset:"):
        return src[len("preset:"):]
    name = Path(src).name if src and not src.startswith("<") else ""
    return name or "cheers"


# ---- the application --------------------------------------------------------------------------------------------
def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"`cheers serve` needs {module}: pip install 'cheers[serve]'") from None


def _require_all() -> None:
    for mod in ("fastapi", "uvicorn"):
        _require(mod)
    import importlib.util

    if not (importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")):
        raise ImportError("`cheers serve` needs python-multipart (image uploads): pip install 'cheers[serve]'")


def create_app(model: Any, settings: ServeSettings | None = None):
    """The FastAPI application serving `model` (a loaded `cheers.pipeline.Cheers`)."""
    _require_all()
    from fastapi import FastAPI
    from starlette.requests import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()
    ctx = Context(model, settings)
    runner = ModelRunner(model, settings.max_batch, settings.threads)
    scheduler = Scheduler(runner, settings.max_batch, settings.max_wait_ms, settings.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.close()

    app = FastAPI(title="Cheers API", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler = scheduler
    app.state.context = ctx

    def error_response(err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        typ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(err.status_code, msg, type=typ, headers=dict(err.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        first = (err.errors() or [{}])[0]
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_response(_bad(first.get("msg", "invalid request"), loc))

    @app.exception_handler(Exception)
    async def _unexpected(request, err):
        return error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}", code="internal_error"))

    async def read_body(request) -> bytes:
        limit = settings.max_body_bytes
        cl = request.headers.get("content-length")
        if cl and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, f"request body is {int(cl)} bytes, over the limit of {limit}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(request) -> Any:
        raw = await read_body(request)
        if not raw.strip():
            raise _bad("empty request body: send a JSON object", code="invalid_json")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise _bad("request body is not UTF-8 encoded JSON", code="invalid_json") from None
        except json.JSONDecodeError as err:
            raise _bad(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}",
                       code="invalid_json") from None
        except RecursionError:
            raise _bad("malformed JSON: nested too deeply", code="invalid_json") from None

    async def run_job(job: Job) -> BatchResult:
        fut = scheduler.submit(job)
        try:
            return await fut
        except ApiError:
            raise
        except (ValueError, OSError) as err:  # the model's own input errors (bad image, too long, ...)
            raise _bad(str(err).strip() or type(err).__name__, code="model_rejected") from None
        except Exception as err:  # noqa: BLE001
            raise ApiError(500, f"generation failed: {type(err).__name__}: {err}", code="generation_failed") from None

    def batch_headers(res: BatchResult) -> dict[str, str]:
        return {"X-Cheers-Batch-Size": str(res.batch_size), "X-Cheers-Batch-Id": str(res.batch_id),
                "X-Cheers-Queue-Ms": f"{res.queue_ms:.1f}", "X-Cheers-Run-Ms": f"{res.run_ms:.1f}"}

    # -- endpoints (plain Starlette routes: the handlers parse and validate their bodies themselves) --
    def route(path: str, method: str = "GET"):
        def register(fn):
            app.add_route(path, fn, methods=[method])
            return fn

        return register

    @route("/health")
    async def health(request):
        return JSONResponse({"status": "ok", "model": ctx.model_id, "queued": scheduler.pending_units})

    @route("/favicon.ico")
    async def favicon(request):
        return Response(status_code=204)

    @route("/")
    async def index(request):
        page = WEB_DIR / "index.html"
        if not page.exists():
            raise ApiError(404, f"the demo page is not installed ({page} missing)", type="not_found_error")
        return HTMLResponse(page.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    def model_card() -> dict[str, Any]:
        return {"id": ctx.model_id, "object": "model", "created": ctx.created, "owned_by": "cheers",
                "resolution": ctx.resolution, "context_length": ctx.context,
                "image_defaults": vars(model.image_defaults), "text_defaults": vars(model.text_defaults),
                "limits": {k: v for k, v in settings.public().items() if k.startswith("max_")}}

    @route("/v1/models")
    async def list_models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    @route("/v1/models/{model_id:path}")
    async def get_model(request):
        model_id = request.path_params["model_id"]
        if model_id != ctx.model_id:
            raise ApiError(404, f"model '{model_id}' does not exist; this server serves '{ctx.model_id}'",
                           param="model", type="invalid_request_error", code="model_not_found")
        return JSONResponse(model_card())

    @route("/v1/stats")
    async def stats(request):
        return JSONResponse({**scheduler.stats.as_dict(), "queued": scheduler.pending_units,
                             "settings": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                                          "max_queue": settings.max_queue}})

    @route("/v1/images/generations", "POST")
    async def images_generations(request):
        body = await json_body(request)
        req = await asyncio.to_thread(parse_image_request, ctx, body)
        return await image_response(req, "image", [req.prompt] * req.n)

    @route("/v1/images/edits", "POST")
    async def images_edits(request):
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raw = await read_body(request)

            async def replay():
                return {"type": "http.request", "body": raw, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_files=4, max_fields=32)
            except Exception as err:  # noqa: BLE001 - malformed multipart data
                raise _bad(f"malformed multipart/form-data: {err}", code="invalid_form") from None
            fields: dict[str, Any] = {}
            upload = None
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name not in ("image", "image[]"):
                        raise _bad(f"unexpected file field '{name}' (only 'image' is accepted; masks are not "
                                   "supported)", name, code="unknown_field")
                    if upload is not None:
                        raise _bad("one source image per edit request", name)
                    upload = (value.filename or "upload", await value.read())
                else:
                    if name in fields:
                        raise _bad(f"field '{name}' given twice", name)
                    fields[name] = value
            await form.close()
            for name in ("image", "image[]"):
                if name in fields:
                    raise _bad(f"'{name}' must be an uploaded file, not a text field", name, code="invalid_image")
            req = await asyncio.to_thread(parse_edit_request, ctx, fields, True, upload)
        else:
            body = await json_body(request)
            req = await asyncio.to_thread(parse_edit_request, ctx, body)
        return await image_response(req, "edit", [(req.image, req.prompt)] * req.n)

    async def image_response(req: ImageRequest, task: str, items: list):
        seeds = [req.seed + i for i in range(req.n)]
        res = await run_job(Job(task, _image_key(task, req.options), items, seeds, req.options))
        b64 = await asyncio.to_thread(_png_b64, res.value)
        R = ctx.resolution
        data = [{"b64_json": b, "seed": s} for b, s in zip(b64, seeds)]
        return JSONResponse({"created": int(time.time()), "data": data, "size": f"{R}x{R}", "output_format": "png"},
                            headers=batch_headers(res))

    @route("/v1/chat/completions", "POST")
    async def chat_completions(request):
        body = await json_body(request)
        req = await asyncio.to_thread(parse_chat_request, ctx, body)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            sink = StreamSink(asyncio.get_running_loop())
            job = Job("chat_stream", ("chat_stream", cid), [req.conversation], [0], req.options, batchable=False,
                      sink=sink)
            scheduler.submit(job)  # 503 here, before the stream starts
            return StreamingResponse(stream_chat(req, job, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        job = Job("chat", _chat_key(req), [req.conversation] * req.n, [0] * req.n, req.options,
                  batchable=req.batchable)
        res = await run_job(job)
        texts = res.value
        choices, completion = [], 0
        for i, text in enumerate(texts):
            n_tok = await asyncio.to_thread(count_tokens, text)
            completion += n_tok
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": "length" if n_tok >= req.max_tokens else "stop"})
        usage = {"prompt_tokens": req.prompt_tokens * req.n, "completion_tokens": completion,
                 "total_tokens": req.prompt_tokens * req.n + completion}
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": ctx.model_id,
                             "choices": choices, "usage": usage, "system_fingerprint": None},
                            headers=batch_headers(res))

    def count_tokens(text: str) -> int:
        return len(ctx.tok.encode(text)) if text else 0

    def chunk(cid: str, created: int, delta: dict, finish: str | None, usage: dict | None = None,
              choices: bool = True) -> str:
        data: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": ctx.model_id, "system_fingerprint": None,
                                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                                if choices else []}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream_chat(req: ChatRequest, job: Job, cid: str, created: int):
        sink = job.sink
        try:
            yield chunk(cid, created, {"role": "assistant", "content": ""}, None)
            while True:
                kind, value = await sink.queue.get()
                if kind == "piece":
                    yield chunk(cid, created, {"content": value}, None)
                    continue
                if kind == "error":
                    err = value if isinstance(value, ApiError) else (
                        _bad(str(value), code="model_rejected") if isinstance(value, (ValueError, OSError))
                        else ApiError(500, f"generation failed: {type(value).__name__}: {value}"))
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                text = value or ""
                n_tok = await asyncio.to_thread(count_tokens, text)
                yield chunk(cid, created, {}, "length" if n_tok >= req.max_tokens else "stop")
                if req.include_usage:
                    usage = {"prompt_tokens": req.prompt_tokens, "completion_tokens": n_tok,
                             "total_tokens": req.prompt_tokens + n_tok}
                    yield chunk(cid, created, {}, None, usage=usage, choices=False)
                break
            yield "data: [DONE]\n\n"
        finally:
            sink.cancelled.set()  # the client went away (or we are done): stop generating

    if settings.api_key:
        app.add_middleware(_ApiKeyMiddleware, key=settings.api_key)
    return app


class _ApiKeyMiddleware:
    """Requires `Authorization: Bearer KEY` (or `X-API-Key: KEY`) on everything but OPEN_PATHS."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            auth = headers.get(b"authorization", b"").strip()
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
            if not token or not hmac.compare_digest(token, self.key):
                from fastapi.responses import JSONResponse

                err = ApiError(401, "missing API key: send 'Authorization: Bearer <key>'" if not token
                               else "invalid API key", code="invalid_api_key")
                resp = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- command line -----------------------------------------------------------------------------------------------
def warm_up(model: Any) -> None:
    """One tiny call per task so the first real request does not pay one-time initialisation."""
    model.generate_image(["warm up"], seed=0, steps=1)
    if getattr(model, "tokenizer", None) is not None:
        model.chat([{"role": "user", "content": "hi"}], max_new_tokens=1)


def serve(model: Any, settings: ServeSettings) -> None:
    """Run the server in the foreground until interrupted."""
    uvicorn = _require("uvicorn")
    app = create_app(model, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


def add_serve_subcommand(subparsers) -> argparse.ArgumentParser:
    d = ServeSettings()
    p = subparsers.add_parser(
        "serve", help="OpenAI-style HTTP API with batching and a web demo page",
        description="Serve the model over HTTP: /v1/chat/completions, /v1/images/generations, /v1/images/edits, "
                    "/v1/models, /v1/stats, /health, and a demo page at /.")
    p.add_argument("--model", default=None, help="model directory or preset name; default: the embedded model")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype; bf16/fp16 run through autocast on GPU only (default: float32)")
    p.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host}, this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default: {d.port})")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY) on every endpoint but /health; "
                        "default: $CHEERS_API_KEY, else no key")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: directory name)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images or conversations per model call (default: {d.max_batch}; 1 = no batching)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a request waits for others to batch with (default: {d.max_wait_ms:g})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"queued + running images/conversations before answering 503 (default: {d.max_queue})")
    p.add_argument("--max-body-size", type=parse_size, default=d.max_body_bytes,
                   help="largest request body, e.g. 25MB (default: 25MB)")
    p.add_argument("--max-image-size", type=parse_size, default=d.max_image_bytes,
                   help="largest image file, e.g. 16MB (default: 16MB)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help=f"largest image width x height (default: {d.max_image_pixels})")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"images in one chat request (default: {d.max_images})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"upper limit of a request's max_tokens (default: {d.max_tokens})")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens, images included (default: the model's context)")
    p.add_argument("--max-n", type=int, default=d.max_n, help=f"images/choices per request (default: {d.max_n})")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help=f"upper limit of denoising steps (default: {d.max_steps})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the model (default: one per core; lower it when sharing the machine)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up calls before accepting requests")
    p.add_argument("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"],
                   help=f"uvicorn log level (default: {d.log_level})")
    p.set_defaults(func=cmd_serve)
    return p


def settings_from_args(a: argparse.Namespace) -> ServeSettings:
    for name in ("max_batch", "max_queue", "max_n", "max_steps", "max_tokens", "max_images", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if a.max_wait_ms < 0:
        raise ValueError("--max-wait-ms must be >= 0")
    return ServeSettings(
        host=a.host, port=a.port, api_key=a.api_key or os.environ.get("CHEERS_API_KEY") or None,
        model_name=a.model_name, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_queue=a.max_queue,
        max_body_bytes=a.max_body_size, max_image_bytes=a.max_image_size, max_image_pixels=a.max_image_pixels,
        max_images=a.max_images, max_tokens=a.max_tokens, max_prompt_tokens=a.max_prompt_tokens, max_n=a.max_n,
        max_steps=a.max_steps, threads=a.threads, warmup=not a.no_warmup, log_level=a.log_level,
    )


def cmd_serve(a: argparse.Namespace) -> int:
    settings = settings_from_args(a)
    _require_all()
    import torch

    from cheers.pipeline import Cheers

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = Cheers.from_pretrained(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    if settings.warmup:
        warm_up(model)
    name = settings.model_name or _default_model_name(model)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"cheers serve: warning: listening on {settings.host} without an API key; anyone who can reach "
              "this address can use the model (set --api-key or CHEERS_API_KEY)", file=sys.stderr)
    print(f"cheers serve: {name} ({model.config.resolution} px) on http://{settings.host}:{settings.port}  "
          f"[batch <= {settings.max_batch}, wait {settings.max_wait_ms:g} ms, queue {settings.max_queue}"
          f"{', API key required' if settings.api_key else ''}]", file=sys.stderr, flush=True)
    serve(model, settings)
    return 0
