"""The model runner with a fake model: one pipeline call per batch, results split back per job, failures isolated,
and a batch nobody waits for stopped between denoising steps."""

from __future__ import annotations

import threading

from cheers.serve.runner import ModelRunner
from cheers.serve.scheduler import Job, JobCancelled


class FakeModel:
    def __init__(self, steps: int = 4, on_step=None):
        self.calls = []
        self.steps = steps
        self.on_step = on_step
        self.steps_run = 0

    def generate_image(self, prompts, seed, batch_size, progress=None, **kw):
        self.calls.append(("generate_image", list(prompts), list(seed), kw))
        if "bad" in prompts:
            raise ValueError("prompt 'bad' is too long")
        for i in range(self.steps):
            self.steps_run += 1
            if self.on_step:
                self.on_step(i)
            if progress:
                progress(i)
        return [f"img:{p}:{s}" for p, s in zip(prompts, seed)]

    def edit(self, images, instructions, seed, batch_size, progress=None, **kw):
        self.calls.append(("edit", list(images), list(instructions), list(seed), kw))
        return [f"edit:{im}:{ins}" for im, ins in zip(images, instructions)]


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
    assert len(m.calls) == 3  # the batch, then each job alone
    edits = [Job("edit", ("edit",), [("a", "red")], [1], {"steps": 2}), Job("edit", ("edit",), [("b", "blue")], [2])]
    assert r("edit", edits) == [(True, ["edit:a:red"]), (True, ["edit:b:blue"])]


def test_a_batch_nobody_waits_for_stops_between_denoising_steps():
    jobs = [Job("image", ("image",), ["p"], [1]), Job("image", ("image",), ["q"], [2])]

    def leave(step):  # the first client leaves during step 1, the second during step 3
        if step == 1:
            jobs[0].cancel()
        if step == 3:
            jobs[1].sink = None
            jobs[1].cancelled.set()

    m = FakeModel(steps=100, on_step=leave)
    out = ModelRunner(m, max_batch=16)("image", jobs)
    assert [ok for ok, _ in out] == [False, False] and all(isinstance(v, JobCancelled) for _, v in out)
    assert m.steps_run == 4 and "after denoising step 4" in str(out[0][1])
    assert len(m.calls) == 1  # not re-run job by job

    # while one client still waits, the batch goes on
    jobs = [Job("image", ("image",), ["p"], [1]), Job("image", ("image",), ["q"], [2])]
    jobs[0].cancel()
    m = FakeModel(steps=10)
    out = ModelRunner(m, max_batch=16)("image", jobs)
    assert out == [(True, ["img:p:1"]), (True, ["img:q:2"])] and m.steps_run == 10


def test_runner_sets_threads_in_the_model_thread():
    import torch

    before = torch.get_num_threads()
    seen = {}

    def run():
        ModelRunner(FakeModel(steps=1), 4, threads=1)("image", [Job("image", ("i",), ["p"], [0])])
        seen["n"] = torch.get_num_threads()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["n"] == 1
    torch.set_num_threads(before)
