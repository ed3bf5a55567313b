"""Continuous batching of text generation: every chat reply, streamed or not, decodes in one running batch that
sequences join and leave between tokens.

The running batch keeps one key/value cache for all its rows. Each step first prefills the newcomers (together,
as one left-padded batch) and merges their caches into the running one: both are right-aligned to a common
length, the columns in front of a shorter row are padding that no query attends to, and every row keeps its own
position counter, so a row sees exactly the positions it would see alone (rotary embeddings depend only on
position differences). Then one forward gives every row its next token, each row choosing it with its own
sampling settings and random generator (so a seeded reply is the same whatever else is running). Finished and
abandoned rows leave at once; padding columns no row needs any more are cut off the front of the cache.

All methods run in the model thread; `step` returns what happened as events for the event loop to deliver.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cheers import sampling as S
from cheers.serve.scheduler import Job, JobCancelled  # noqa: F401 (JobCancelled re-exported)

TEXT_TASKS = ("chat", "chat_stream")
# the options the pipeline's own text sampling takes; the others (penalties, logit bias, logprobs) apply here
MODEL_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed")


@dataclass
class Completion:
    """One finished reply."""

    text: str
    tokens: int  # generated tokens (a stop token not counted)
    finish_reason: str  # "stop" (stop token or string) | "length" (max tokens)
    logprobs: list[dict] | None = None  # OpenAI's logprobs.content entries, when asked for
    peak: int = 0  # the largest running batch it decoded in


@dataclass
class Seq:
    """One reply being generated: its sampling state, what it has produced, and what has been streamed."""

    job: Job
    unit: int
    sampling: S.TextSampling
    stops: list[str]
    prompt_ids: list[int]
    gen: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [V] bool: repetition penalty's prompt + generated tokens
    counts: torch.Tensor | None = None  # [V] generated-token counts: presence / frequency penalties
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: str = ""  # streamed so far
    finish: str | None = None
    logprobs: list[dict] | None = None
    pending_logprobs: list[dict] = field(default_factory=list)  # entries not yet streamed
    peak: int = 0  # the largest running batch it decoded in

    @property
    def opts(self) -> dict[str, Any]:
        return self.job.options


class TextEngine:
    """The running text batch of one model (see the module docstring)."""

    tasks = TEXT_TASKS

    def __init__(self, model: Any, max_rows: int = 64, max_prefill: int = 16, threads: int | None = None):
        if max_rows < 1 or max_prefill < 1:
            raise ValueError("max_rows and max_prefill must be >= 1")
        self.model = model
        self.max_rows = max_rows
        self.max_prefill = max_prefill
        self.threads = threads
        self._threads_set = False
        self.seqs: list[Seq] = []
        self._finished: dict[int, list[Seq]] = {}  # job id -> its finished replies while others still run
        self.cache = None
        self.valid: torch.Tensor | None = None  # [B, S] real cached positions
        self.pos: torch.Tensor | None = None  # [B] position of each row's next token
        self.hidden: torch.Tensor | None = None  # [B, d] newest hidden state of each row
        self.steps = 0  # decoding steps run (a step gives every running row one token)
        self.tokens = 0  # tokens generated
        self.largest = 0  # the most rows ever decoded together

    # ---- what the scheduler asks ----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self.seqs)

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def stats(self) -> dict[str, int]:
        return {"steps": self.steps, "tokens": self.tokens, "running": len(self.seqs), "largest_running": self.largest,
                "max_running": self.max_rows}

    def room(self) -> int:
        """Rows that may still join (the scheduler lets an idle engine take one job of any size)."""
        return max(0, self.max_rows - len(self.seqs))

    # ---- one step (model thread) ----------------------------------------------------------------------------
    def step(self, joiners: list[Job]) -> list[tuple]:
        """Admit `joiners`, then generate one token for every row. Returns events in order:
        ("piece", job, text, logprobs entries) for streams, ("done", job, [Completion per unit]),
        ("error", job, exception), ("dropped", job) for jobs that went away."""
        if self.threads and not self._threads_set:  # per thread in some OpenMP builds: set it here
            torch.set_num_threads(self.threads)
            self._threads_set = True
        events: list[tuple] = []
        with torch.no_grad():
            self._drop_gone(events)
            if joiners:
                self._admit(joiners, events)
            if self.seqs:
                try:
                    self._decode(events)
                except Exception as err:  # noqa: BLE001 - the batch is lost; its clients hear why
                    for job in dict.fromkeys(s.job for s in self.seqs):
                        events.append(("error", job, err))
                    self._reset()
        return events

    def fail_all(self, err: Exception) -> list[tuple]:
        """Drop every row (e.g. on shutdown): an error event per job."""
        events = [("error", job, err) for job in dict.fromkeys(s.job for s in self.seqs)]
        self._reset()
        return events

    # ---- joining --------------------------------------------------------------------------------------------
    def _admit(self, jobs: list[Job], events: list[tuple]) -> None:
        try:
            self._prefill(jobs)
        except Exception as err:  # noqa: BLE001 - one bad request must not fail the others joining with it
            if len(jobs) == 1:
                events.append(("error", jobs[0], err))
                return
            for job in jobs:
                self._admit([job], events)

    def _prefill(self, jobs: list[Job]) -> None:
        m = self.model
        convs, seeds, seqs = [], [], []
        for job in jobs:
            if job.options.get("seed") is None:
                job.options["seed"] = secrets.randbelow(2**31)
            opts = {k: job.options[k] for k in MODEL_OPTIONS if k in job.options}
            extra = {k: job.options.get(k) for k in ("presence_penalty", "frequency_penalty")}
            s, stops = m._sampling(opts)
            for unit, conv in enumerate(job.items):
                convs.append(conv)
                # every reply of a request draws the request's noise picture; choice k samples with seed + k
                seeds.append(int(s.seed))
                seq = Seq(job, unit, s, stops, [])
                if s.temperature > 1e-6:
                    seq.gen = torch.Generator(device="cpu").manual_seed(int(s.seed) + unit)
                if extra["presence_penalty"] or extra["frequency_penalty"]:
                    seq.counts = torch.zeros(m.config.text.vocab_size, device=m.device)
                if job.options.get("logprobs") is not None:
                    seq.logprobs = []
                seqs.append(seq)
        rows, pixels = m._text_rows(convs)
        for seq, row in zip(seqs, rows):
            m._check_length([row], seq.sampling.max_new_tokens, "prompt")
            seq.prompt_ids = row
            if seq.sampling.repetition_penalty != 1.0:
                seq.seen = torch.zeros(m.config.text.vocab_size, dtype=torch.bool, device=m.device)
                seq.seen[torch.tensor(row, device=m.device).clamp(min=0)] = True
        prefix = m._prefill(rows, m._latents(m._row_images(rows, seeds, pixels)))
        for job in jobs:
            job.t_start = time.monotonic()
        self._merge(prefix, seqs)

    def _merge(self, prefix: S.Prefix, seqs: list[Seq]) -> None:
        """Add prefilled rows to the running batch, both right-aligned to the longer cache."""
        n_new, L_new = len(seqs), prefix.cache.length
        pos_new = torch.full((n_new,), L_new, dtype=torch.long, device=prefix.valid.device)
        if not self.seqs:
            self.cache, self.valid, self.pos, self.hidden = prefix.cache, prefix.valid, pos_new, prefix.last_hidden
            self.seqs = seqs
            return
        cache, L_old = self.cache, self.cache.length
        L = max(L_old, L_new)
        B_old = len(self.seqs)
        for layer in range(len(cache.keys)):
            for bufs, new_bufs in ((cache.keys, prefix.cache.keys), (cache.values, prefix.cache.values)):
                old, new = bufs[layer], new_bufs[layer]
                merged = old.new_zeros(B_old + n_new, old.shape[1], L + 64, old.shape[3])
                merged[:B_old, :, L - L_old:L] = old[:, :, :L_old]
                merged[B_old:, :, L - L_new:L] = new[:, :, :L_new]
                bufs[layer] = merged
        valid = self.valid.new_zeros(B_old + n_new, L)
        valid[:B_old, L - L_old:] = self.valid
        valid[B_old:, L - L_new:] = prefix.valid
        cache.length = L
        self.valid = valid
        self.pos = torch.cat([self.pos, pos_new])
        self.hidden = torch.cat([self.hidden, prefix.last_hidden])
        self.seqs = self.seqs + seqs

    # ---- decoding -------------------------------------------------------------------------------------------
    def _decode(self, events: list[tuple]) -> None:
        m = self.model
        B = len(self.seqs)
        self.largest = max(self.largest, B)
        for seq in self.seqs:
            seq.peak = max(seq.peak, B)
        plain = all(self._plain(seq) for seq in self.seqs)
        if plain:  # greedy everywhere: the head's fused argmax, the logits never in memory
            tokens = m.head.greedy(self.hidden).tolist()
        else:
            logits = m.head.logits(self.hidden).float()
            tokens = [self._choose(seq, logits[i]) for i, seq in enumerate(self.seqs)]
        self.steps += 1
        tok = m.tokenizer
        leaving: list[int] = []
        for i, (seq, t) in enumerate(zip(self.seqs, tokens)):
            s = seq.sampling
            if t in s.stop_ids:
                seq.finish = "stop"
            else:
                seq.generated.append(t)
                self.tokens += 1
                if seq.counts is not None:
                    seq.counts[t] += 1
                if seq.seen is not None:
                    seq.seen[t] = True
                text = tok.decode(seq.generated, skip_special_tokens=True)
                cut = min((text.find(x) for x in seq.stops if x in text), default=-1)
                if cut >= 0:
                    text, seq.finish = text[:cut], "stop"
                elif len(seq.generated) >= s.max_new_tokens:
                    seq.finish = "length"
                seq.text = text
            if seq.job.sink is not None:
                self._stream(seq, events)
            if seq.finish:
                leaving.append(i)
        self._finish_jobs(leaving, events)
        if self.seqs:
            self._forward(torch.tensor([s.generated[-1] for s in self.seqs], device=self.hidden.device))

    def _plain(self, seq: Seq) -> bool:
        s, o = seq.sampling, seq.opts
        return (s.temperature <= 1e-6 and seq.seen is None and seq.counts is None and not o.get("logit_bias")
                and seq.logprobs is None)

    def _choose(self, seq: Seq, logits: torch.Tensor) -> int:
        """One row's next token: logit bias and OpenAI's presence/frequency penalties, then the model's own
        sampling (repetition penalty, temperature, top-k, top-p) with the row's generator."""
        s, o = seq.sampling, seq.opts
        raw = logits
        bias = o.get("logit_bias")
        if bias:
            logits = logits.clone()
            ids = torch.tensor([int(k) for k in bias], device=logits.device)
            logits[ids] += torch.tensor([float(v) for v in bias.values()], device=logits.device)
        if seq.counts is not None:
            logits = (logits - seq.counts * float(o.get("frequency_penalty") or 0.0)
                      - (seq.counts > 0).float() * float(o.get("presence_penalty") or 0.0))
        filtered = S._filter_logits(logits[None], s, None if seq.seen is None else seq.seen[None])
        if s.temperature <= 1e-6:
            t = int(filtered.argmax(-1))
        else:
            t = int(torch.multinomial(filtered.softmax(-1).cpu(), 1, generator=seq.gen))
        if seq.logprobs is not None and t not in s.stop_ids:
            entry = self._logprob_entry(raw, t, int(o.get("logprobs") or 0))
            seq.logprobs.append(entry)
            seq.pending_logprobs.append(entry)
        return t

    def _logprob_entry(self, logits: torch.Tensor, t: int, top: int) -> dict:
        """OpenAI's logprobs entry of token t: from the model's distribution before any sampling setting."""
        lp = torch.log_softmax(logits.float(), -1)
        entry = self._token_info(t, float(lp[t]))
        if top:
            vals, ids = lp.topk(top)
            entry["top_logprobs"] = [self._token_info(int(i), float(v)) for v, i in zip(vals, ids)]
        else:
            entry["top_logprobs"] = []
        return entry

    def _token_info(self, t: int, logprob: float) -> dict:
        text = self.model.tokenizer.decode([t])
        return {"token": text, "logprob": max(logprob, -9999.0) if math.isfinite(logprob) else -9999.0,
                "bytes": list(text.encode("utf-8", "replace"))}

    def _stream(self, seq: Seq, events: list[tuple]) -> None:
        """Send the new text of a streamed row, holding back an incomplete character and any tail that may
        still turn out to be the start of a stop string."""
        text = seq.text
        if not seq.finish:
            if text.endswith("\ufffd"):
                return
            hold = max((k for x in seq.stops for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
            text = text[:len(text) - hold]
        if len(text) > len(seq.sent) and text.startswith(seq.sent):
            events.append(("piece", seq.job, text[len(seq.sent):], seq.pending_logprobs))
            seq.sent, seq.pending_logprobs = text, []

    def _finish_jobs(self, leaving: list[int], events: list[tuple]) -> None:
        """Finished rows leave the batch; a job is done when all its replies are (n > 1 finish at their own
        pace)."""
        if not leaving:
            return
        for i in leaving:
            seq = self.seqs[i]
            done = self._finished.setdefault(id(seq.job), [])
            done.append(seq)
            if len(done) == seq.job.units:
                del self._finished[id(seq.job)]
                events.append(("done", seq.job, [Completion(s.text, len(s.generated), s.finish or "length",
                                                            s.logprobs, s.peak)
                                                 for s in sorted(done, key=lambda s: s.unit)]))
        out = set(leaving)
        self._select([k for k in range(len(self.seqs)) if k not in out])

    def _drop_gone(self, events: list[tuple]) -> None:
        """Rows of jobs whose clients went away leave before the next token."""
        gone_jobs = list(dict.fromkeys(s.job for s in self.seqs if s.job.gone))
        if not gone_jobs:
            return
        for job in gone_jobs:
            self._finished.pop(id(job), None)
        self._select([k for k, s in enumerate(self.seqs) if not s.job.gone])
        events.extend(("dropped", job) for job in gone_jobs)

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.hidden.device)
        self.cache.select(idx)
        self.valid, self.pos, self.hidden = self.valid[idx], self.pos[idx], self.hidden[idx]
        self.seqs = [self.seqs[k] for k in keep]
        # columns that were padding for every remaining row: cut them off the front
        first = int(self.valid.any(0).float().argmax())
        if first > 0:
            L = self.cache.length
            for bufs in (self.cache.keys, self.cache.values):
                for layer, buf in enumerate(bufs):
                    bufs[layer] = buf[:, :, first:L + 64].clone()
            self.cache.length = L - first
            self.valid = self.valid[:, first:]

    def _reset(self) -> None:
        self.seqs, self.cache, self.valid, self.pos, self.hidden = [], None, None, None, None
        self._finished.clear()

    def _forward(self, tokens: torch.Tensor) -> None:
        """Every row's newest token through the language model at its own position."""
        lm = self.model.model.model.language_model
        B, L = self.valid.shape
        self.cache.reserve(L + 1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(B, 1)], dim=1)
        mask = None if bool(self.valid.all()) else self.valid[:, None, None, :]
        hidden = lm(lm.embed_tokens(tokens)[:, None], positions=self.pos[:, None], mask=mask, cache=self.cache,
                    start=L)
        self.cache.length = L + 1
        self.pos = self.pos + 1
        self.hidden = hidden[:, -1]
