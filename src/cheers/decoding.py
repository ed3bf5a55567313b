"""`OutputHead`: the vocabulary projection for inference, made fast without changing a single greedy id.

At batch 1 a small model's per-token time is mostly reading its 151,936-row output head, so the head gets three
speed paths, all outside the `nn.Module` (the model stays a plain network):
- eager CPU: a cached [d, V] contiguous copy, which BLAS reads ~3x faster than the [V, d] weight for a few rows;
- compiled (`compile()`): the head as one fused inductor kernel, plus the language model compiled per token;
- compiled with `half_head`: greedy decoding reads a float16 copy and proves, per row, that its argmax is the
  float32 argmax (an error bound); the rare unproven rows are redone in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cheers.model.cheers import CheersModel
from cheers.model.qwen2 import KVCache


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, weight)


def _head_greedy(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, weight).argmax(-1)


def _rowdot_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Written as a broadcast product + reduction so inductor emits one vectorized, threaded kernel; for a few rows
    # against a 151,936 x 64 head it beats the BLAS GEMV ~1.7x on 2 CPU cores. Never run eagerly (it would
    # materialize [.., V, d]).
    return (hidden.unsqueeze(-2) * weight).sum(-1)


def _rowdot_greedy(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _rowdot_logits(hidden, weight).argmax(-1)  # fused: the logits never reach memory


def half_head_greedy(hidden: torch.Tensor, weight16: torch.Tensor, err: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax ids from a float16 copy of the head (half the bytes to read per token; upcast on load, fp32
    arithmetic) and, per row, whether that id is provably the float32 argmax: every approximate logit is within
    ||h||_1 * max|w - w16| of the exact one, so a top-1/top-2 gap above twice that (plus summation-order slack)
    cannot be reordered. Compiled only (eagerly it would materialize [.., V, d])."""
    approx = _rowdot_logits(hidden, weight16.float())
    best, ids = approx.max(-1)
    vocab = torch.arange(approx.shape[-1], device=approx.device)
    runner_up = approx.masked_fill(vocab == ids.unsqueeze(-1), float("-inf")).amax(-1)
    bound = 2 * err * hidden.abs().sum(-1) + 1e-4 * (1 + best.abs())
    return ids, best - runner_up > bound


class OutputHead:
    """Logits, greedy ids and one-token greedy steps of a `CheersModel`, on the fastest exact path available."""

    # Only heads up to this size get the eager column copy: a large model's time is in its body, not its head.
    COLUMN_COPY_BYTES = 256 * 2**20

    def __init__(self, model: CheersModel) -> None:
        self.model = model
        self.compiled = False
        self._logits_fn, self._greedy_fn = _head_logits, _head_greedy
        self._step_fn = self._greedy_step
        self._half_fn = None  # compiled half_head_greedy when the fp16 head copy is on
        self.head16: torch.Tensor | None = None
        self.head16_err = 0.0
        self._cols: torch.Tensor | None = None
        self._cols_key: tuple | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of final hidden states [..., d] -> [..., V]."""
        cols = self.columns()
        return hidden @ cols if cols is not None else self._logits_fn(hidden, self.weight)

    def columns(self) -> torch.Tensor | None:
        """The [d, V] contiguous copy of the head for eager CPU inference, or None when it does not apply (compiled,
        gradients on, not CPU, or a large head). Rebuilt whenever the weight changes (storage or in-place version),
        so an optimizer step never leaves a stale copy."""
        w = self.weight
        if (self.compiled or torch.is_grad_enabled() or w.device.type != "cpu"
                or w.numel() * w.element_size() > self.COLUMN_COPY_BYTES):
            return None
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        if self._cols_key != key:
            self._cols, self._cols_key = w.detach().t().contiguous(), key
        return self._cols

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax token of final hidden states [..., d] -> [...] long; always the full-precision argmax."""
        return self.settle(hidden, *self.argmax(hidden))

    def greedy_step(self, tokens: torch.Tensor, cache: KVCache, start: int,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy decoding step: tokens [B] written at cache position `start` -> (their final hidden state
        [B, d], the argmax next tokens [B]). One compiled graph per token after `compile()`."""
        hidden, ids, proven = self._step_fn(tokens, cache, start, mask)
        return hidden, self.settle(hidden, ids, proven)

    def argmax(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids, proven): `proven` is None when the ids are exact, else per row whether the fp16 id is exact."""
        if self._half_fn is not None:
            return self._half_fn(hidden, self.head16, self.head16_err)
        cols = self.columns()
        if cols is not None:
            return (hidden @ cols).argmax(-1), None
        return self._greedy_fn(hidden, self.weight), None

    def settle(self, hidden: torch.Tensor, ids: torch.Tensor, proven: torch.Tensor | None) -> torch.Tensor:
        """Rows whose fp16-head argmax is not provably exact (near-ties, rare) are redone at full precision."""
        if proven is not None and not bool(proven.all()):
            ids = torch.where(proven, ids, self._greedy_fn(hidden, self.weight))
        return ids

    def _greedy_step(self, tokens: torch.Tensor, cache: KVCache, start: int,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lm = self.model.model.language_model
        hidden = lm(lm.embed_tokens(tokens)[:, None], mask=mask, cache=cache, start=start)[:, -1]
        return hidden, *self.argmax(hidden)

    def compile(self, half_head: bool = True) -> "OutputHead":
        """Opt-in `torch.compile` (inductor) of the language model and this head for inference.

        Per-token decoding of a small model is bound by Python/dispatch overhead and a GEMV; compiled, the
        parity-tiny model decodes ~2x faster on 2 CPU cores. The first calls compile (about 30 s there; inductor
        caches the result on disk) and each new kind of call (prefill, one token, an image block) compiles once.
        Needs a C++ compiler on CPU (triton on GPU). Outputs equal the eager ones up to fp32 summation order.

        `half_head` (CPU, float32 weights): greedy decoding reads a float16 copy of the head (+50% of its memory)
        instead of the float32 weights; the chosen ids stay those of the float32 head (`half_head_greedy`).
        Sampled (temperature > 0) decoding always uses the float32 logits.
        """
        if self.compiled:
            return self
        self.model.model.language_model.compile(dynamic=True)
        self._logits_fn = torch.compile(_rowdot_logits, dynamic=True)
        self._greedy_fn = torch.compile(_rowdot_greedy, dynamic=True)
        weight = self.weight.detach()
        if half_head and weight.device.type == "cpu" and weight.dtype == torch.float32:
            self.head16 = weight.to(torch.float16)
            self.head16_err = float((weight - self.head16.float()).abs().max())
            self._half_fn = torch.compile(half_head_greedy, dynamic=True)
        # one graph and one guard check per token; the weights are fixed at inference, so dynamo need not re-check
        # every parameter before each token (which cost ~10% of a token's time)
        self._step_fn = torch.compile(self._greedy_step, dynamic=True, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.compiled = True
        return self
