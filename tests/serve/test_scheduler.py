"""The batching scheduler on its own, with a recording fake model (no server, no torch work)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cheers.serve.errors import ApiError
from cheers.serve.scheduler import Job, Scheduler


class Recorder:
    """An `execute` that records each batch and echoes its items (uppercased), failing on 'boom'."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[tuple[str, list[str]]] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, task, jobs):
        self.threads.add(threading.current_thread().name)
        items = [x for j in jobs for x in j.items]
        self.batches.append((task, items))
        time.sleep(self.delay)
        if any(x == "boom" for x in items):
            if len(jobs) == 1:
                return [(False, ValueError("boom is not allowed"))]
            return [self(task, [j])[0] for j in jobs]
        return [(True, [x.upper() for x in j.items]) for j in jobs]


def run(coro):
    return asyncio.run(coro)


def test_compatible_jobs_share_one_call_and_incompatible_ones_do_not():
    rec = Recorder()

    async def main():
        s = Scheduler(rec, max_batch=8, max_wait_ms=50, max_queue=100)
        await s.start()
        jobs = [Job("image", ("image", 4), [f"a{i}"]) for i in range(5)]
        jobs += [Job("image", ("image", 8), ["b0", "b1"])]  # other steps: other batch
        jobs += [Job("chat", ("chat", 16), ["c0"])]
        futs = [s.submit(j) for j in jobs]
        res = await asyncio.gather(*futs)
        await s.close()
        return res, s

    res, s = run(main())
    assert [r.value for r in res[:5]] == [[f"A{i}"] for i in range(5)]
    assert res[5].value == ["B0", "B1"] and res[6].value == ["C0"]
    assert {r.batch_size for r in res[:5]} == {5} and len({r.batch_id for r in res[:5]}) == 1
    assert sorted(len(items) for _, items in rec.batches) == [1, 2, 5]
    assert rec.threads == {"cheers-model_0"}  # one model thread
    assert s.stats.largest == 5 and s.pending_units == 0


def test_max_batch_splits_and_keeps_order():
    rec = Recorder()

    async def main():
        s = Scheduler(rec, max_batch=3, max_wait_ms=30, max_queue=100)
        await s.start()
        futs = [s.submit(Job("chat", ("k",), [f"x{i}"])) for i in range(7)]
        res = await asyncio.gather(*futs)
        await s.close()
        return res

    res = run(main())
    assert [r.value[0] for r in res] == [f"X{i}" for i in range(7)]
    assert [len(items) for _, items in rec.batches] == [3, 3, 1]
    assert [items for _, items in rec.batches][0] == ["x0", "x1", "x2"]


def test_requests_arriving_while_busy_are_batched_without_waiting():
    rec = Recorder(delay=0.2)

    async def main():
        s = Scheduler(rec, max_batch=16, max_wait_ms=0, max_queue=100)
        await s.start()
        first = s.submit(Job("chat", ("k",), ["first"]))
        await asyncio.sleep(0.05)  # the first batch is running now
        rest = [s.submit(Job("chat", ("k",), [f"r{i}"])) for i in range(6)]
        res = await asyncio.gather(first, *rest)
        await s.close()
        return res

    res = run(main())
    assert res[0].batch_size == 1 and {r.batch_size for r in res[1:]} == {6}


def test_queue_limit_answers_503_and_frees_up():
    rec = Recorder(delay=0.1)

    async def main():
        s = Scheduler(rec, max_batch=1, max_wait_ms=0, max_queue=3)
        await s.start()
        futs = [s.submit(Job("chat", ("k",), ["a", "b"])), s.submit(Job("chat", ("k",), ["c"]))]
        with pytest.raises(ApiError) as err:
            s.submit(Job("chat", ("k",), ["d"]))
        await asyncio.gather(*futs)
        later = await s.submit(Job("chat", ("k",), ["e"]))
        await s.close()
        return err.value, later, s

    err, later, s = run(main())
    assert err.status == 503 and err.code == "queue_full" and "limit 3" in err.message
    assert later.value == ["E"] and s.stats.rejected == 1 and s.pending_units == 0


def test_a_failing_request_does_not_fail_its_batch():
    rec = Recorder()

    async def main():
        s = Scheduler(rec, max_batch=8, max_wait_ms=50, max_queue=100)
        await s.start()
        futs = [s.submit(Job("chat", ("k",), [x])) for x in ("ok1", "boom", "ok2")]
        res = await asyncio.gather(*futs, return_exceptions=True)
        await s.close()
        return res

    ok1, boom, ok2 = run(main())
    assert ok1.value == ["OK1"] and ok2.value == ["OK2"]
    assert isinstance(boom, ValueError) and "boom" in str(boom)


def test_cancelled_jobs_are_dropped_before_running():
    rec = Recorder(delay=0.2)

    async def main():
        s = Scheduler(rec, max_batch=1, max_wait_ms=0, max_queue=10)
        await s.start()
        a = s.submit(Job("chat", ("k",), ["a"]))
        await asyncio.sleep(0.05)
        b = s.submit(Job("chat", ("k",), ["b"]))
        b.cancel()
        await a
        await asyncio.sleep(0.05)
        await s.close()
        return s

    s = run(main())
    assert [items for _, items in rec.batches] == [["a"]] and s.pending_units == 0


