"""Runs a batch of jobs on the model: one pipeline call per batch, in the model thread."""

from __future__ import annotations

import secrets
from typing import Any

from cheers.serve.scheduler import Job


class ModelRunner:
    """Turns a batch of jobs into one pipeline call (runs in the model thread).

    A batch that fails is re-run job by job so that one bad request never fails its neighbours.
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
            return split(m.generate_image(prompts, seed=seeds, batch_size=self.max_batch, **opts), jobs)
        if task == "edit":
            images = [im for j in jobs for im, _ in j.items]
            instructions = [ins for j in jobs for _, ins in j.items]
            return split(m.edit(images, instructions, seed=seeds, batch_size=self.max_batch, **opts), jobs)
        if task == "chat":
            convs = [c for j in jobs for c in j.items]
            if opts.get("seed") is None:
                opts["seed"] = secrets.randbelow(2**31)
            return split(m.chat(convs, **opts), jobs)
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
