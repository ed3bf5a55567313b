"""Opt-in compiled inference (`OutputHead.compile`, `from_pretrained(compile=True)`, `--compile`):
the compiled language model and output head must pass the same parity goldens as the eager model, and decode
exactly the eager greedy tokens, including across KV-cache growth, padded batches and prompt-lookup drafts."""

from __future__ import annotations

import shutil

import pytest
import torch

import tests.test_parity as P
from cheers import sampling as S
from cheers.decoding import OutputHead, half_head_greedy
from tests.conftest import TINY_OFFICIAL, golden, needs_shared

pytestmark = [
    needs_shared,
    pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                       reason="torch.compile's CPU backend needs a C++ compiler"),
]


@pytest.fixture(scope="module")
def compiled_head():
    from cheers.checkpoint import load_model

    return OutputHead(load_model(TINY_OFFICIAL)).compile()


@pytest.fixture(scope="module")
def compiled_model(compiled_head):
    return compiled_head.model


def _decode(head: OutputHead, ids: torch.Tensor, mask: torch.Tensor, latents: torch.Tensor, s: S.TextSampling,
            hook=None) -> list[list[int]]:
    prefix = S.prefill(head.model, ids, mask, latents)
    steps = S.decode_tokens(head.model, prefix, s, prompt_ids=ids, logits_hook=hook, head=head)
    return torch.stack(list(steps), 1).tolist()


@pytest.mark.parametrize("name", ["a_understanding", "b_text_only"])
def test_compiled_model_passes_the_understanding_goldens(compiled_head, name):
    assert compiled_head.compiled
    P.test_understanding_forward_and_greedy(compiled_head.model, name, head=compiled_head)


def test_compiled_model_passes_the_sampling_golden(compiled_model):
    P.test_sampling_loops(compiled_model, "d_t2i_sampling")


def test_compiled_greedy_equals_eager_across_cache_growth_and_padding(compiled_head, parity_model):
    g = golden("a_understanding")
    latents = parity_model.encode_images(g["pixel_values"])
    ids, mask = g["input_ids"][None], g["attention_mask"][None]
    s = S.TextSampling(max_new_tokens=60)  # prompt + image + 60 tokens outgrow the first 64-slot KV buffers
    eager = _decode(OutputHead(parity_model), ids, mask, latents, s)
    fast = _decode(compiled_head, ids, mask, latents, s)
    assert len(fast[0]) == 60 and fast == eager
    assert fast[0][:8] == g["greedy_ids"].tolist()
    # a left-padded batch of two different prompts (the padded row needs the step mask)
    short = ids[:, 3:]
    rows, rmask = S.left_pad([ids[0].tolist(), short[0].tolist()], 0)
    both = torch.cat([latents, latents])
    s = S.TextSampling(max_new_tokens=12)
    assert _decode(compiled_head, rows, rmask, both, s) == _decode(OutputHead(parity_model), rows, rmask, both, s)


def test_compiled_logits_and_lookup_decoding_match_eager(compiled_head, parity_model):
    g = golden("a_understanding")
    latents = parity_model.encode_images(g["pixel_values"])
    ids, mask = g["input_ids"][None], g["attention_mask"][None]
    # the logits path (temperature sampling): same logits up to fp32 summation order, same seeded samples
    got_e, got_c = [], []
    s = S.TextSampling(max_new_tokens=6, temperature=0.8, top_k=50, seed=3)
    eager = _decode(OutputHead(parity_model), ids, mask, latents, s, got_e.append)
    fast = _decode(compiled_head, ids, mask, latents, s, got_c.append)
    err = max(float((a - b).abs().max()) for a, b in zip(got_e, got_c))
    assert err < 1e-4, f"compiled logits differ by {err:.3g}"
    assert fast == eager
    # prompt-lookup drafts (several positions through the compiled head at once)
    s = S.TextSampling(max_new_tokens=24, speculate=4)
    assert _decode(compiled_head, ids, mask, latents, s) == _decode(OutputHead(parity_model), ids, mask, latents,
                                                                      S.TextSampling(max_new_tokens=24, speculate=0))


def test_from_pretrained_compile_flag():
    from cheers.pipeline import Cheers

    assert Cheers.from_pretrained(TINY_OFFICIAL, compile=True).head.compiled
    assert not Cheers.from_pretrained(TINY_OFFICIAL).head.compiled


def test_half_head_ids_are_the_float32_argmax_and_near_ties_fall_back(compiled_head):
    m = compiled_head
    assert m.head16 is not None and m.head16.dtype == torch.float16
    assert 0 < m.head16_err < 1e-3
    torch.manual_seed(0)
    hidden = torch.randn(64, m.model.config.text.hidden_size) * 3
    exact = (hidden @ m.weight.t()).argmax(-1)
    ids, proven = m.argmax(hidden)
    assert proven is not None and float(proven.float().mean()) > 0.9  # random states: almost always decidable
    assert torch.equal(m.greedy(hidden), exact)
    # unproven rows are redone in float32
    wrong = (exact + 1) % m.model.config.text.vocab_size
    proven = torch.ones(64, dtype=torch.bool)
    proven[::3] = False
    settled = m.settle(hidden, wrong, proven)
    assert torch.equal(settled[~proven], exact[~proven]) and torch.equal(settled[proven], wrong[proven])


def test_half_head_bound_refuses_near_ties():
    torch.manual_seed(1)
    w = torch.randn(500, 32) * 0.05
    w[7] = w[3] + 1e-6 * torch.randn(32)  # rows 3 and 7: logits closer than fp16 rounding can resolve
    h = (w[3] * 40)[None].repeat(2, 1)
    h[1] = torch.randn(32)  # an ordinary row
    w16 = w.half()
    err = float((w - w16.float()).abs().max())
    ids, proven = half_head_greedy(h, w16, err)
    assert not bool(proven[0]) and int(ids[0]) in (3, 7)
    assert bool(proven[1]) and int(ids[1]) == int((h[1] @ w.t()).argmax())
