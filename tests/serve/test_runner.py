"""The model runner with a fake model: one pipeline call per batch, results split back per job, failures isolated,
streamed pieces pushed to the job's sink."""

from __future__ import annotations

import asyncio

from cheers.serve.runner import ModelRunner
from cheers.serve.scheduler import Job, StreamSink


def run(coro):
    return asyncio.run(coro)


class FakeModel:
    def __init__(self):
        self.calls = []

    def generate_image(self, prompts, seed, batch_size, **kw):
        self.calls.append(("generate_image", list(prompts), list(seed), kw))
        if "bad" in prompts:
            raise ValueError("prompt 'bad' is too long")
        return [f"img:{p}:{s}" for p, s in zip(prompts, seed)]

    def chat(self, convs, stream=False, **kw):
        self.calls.append(("chat", convs, stream, kw))
        if stream:
            return iter(["he", "llo"])
        return [c[-1]["content"][::-1] for c in convs]


def test_model_runner_makes_one_call_per_batch_and_splits_results():
    m = FakeModel()
    r = ModelRunner(m, max_batch=16)
    jobs = [Job("image", ("image",), ["p", "p"], [3, 4], {"steps": 2}),
            Job("image", ("image",), ["q"], [9], {"steps": 2})]
    out = r("image", jobs)
    assert out == [(True, ["img:p:3", "img:p:4"]), (True, ["img:q:9"])]
    assert len(m.calls) == 1 and m.calls[0][2] == [3, 4, 9] and m.calls[0][3] == {"steps": 2}
    # a failure in a batch is retried per job: only the bad one fails
    m.calls.clear()
    out = r("image", [Job("image", ("image",), ["x"], [0]), Job("image", ("image",), ["bad"], [1])])
    assert out[0] == (True, ["img:x:0"]) and out[1][0] is False and "too long" in str(out[1][1])
    convs = [[{"role": "user", "content": "abc"}], [{"role": "user", "content": "xy"}]]
    chat_jobs = [Job("chat", ("c",), [conv], [0], {"seed": 0}) for conv in convs]
    assert r("chat", chat_jobs) == [(True, ["cba"]), (True, ["yx"])]


def test_stream_job_pushes_pieces():
    m = FakeModel()

    async def main():
        sink = StreamSink(asyncio.get_running_loop())
        job = Job("chat_stream", ("s",), [[{"role": "user", "content": "hi"}]], [0], {"seed": 1}, False, sink)
        out = await asyncio.to_thread(ModelRunner(m, 4), "chat_stream", [job])
        pieces = []
        while not sink.queue.empty():
            pieces.append(sink.queue.get_nowait())
        return out, pieces

    out, pieces = run(main())
    assert out == [(True, "hello")] and pieces == [("piece", "he"), ("piece", "llo")]
