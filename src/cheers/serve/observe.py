"""What operators watch: Prometheus metrics at `GET /metrics` and one structured (JSON) access-log line per request,
both keyed by a request id that is also returned as `X-Request-Id`.

Metrics (prefix `cheers_`): requests and errors by path and status (and error code), request latency, queue
depth, running text replies, batch sizes and batch run time per task, generated tokens and decoding steps,
images made. Rates (tokens/s, images/s) are Prometheus' `rate()` of the counters.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from cheers.serve.scheduler import Scheduler

ACCESS_LOG = "cheers.serve.access"
ROUTE_PATHS = ("/health", "/", "/metrics", "/v1/models", "/v1/stats", "/v1/images/generations", "/v1/images/edits",
               "/v1/chat/completions")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def route_label(path: str) -> str:
    """A bounded label for a path: the route it belongs to, or 'other'."""
    if path in ROUTE_PATHS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class Metrics:
    """The server's Prometheus registry (its own, so several apps in one process do not collide)."""

    def __init__(self, scheduler: Scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = r = CollectorRegistry()
        self.requests = Counter("cheers_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.errors = Counter("cheers_errors", "error responses by status and error code", ["status", "code"],
                              registry=r)
        self.latency = Histogram("cheers_request_seconds", "time to the end of the response", ["path"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch_size = Histogram("cheers_batch_size", "images per image batch; for text, the largest running "
                                    "batch each reply decoded in", ["task"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("cheers_batch_seconds", "run time of an image batch or a text reply",
                                       ["task"], registry=r,
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.images = Counter("cheers_images", "images made (generated or edited)", ["task"], registry=r)
        Gauge("cheers_queue_depth", "images / replies queued or running", registry=r).set_function(
            lambda: scheduler.pending_units)
        Gauge("cheers_queue_bytes", "memory held by queued or running requests", registry=r).set_function(
            lambda: scheduler.pending_bytes)
        Gauge("cheers_ready", "1 while new requests are taken", registry=r).set_function(
            lambda: 1 if scheduler.ready else 0)
        engine = scheduler.engine
        stats = scheduler.stats

        class Live:
            """Counters kept by the scheduler and the text engine, read at scrape time."""

            def collect(self) -> Any:
                for name, help_, value in (
                        ("cheers_rejected", "requests refused with 503 queue_full", stats.rejected),
                        ("cheers_cancelled", "requests dropped because their client went away", stats.cancelled)):
                    yield CounterMetricFamily(name, help_, value=value)
                if engine is not None:
                    yield CounterMetricFamily("cheers_generated_tokens", "tokens generated", value=engine.tokens)
                    yield CounterMetricFamily("cheers_decode_steps", "continuous-batching steps (one token for "
                                              "every running reply)", value=engine.steps)
                    yield GaugeMetricFamily("cheers_running_replies", "replies in the running text batch",
                                            value=engine.rows)

        r.register(Live())
        stats.listeners.append(self.on_batch)

    def on_batch(self, task: str, units: int, jobs: int, run_ms: float) -> None:
        self.batch_size.labels(task).observe(units)
        self.batch_seconds.labels(task).observe(run_ms / 1000)
        if task in ("image", "edit"):
            self.images.labels(task).inc(units)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def access_logger() -> logging.Logger:
    """JSON lines on stderr, independent of uvicorn's log level (they are the server's record of its traffic)."""
    log = logging.getLogger(ACCESS_LOG)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class AccessMiddleware:
    """Gives every request an id (the client's `X-Request-Id` when it is a sane token, else a new one), returns it
    as `X-Request-Id`, counts the request in the metrics and writes one JSON access-log line when the response
    has been sent (or the client went away)."""

    def __init__(self, app: Any, metrics: Metrics | None, log: logging.Logger | None):
        self.app = app
        self.metrics = metrics
        self.log = log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.monotonic()
        info: dict[str, Any] = {"status": 0, "bytes": 0, "batch": None, "code": None}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                hdrs = list(message.get("headers", []))
                for k, v in hdrs:
                    if k.lower() == b"x-cheers-batch-size":
                        info["batch"] = int(v)
                    elif k.lower() == b"x-cheers-error-code":
                        info["code"] = v.decode("latin-1")
                message["headers"] = [(k, v) for k, v in hdrs if k.lower() != b"x-cheers-error-code"] + [
                    (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body":
                info["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._record(scope, rid, info, time.monotonic() - t0)

    def _record(self, scope: dict, rid: str, info: dict, seconds: float) -> None:
        status = info["status"] or 499  # no response started: the client went away first
        path = route_label(scope.get("path", ""))
        if self.metrics is not None:
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(seconds)
            if status >= 400:
                self.metrics.errors.labels(str(status), info["code"] or "").inc()
        if self.log is not None:
            client = scope.get("client")
            self.log.info(json.dumps({
                "ts": round(time.time(), 3), "event": "request", "request_id": rid, "method": scope.get("method"),
                "path": scope.get("path"), "status": status, "ms": round(seconds * 1000, 1),
                "bytes": info["bytes"], "batch": info["batch"], "error": info["code"],
                "client": f"{client[0]}:{client[1]}" if client else None}, ensure_ascii=True))
