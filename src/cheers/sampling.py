"""Inference loops on top of `CheersModel`: prompt prefill with a KV cache, the flow-matching image sampler with
classifier-free guidance (conditional and unconditional rows in one batched pass, the image read once per step),
and autoregressive text decoding.

Batches are left-padded: every row's new tokens then sit at the same cache slot, and RoPE only sees relative
positions, so a row's result does not depend on the other rows in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from cheers.decoding import OutputHead
from cheers.model.cheers import CheersModel
from cheers.model.qwen2 import KVCache
from cheers.samplers import get_sampler

@dataclass
class Prefix:
    """A prefilled batch: the cache, which cached positions are real, and the last position's hidden state."""

    cache: KVCache
    valid: torch.Tensor  # [B, S] bool
    last_hidden: torch.Tensor  # [B, d]
    hidden: torch.Tensor | None = None  # [B, S, d] (kept only on request)

    def __post_init__(self) -> None:
        # committed positions are always real, so this never changes; kept as a bool to spare a sync per token
        self.all_valid = bool(self.valid.all())

    @property
    def length(self) -> int:
        return self.cache.length

    def commit(self, n: int, last_hidden: torch.Tensor) -> None:
        """Make the next n written cache positions part of the prefix; `last_hidden` [B, d] is the newest state."""
        self.cache.length += n
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], n)], dim=1)
        self.last_hidden = last_hidden


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> (ids [B, L], attention_mask [B, L]) padded on the left."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, L - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def prefill(model: CheersModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, latents: torch.Tensor,
            keep_hidden: bool = False) -> Prefix:
    """Run a prompt batch (images read at t = 1 from their clean latents) and keep its KV cache."""
    reading = model.read_latents(latents)
    lay = model.layout(input_ids, attention_mask, reading.tokens, align_right=True)
    cache = model.new_cache()
    hidden = model.model.language_model(lay.embeds, mask=lay.mask, cache=cache)
    cache.length = hidden.shape[1]
    return Prefix(cache, lay.valid, hidden[:, -1], hidden if keep_hidden else None)


def _step_mask(prefix: Prefix, n: int, causal: bool) -> torch.Tensor | None:
    """Mask for n new positions on top of the cache: real cached positions + (causally or fully) the new ones."""
    if prefix.all_valid:
        return None
    B, S = prefix.valid.shape
    new = torch.ones(n, n, dtype=torch.bool, device=prefix.valid.device)
    if causal:
        new = new.tril()
    return torch.cat([prefix.valid[:, None, :].expand(B, n, S), new.expand(B, n, n)], dim=2)[:, None]


@torch.no_grad()
def extend(model: CheersModel, prefix: Prefix, embeds: torch.Tensor, causal: bool = True, commit: bool = True) -> torch.Tensor:
    """Append positions [B, n, d] to the cache; returns their hidden states. Uncommitted writes are overwritten
    by the next call (how the sampler re-evaluates the image block at every step)."""
    n = embeds.shape[1]
    mask = _step_mask(prefix, n, causal)
    prefix.cache.reserve(prefix.length + n)
    hidden = model.model.language_model(embeds, mask=mask, cache=prefix.cache, start=prefix.length, causal=causal)
    if commit:
        prefix.commit(n, hidden[:, -1])
    return hidden


# ---- images -----------------------------------------------------------------------------------------------------


def time_grid(steps: int, shift: float = 1.0, t0: float = 0.0) -> list[float]:
    """`shift(linspace(t0, 1, steps))` with shift(t) = a t / (1 + (a - 1) t) (spec §E.1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = torch.linspace(t0, 1.0, steps, dtype=torch.float64) if steps > 1 else torch.tensor([1.0], dtype=torch.float64)
    return [float(shift * t / (1 + (shift - 1) * t)) for t in base]


def guidance_interval(value: Any) -> tuple[float, float]:
    """A guidance interval (lo, hi) with 0 <= lo <= hi <= 1, or a ValueError that shows what was given."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval {value!r}: expected two numbers (lo, hi)") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval ({lo}, {hi}): expected 0 <= lo <= hi <= 1 (t = 0 is noise, t = 1 the image)")
    return lo, hi


