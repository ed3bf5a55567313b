"""The batching queue: requests become jobs keyed by task + sampling settings; one dispatcher coroutine groups
compatible jobs and runs each group as one call in a single model thread.

The dispatcher waits up to `max_wait_ms` after the oldest job for more jobs with the same key (up to `max_batch`
images / conversations). Jobs arriving while the model is busy wait in the queue and are grouped when it frees up;
a job that arrives alone on an idle server (nothing else came within `max_wait_ms` before it) runs at once. Queued
work is capped (`max_queue`): above it requests get 503 instead of piling up in memory.
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


@dataclass
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
    gap: float = math.inf  # seconds since the previous request arrived

    @property
    def units(self) -> int:
        return len(self.items)


@dataclass
class BatchResult:
    """What a job's future resolves to."""

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
    """Counts behind /v1/stats: batch sizes per task, requests, rejections, failures and the latest batches."""

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
                 max_wait_ms: float = 20.0, max_queue: int = 64, max_queue_bytes: int | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.execute = execute
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.pending_units = 0
        self.pending_bytes = 0
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
        self._queue.put_nowait(job)
        return job.future

    def _release(self, job: Job) -> None:
        """The job left the queue (done, failed or dropped): its share of the limits is free again."""
        self.pending_units -= job.units
        self.pending_bytes -= job.nbytes

    # -- dispatcher (event loop) --
    def _drain(self, pending: list[Job]) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())

    def _dropped(self, job: Job) -> bool:
        """A job whose client went away before it ran: forget it."""
        gone = job.future.done() or (job.sink is not None and job.sink.cancelled.is_set())
        if gone:
            self._release(job)
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
                        self._release(job)
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
            self._release(job)
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