def test_a_lone_request_on_an_idle_server_does_not_wait():
    rec = Recorder()

    async def main():
        s = Scheduler(rec, max_batch=16, max_wait_ms=500, max_queue=10)
        await s.start()
        t0 = time.monotonic()
        await s.submit(Job("chat", ("k",), ["alone"]))
        took = time.monotonic() - t0
        await s.close()
        return took

    assert run(main()) < 0.4  # well under the 500 ms batching window


def test_queue_limit_by_memory():
    """Requests that hold a lot (decoded images) fill the queue by bytes before they fill it by count; a request
    alone is always taken, whatever it holds."""
    rec = Recorder(delay=0.1)

    async def main():
        s = Scheduler(rec, max_batch=1, max_wait_ms=0, max_queue=100, max_queue_bytes=1000)
        await s.start()
        big = s.submit(Job("chat", ("k",), ["a"], nbytes=5000))  # over the budget, but alone
        with pytest.raises(ApiError) as err:
            s.submit(Job("chat", ("k",), ["b"], nbytes=10))
        await big
        small = [s.submit(Job("chat", ("k",), [f"s{i}"], nbytes=400)) for i in range(2)]
        with pytest.raises(ApiError):
            s.submit(Job("chat", ("k",), ["c"], nbytes=300))  # 800 + 300 > 1000
        await asyncio.gather(*small)
        after = await s.submit(Job("chat", ("k",), ["d"], nbytes=900))
        await s.close()
        return err.value, after, s

    err, after, s = run(main())
    assert err.status == 503 and err.code == "queue_full" and "MiB" in err.message
    assert after.value == ["D"] and s.stats.rejected == 2 and s.pending_units == 0 and s.pending_bytes == 0


def test_shutdown_refuses_new_jobs_finishes_what_it_can_and_answers_the_rest_503():
    rec = Recorder(delay=0.15)

    async def main():
        s = Scheduler(rec, max_batch=1, max_wait_ms=0, max_queue=10)
        await s.start()
        futs = [s.submit(Job("chat", ("k",), [x])) for x in ("a", "b", "c", "d")]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await s.shutdown(0.2)  # a finishes (0.15 s), b is running, c and d are queued
        took = time.monotonic() - t0
        with pytest.raises(ApiError) as late:
            s.submit(Job("chat", ("k",), ["e"]))
        res = await asyncio.gather(*futs, return_exceptions=True)
        await s.close()
        return res, late.value, took, s

    res, late, took, s = run(main())
    assert res[0].value == ["A"]
    assert all(isinstance(r, ApiError) and r.status == 503 and r.code == "shutting_down" for r in res[1:])
    assert late.status == 503 and late.code == "shutting_down" and 0.19 < took < 0.5
    assert s.pending_units == 0 and not s.ready


class FakeEngine:
    """Records the jobs each step admits; every admitted job finishes after `steps` steps."""

    tasks = ("chat",)

    def __init__(self, max_rows: int, steps: int = 3, max_prefill: int = 16):
        self.max_rows, self.max_prefill, self.steps = max_rows, max_prefill, steps
        self.rows: list[list] = []  # [job, steps left]
        self.admitted: list[list[str]] = []
        self.largest = 0

    @property
    def active(self):
        return bool(self.rows)

    def room(self):
        return max(0, self.max_rows - sum(j.units for j, _ in self.rows))

    def step(self, joiners):
        if joiners:
            self.admitted.append([x for j in joiners for x in j.items])
        self.rows += [[j, self.steps] for j in joiners]
        self.largest = max(self.largest, sum(j.units for j, _ in self.rows))
        events = []
        for row in self.rows:
            row[1] -= 1
            if row[1] == 0:
                events.append(("done", row[0], [x.upper() for x in row[0].items]))
        self.rows = [r for r in self.rows if r[1] > 0]
        time.sleep(0.002)
        return events


def test_text_jobs_join_the_running_batch_up_to_max_running():
    async def main(max_rows):
        engine = FakeEngine(max_rows)
        s = Scheduler(Recorder(), max_batch=16, max_wait_ms=0, max_queue=100, engine=engine)
        await s.start()
        futs = [s.submit(Job("chat", ("k",), [f"q{i}"])) for i in range(6)]
        futs.append(s.submit(Job("chat", ("k",), ["a", "b", "c"])))  # n = 3
        res = await asyncio.gather(*futs)
        await s.close()
        return res, engine

    res, engine = run(main(4))
    assert [r.value for r in res] == [["Q0"], ["Q1"], ["Q2"], ["Q3"], ["Q4"], ["Q5"], ["A", "B", "C"]]
    assert engine.largest <= 4 and engine.admitted[0] == ["q0", "q1", "q2", "q3"]
    res, engine = run(main(1))  # one at a time; a job asking for 3 replies still runs, alone
    assert engine.admitted == [["q0"], ["q1"], ["q2"], ["q3"], ["q4"], ["q5"], ["a", "b", "c"]]