@dataclass
class GuidedVelocity:
    """v(x, t) for a batch of B images whose prompts were prefilled as B conditional rows followed (when guided)
    by B unconditional rows. The image is decoded and read by the ViT once per call, shared by both rows.

    `interval` = (lo, hi): guidance only for lo <= t <= hi (t = 0 is noise); elsewhere the conditional velocity
    alone, computed on the B conditional rows only (a view of the same cache), so unguided steps cost half.
    Kynkaanniemi et al. 2024 guide only the middle of the trajectory; the embedded model draws best when guided
    only near the noise, where its shapes are chosen."""

    model: CheersModel
    prefix: Prefix
    cfg_scale: float
    guided: bool
    trace: list[dict[str, torch.Tensor]] | None = None
    interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.interval = guidance_interval(self.interval)
        self._cond: Prefix | None = None

    def guides(self, t: float) -> bool:
        return self.guided and self.interval[0] <= t <= self.interval[1]

    def _conditional(self, B: int, n: int) -> Prefix:
        """The first B rows of the prefilled prefix, sharing its cache storage (writes land in the same buffers)."""
        if self._cond is None:
            full = self.prefix.cache
            full.reserve(self.prefix.length + n)  # grow now, never later, so the views stay the live buffers
            view = KVCache(len(full.keys))
            view.keys = [k[:B] if k is not None else None for k in full.keys]
            view.values = [v[:B] if v is not None else None for v in full.values]
            view.length = full.length
            self._cond = Prefix(view, self.prefix.valid[:B], self.prefix.last_hidden[:B])
        return self._cond

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, commit: bool = False) -> torch.Tensor:
        m, B = self.model, x.shape[0]
        # the ODE state may be float32 while the weights are bf16/fp16: the network runs in the weights' dtype
        reading = m.read_latents(x.to(m.lm_head.weight.dtype))
        tokens, detail = reading.tokens, reading.detail
        guide = self.guides(t)
        if guide:
            tokens, detail = torch.cat([tokens, tokens]), torch.cat([detail, detail])
        prefix = self._conditional(B, tokens.shape[1]) if self.guided and not guide else self.prefix
        hidden = extend(m, prefix, tokens, causal=False, commit=commit)
        tt = torch.full((hidden.shape[0],), t, dtype=x.dtype, device=x.device)
        v = m.velocity_head(hidden, tt, detail).velocity.to(x.dtype)
        if not guide:
            out = v
        else:
            v_c, v_u = v[:B], v[B:]
            out = v_u + self.cfg_scale * (v_c - v_u)
        if self.trace is not None:
            self.trace.append({"t": torch.tensor(t), "x": x.clone(), "v": v.clone(), "v_cfg": out.clone(),
                               "guided": torch.tensor(guide)})
        return out


