"""The batching queue: requests become jobs keyed by task + sampling settings; one dispatcher coroutine runs them
in a single model thread.

Image and edit jobs: the dispatcher waits up to `max_wait_ms` after the oldest job for more jobs with the same key
(up to `max_batch` images) and runs each group as one call. Jobs arriving while the model is busy wait in the
queue and are grouped when it frees up; a job that arrives alone on an idle server (nothing else came within
`max_wait_ms` before it) runs at once.

Text jobs (with an `engine`, `cheers.serve.engine.TextEngine`): continuous batching. Every chat reply, streamed or
not, joins the engine's running batch between two tokens and leaves it when done; the dispatcher runs one token
step at a time, so image batches and newcomers get their turn between tokens.

Queued work is capped by count (`max_queue`) and by memory (`max_queue_bytes`): above either, requests get 503
instead of piling up. A job whose client went away is dropped from the queue, and a running one stops at its
next denoising step or token. `shutdown` refuses new jobs, lets running ones finish within a grace period and
answers the rest 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from cheers.serve.errors import ApiError


@dataclass(eq=False)
class Job:
    """One request: `units` images or conversations that share `key` (task + sampling settings)."""

    task: str  # "image" | "edit" | "chat" | "chat_stream"
    key: tuple
    items: list  # one entry per unit: prompt / (image, instruction) / conversation
    seeds: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    batchable: bool = True
    sink: StreamSink | None = None
    nbytes: int = 0  # memory the request holds while queued (its decoded images, its text)
    future: Any = None
    t_submit: float = 0.0
    t_start: float = 0.0  # when it started running
    gap: float = math.inf  # seconds since the previous request arrived
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def units(self) -> int:
        return len(self.items)

    @property
    def gone(self) -> bool:
        """Nobody waits for the result any more: the client disconnected, or the server gave up on it."""
        return self.cancelled.is_set() or (self.sink is not None and self.sink.cancelled.is_set())

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class BatchResult:
    """What a job's future resolves to."""

    value: Any  # this job's slice of the batch output
    batch_size: int  # units in the model call this job ran in (text: the largest running batch it decoded in)
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
    """Counts behind /v1/stats and /metrics: batch sizes per task, requests, rejections, failures, cancellations
    and the latest batches."""

    def __init__(self) -> None:
        self.batches: dict[str, Counter] = {}
        self.requests: Counter = Counter()
        self.rejected = 0
        self.failed = 0
        self.cancelled = 0
        self.largest = 0
        self.recent: deque = deque(maxlen=64)
        self.listeners: list[Callable[[str, int, int, float], None]] = []

    def record(self, task: str, units: int, jobs: int, run_ms: float, batch_id: int) -> None:
        self.batches.setdefault(task, Counter())[units] += 1
        self.requests[task] += jobs
        self.largest = max(self.largest, units)
        self.recent.append({"id": batch_id, "task": task, "size": units, "requests": jobs, "ms": round(run_ms, 1)})
        for listen in self.listeners:
            listen(task, units, jobs, run_ms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": {t: {"count": sum(c.values()), "sizes": {str(k): v for k, v in sorted(c.items())}}
                        for t, c in self.batches.items()},
            "requests": dict(self.requests),
            "largest_batch": self.largest,
            "rejected_queue_full": self.rejected,
            "failed_requests": self.failed,
            "cancelled_requests": self.cancelled,
            "recent": list(self.recent),
        }


class JobCancelled(Exception):
    """Every job of a running call is gone (clients disconnected, or the server is shutting down)."""


def shutting_down() -> ApiError:
    return ApiError(503, "server shutting down; retry on another replica or later", code="shutting_down",
                    headers={"Retry-After": "5", "Connection": "close"})


