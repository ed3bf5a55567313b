"""Runs a batch of image or edit jobs on the model: one pipeline call per batch, in the model thread. (Text jobs
decode in `cheers.serve.engine`.)"""

from __future__ import annotations

from typing import Any

from cheers.serve.scheduler import Job, JobCancelled


class ModelRunner:
    """Turns a batch of jobs into one pipeline call (runs in the model thread).

    A batch that fails is re-run job by job so that one bad request never fails its neighbours. Between denoising
    steps the call stops when every job of the batch is gone (clients disconnected, or the server shutting down).
    """

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
        except JobCancelled as err:
            return [(False, err)] * len(jobs)
        except Exception as err:  # noqa: BLE001 - reported to the client, the server goes on
            if len(jobs) == 1:
                return [(False, err)]
            return [self(task, [j])[0] for j in jobs]  # isolate the failing request
        return [(True, o) for o in outs]

    def _call(self, task: str, jobs: list[Job]) -> list[Any]:
        m = self.model
        seeds = [s for j in jobs for s in j.seeds]
        opts = dict(jobs[0].options)

        def check(step: int) -> None:
            if all(j.gone for j in jobs):
                raise JobCancelled(f"stopped after denoising step {step + 1}: nobody waits for the result")

        if task == "image":
            prompts = [p for j in jobs for p in j.items]
            return split(m.generate_image(prompts, seed=seeds, batch_size=self.max_batch, progress=check, **opts),
                         jobs)
        if task == "edit":
            images = [im for j in jobs for im, _ in j.items]
            instructions = [ins for j in jobs for _, ins in j.items]
            return split(m.edit(images, instructions, seed=seeds, batch_size=self.max_batch, progress=check,
                                **opts), jobs)
        raise ValueError(f"unknown task {task!r}")


def split(outputs: list, jobs: list[Job]) -> list[list]:
    """Cut the batch output back into one list per job, in job order."""
    res, i = [], 0
    for j in jobs:
        res.append(list(outputs[i:i + j.units]))
        i += j.units
    return res


def warm_up(model: Any) -> None:
    """One tiny call per task so the first real request does not pay one-time initialisation."""
    model.generate_image(["warm up"], seed=0, steps=1)
    if getattr(model, "tokenizer", None) is not None:
        model.chat([{"role": "user", "content": "hi"}], max_new_tokens=1)