def integrate(velocity: GuidedVelocity, x: torch.Tensor, grid: list[float], sampler: str = "euler",
              progress: Callable[[int], None] | None = None, seeds: list[int] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from grid[0] to grid[-1] with a registered sampler (`cheers.samplers.SAMPLERS`), then
    the reference's extra step of size 1/len(grid) at t = 1. The last evaluation commits its image block to the
    cache, like the reference. Samplers that draw fresh noise (renoise) take it per image from `seeds` and the
    step (`step_noise`), so an image does not depend on its batch."""
    rule = get_sampler(sampler)
    if rule.needs_seeds and (seeds is None or len(seeds) != x.shape[0]):
        raise ValueError(f"the {sampler} sampler needs one seed per image ({x.shape[0]}), got {seeds!r}")

    def draw(i: int) -> torch.Tensor:
        return step_noise(tuple(x.shape[1:]), seeds, i, x.device, x.dtype)

    n = len(grid)
    for i in range(n - 1):
        t, t_next = grid[i], grid[i + 1]
        x = rule.update(velocity, x, velocity(x, t), t, t_next, i, draw)
        if progress:
            progress(i)
    v = velocity(x, grid[-1], commit=True)
    x = x + v * (1.0 / n)
    if progress:
        progress(n - 1)
    return x


def step_noise(shape: tuple[int, ...], seeds: list[int], step: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The renoise sampler's fresh noise for `step`: per image, from a seed mixed from the image's seed and the step
    (so an image's draws depend on neither its batch nor its initial noise's generator state)."""
    mixed = [(int(s) * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) % (1 << 63) for s in seeds]
    return noise(shape, mixed, device, dtype)


def noise(shape: tuple[int, ...], seeds: list[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One independent N(0, I) draw per image, each from its own seed (reproducible whatever the batch)."""
    out = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(out).to(device=device, dtype=dtype)


# ---- text -------------------------------------------------------------------------------------------------------


@dataclass
class TextSampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # <= 1e-6: greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None
    # Prompt-lookup speculation for batch-1 greedy decoding: up to this many tokens are drafted by matching the
    # last n-gram against the prompt and the text so far, and verified in one forward; the output is the greedy
    # output (equal up to float rounding of a wider matmul). 0 disables it; None (auto) uses 4 for models of
    # hidden size >= 1024, where a few extra rows per weight read are nearly free. Measured on 2 CPU cores: 5 rows
    # cost 2x one row through a 1536x8960 layer, but 3x through the 64-wide 151,936-token head of the parity
    # model (where drafts slowed decoding from 275 to 180 tok/s).
    speculate: int | None = None


def _filter_logits(logits: torch.Tensor, s: TextSampling, seen: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen is not None:
        # CTRL-style: make already generated/prompt tokens less likely.
        pen = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if s.temperature <= 1e-6:
        return logits
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def decode_tokens(model: CheersModel, prefix: Prefix, s: TextSampling, prompt_ids: torch.Tensor | None = None,
                  logits_hook: Callable[[torch.Tensor], None] | None = None,
                  head: OutputHead | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, one step at a time ([B] long). Rows that emitted a stop id keep
    yielding their stop id (callers track which rows are done). Stops after max_new_tokens or when all rows
    have stopped. `head`: the model's (possibly compiled) `OutputHead`; an eager one by default."""
    head = OutputHead(model) if head is None else head
    B = prefix.last_hidden.shape[0]
    V = model.config.text.vocab_size
    device = prefix.last_hidden.device
    speculate = s.speculate if s.speculate is not None else (4 if model.config.text.hidden_size >= 1024 else 0)
    if speculate > 0 and B == 1 and s.temperature <= 1e-6 and s.repetition_penalty == 1.0 and logits_hook is None:
        yield from _greedy_with_lookup(model, head, prefix, s, prompt_ids, speculate)
        return
    # sampling stays on the device (no copy of the vocabulary-sized distribution to the host); on CPU this is
    # the same generator as before, so seeded CPU samples are unchanged
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    # a host sync per token stalls a GPU: there, finished rows are checked every few tokens (rows that stopped
    # keep yielding their stop id, which callers skip)
    check_every = 1 if device.type == "cpu" else 8
    seen = None
    if s.repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        if prompt_ids is not None:
            ids = prompt_ids.clamp(min=0)
            seen.scatter_(1, ids, True)
    stop = torch.tensor(list(s.stop_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    hidden = prefix.last_hidden
    # plain greedy never needs the logits in memory: the head and the argmax run as one step
    fused_greedy = s.temperature <= 1e-6 and seen is None and logits_hook is None
    nxt_greedy = head.greedy(hidden) if fused_greedy else None
    for step in range(s.max_new_tokens):
        if fused_greedy:
            nxt = nxt_greedy
        else:
            logits = head.logits(hidden).float()
            if logits_hook:
                logits_hook(logits)
            logits = _filter_logits(logits, s, seen)
            if s.temperature <= 1e-6:
                nxt = logits.argmax(-1)
            else:
                probs = logits.softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        if s.stop_ids and (B > 1 or check_every > 1):
            nxt = torch.where(done, stop[0].expand_as(nxt), nxt)
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        yield nxt
        if s.stop_ids:  # (without stop ids no row ever finishes early: spare the per-token checks)
            if B == 1 and check_every == 1:
                if int(nxt) in s.stop_ids:
                    return
            else:
                done |= torch.isin(nxt, stop)
                if (step + 1) % check_every == 0 and bool(done.all()):
                    return
        if fused_greedy:
            mask = _step_mask(prefix, 1, causal=True)
            prefix.cache.reserve(prefix.length + 1)
            hidden, nxt_greedy = head.greedy_step(nxt, prefix.cache, prefix.length, mask)
            prefix.commit(1, hidden)
        else:
            emb = model.model.language_model.embed_tokens(nxt)[:, None]
            hidden = extend(model, prefix, emb)[:, -1]


def lookup_draft(history: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram (n <= max_ngram)
    of `history`; [] when the suffix never occurred before."""
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == tail:
                return history[start + n:start + n + k]
    return []


def _greedy_with_lookup(model: CheersModel, head: OutputHead, prefix: Prefix, s: TextSampling,
                        prompt_ids: torch.Tensor | None, speculate: int) -> Iterator[torch.Tensor]:
    """Batch-1 greedy decoding with prompt-lookup drafts: every forward feeds the pending token plus a draft, and
    one output-head pass over those positions (the head's weights read once) yields every accepted token plus the
    next one. At batch 1 decoding is bound by reading the weights (mostly the vocabulary projection), so accepted
    drafts come almost free; a rejected draft costs a slightly wider forward."""
    stop = set(s.stop_ids)
    history = [] if prompt_ids is None else [int(i) for i in prompt_ids.reshape(-1).tolist() if i >= 0]
    embed = model.model.language_model.embed_tokens
    pending = int(head.greedy(prefix.last_hidden))
    emitted = 0
    while True:
        yield torch.tensor([pending], device=prefix.last_hidden.device)
        emitted += 1
        history.append(pending)
        if pending in stop or emitted >= s.max_new_tokens:
            return
        budget = s.max_new_tokens - emitted  # tokens still allowed after `pending`'s successor
        draft = lookup_draft(history, min(speculate, budget - 1)) if budget > 1 else []
        ids = torch.tensor([[pending] + draft], device=prefix.last_hidden.device)
        hidden = extend(model, prefix, embed(ids), commit=False)[0]
        preds = head.greedy(hidden).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == preds[accepted]:
            accepted += 1
        # keys/values now right: `pending` and the accepted draft; the rejected tail is overwritten next time
        prefix.commit(accepted + 1, hidden[accepted:accepted + 1])
        for tok in draft[:accepted]:
            yield torch.tensor([tok], device=prefix.last_hidden.device)
            emitted += 1
            history.append(tok)
            if tok in stop or emitted >= s.max_new_tokens:
                return
        pending = preds[accepted]


def cfg_rows(rows: list[list[int]], keep: set[int], no_mean: int) -> list[list[int]]:
    """Unconditional prompts: every id except those in `keep` (image placeholders, <im_start>, <im_end>) becomes
    `<no_mean>`; the length is unchanged (spec §E.1)."""
    return [[i if (i < 0 or i in keep) else no_mean for i in r] for r in rows]