class Scheduler:
    """Groups compatible jobs into batches and runs them one at a time in a single model thread.

    `execute(task, jobs)` runs in that thread and returns one `(ok, value_or_exception)` per job. `engine`, if
    given, takes the text tasks it names (`engine.tasks`) and decodes them with continuous batching.
    """

    def __init__(self, execute: Callable[[str, list[Job]], list[tuple[bool, Any]]], max_batch: int = 16,
                 max_wait_ms: float = 20.0, max_queue: int = 64, max_queue_bytes: int | None = None,
                 engine: Any = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.execute = execute
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.pending_units = 0
        self.pending_bytes = 0
        self.closing = False
        self.stats = BatchStats()
        self._live: set[Job] = set()  # submitted and not yet answered
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_submit = -math.inf
        self._text_batch_id: dict[int, int] = {}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cheers-model")
        self._task = asyncio.create_task(self._dispatch(), name="cheers-dispatcher")

    async def close(self) -> None:
        self.closing = True
        self._fail_live(shutting_down())
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new jobs; give the queued and running ones `grace_s` seconds to finish, then answer the rest
        503 (their model work stops at the next step)."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._fail_live(shutting_down())

    @property
    def ready(self) -> bool:
        """Whether new work is taken (for load balancers: not while shutting down)."""
        return not self.closing and self._task is not None and not self._task.done()

    def submit(self, job: Job) -> asyncio.Future:
        """Queue `job`; its future resolves to a `BatchResult` (or raises). 503 when the queue is full."""
        assert self._loop is not None and self._queue is not None, "scheduler not started"
        if self.closing:
            raise shutting_down()
        if self.pending_units + job.units > self.max_queue:
            self.stats.rejected += 1
            raise ApiError(503, f"server busy: {self.pending_units} images/conversations queued or running "
                                f"(limit {self.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        # by memory too (a queue of image-laden chats); one request alone is always taken
        if (self.max_queue_bytes is not None and self.pending_units
                and self.pending_bytes + job.nbytes > self.max_queue_bytes):
            self.stats.rejected += 1
            raise ApiError(503, f"server busy: queued requests hold {self.pending_bytes / 2**20:.0f} MiB (limit "
                                f"{self.max_queue_bytes / 2**20:.0f} MiB); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        job.future = self._loop.create_future()
        job.t_submit = time.monotonic()
        job.gap, self._last_submit = job.t_submit - self._last_submit, job.t_submit
        self.pending_units += job.units
        self.pending_bytes += job.nbytes
        self._live.add(job)
        self._queue.put_nowait(job)
        return job.future

    # -- answering jobs (event loop) --
    def _release(self, job: Job) -> bool:
        """The job left the queue (answered, failed or dropped): its share of the limits is free again. False if
        it had already left."""
        if job not in self._live:
            return False
        self._live.discard(job)
        self.pending_units -= job.units
        self.pending_bytes -= job.nbytes
        return True

    def _resolve(self, job: Job, ok: bool, value: Any, result: BatchResult | None = None) -> None:
        """Answer a job once: its future, or for a stream its sink (the stream's end or an error event)."""
        if not self._release(job):
            return
        if not ok:
            self.stats.failed += 1
        if job.sink is not None:  # streaming: the outcome goes to the stream, nobody awaits the future
            job.sink.queue.put_nowait(("end", value) if ok else ("error", value))
            if not job.future.done():
                job.future.set_result(None)
        elif not job.future.done():
            if ok:
                job.future.set_result(result)
            else:
                job.future.set_exception(value)

    def _fail_live(self, err: ApiError) -> None:
        for job in list(self._live):
            job.cancel()
            self._resolve(job, False, err)

    # -- dispatcher (event loop) --
    def _drain(self, pending: list[Job]) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())

    def _dropped(self, job: Job) -> bool:
        """A job whose client went away (or that was answered already) before it ran: forget it."""
        gone = job.gone or job.future.done() or job not in self._live
        if gone:
            if self._release(job):
                self.stats.cancelled += 1
            if not job.future.done():
                job.future.cancel()
        return gone

    def _is_text(self, job: Job) -> bool:
        return self.engine is not None and job.task in self.engine.tasks

    def _compatible_units(self, pending: list[Job], head: Job) -> int:
        return sum(j.units for j in pending if j.batchable and j.key == head.key)

    def _take(self, pending: list[Job], head: Job) -> tuple[list[Job], list[Job]]:
        batch, rest, units = [head], [], head.units
        for j in pending:
            if j is head:
                continue
            if (head.batchable and j.batchable and j.key == head.key and units + j.units <= self.max_batch
                    and not self._is_text(j)):
                batch.append(j)
                units += j.units
            else:
                rest.append(j)
        return batch, rest

    def _batch_wait(self, pending: list[Job], head: Job) -> float:
        """Seconds the head job still waits for companions before its batch runs (0: run now)."""
        # a request that arrived alone on an idle server runs at once: waiting only adds latency when
        # clients send one request at a time; under concurrent load requests arrive close together
        alone = len(pending) == 1 and head.gap > self.max_wait
        if not head.batchable or alone or self._compatible_units(pending, head) >= self.max_batch:
            return 0.0
        return max(0.0, head.t_submit + self.max_wait - time.monotonic())

    async def _dispatch(self) -> None:
        assert self._queue is not None
        pending: list[Job] = []
        text_turn = False  # after an image batch the running text batch gets a step, so neither starves
        while True:
            busy = self.engine is not None and self.engine.active
            if not pending and not busy:
                pending.append(await self._queue.get())
            self._drain(pending)
            pending = [j for j in pending if not self._dropped(j)]
            joiners: list[Job] = []
            if self.engine is not None:
                room, units, rest = min(self.engine.room(), self.engine.max_prefill), 0, []
                for j in pending:
                    # an idle engine takes its first job whatever its size (n may exceed --max-running)
                    if self._is_text(j) and (units + j.units <= room or not (self.engine.active or joiners)):
                        joiners.append(j)
                        units += j.units
                    else:
                        rest.append(j)
                pending = rest
            others = [j for j in pending if not self._is_text(j)]
            wait = self._batch_wait(others, others[0]) if others else math.inf
            try:
                if others and wait <= 0 and not (text_turn and (joiners or busy)):
                    batch, _ = self._take(others, others[0])
                    pending = [j for j in pending if j not in batch]
                    await self._run(batch)
                    text_turn = True
                elif joiners or busy:
                    await self._step(joiners)
                    text_turn = False
                elif others:  # nothing to decode: wait for companions of the head job, or its deadline
                    with contextlib.suppress(asyncio.TimeoutError):
                        pending.append(await asyncio.wait_for(self._queue.get(), wait))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a scheduler bug must not leave requests hanging forever
                failure = ApiError(500, f"scheduler error: {type(err).__name__}: {err}")
                for job in list(self._live):
                    if job not in pending:
                        job.cancel()  # its model work (a running text row) stops too
                        self._resolve(job, False, failure)

    async def _run(self, batch: list[Job]) -> None:
        assert self._loop is not None
        batch_id = next(self._ids)
        units = sum(j.units for j in batch)
        t0 = time.monotonic()
        for job in batch:
            job.t_start = t0
        try:
            results = await self._loop.run_in_executor(self._executor, self.execute, batch[0].task, batch)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # the executor itself failed
            results = [(False, err)] * len(batch)
        run_ms = (time.monotonic() - t0) * 1000
        self.stats.record(batch[0].task, units, len(batch), run_ms, batch_id)
        for job, (ok, value) in zip(batch, results):
            if job.gone and job in self._live:  # stopped between steps because nobody waits for it
                self._release(job)
                self.stats.cancelled += 1
                continue
            self._resolve(job, ok, value, BatchResult(value, units, batch_id, (t0 - job.t_submit) * 1000, run_ms)
                          if ok else None)

    async def _step(self, joiners: list[Job]) -> None:
        """One continuous-batching step in the model thread; its events delivered here."""
        assert self._loop is not None and self.engine is not None
        if joiners:
            batch_id = next(self._ids)
            for job in joiners:
                self._text_batch_id[id(job)] = batch_id
        try:
            events = await self._loop.run_in_executor(self._executor, self.engine.step, joiners)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # the executor itself failed
            events = self.engine.fail_all(err) + [("error", j, err) for j in joiners]
        now = time.monotonic()
        for ev in events:
            kind, job = ev[0], ev[1]
            if kind == "piece":
                if job.sink is not None and job in self._live:
                    job.sink.queue.put_nowait(("piece", ev[2], ev[3]))
                continue
            batch_id = self._text_batch_id.pop(id(job), 0)
            if kind == "dropped":
                if self._release(job):
                    self.stats.cancelled += 1
                continue
            t_start = job.t_start or now
            if kind == "done":
                peak = max((getattr(c, "peak", 0) for c in ev[2]), default=0) or job.units
                run_ms = (now - t_start) * 1000
                self.stats.record(job.task, peak, 1, run_ms, batch_id)
                self._resolve(job, True, ev[2], BatchResult(ev[2], peak, batch_id, (t_start - job.t_submit) * 1000,
                                                            run_ms))
            else:
                self._resolve(job, False, ev[2])
