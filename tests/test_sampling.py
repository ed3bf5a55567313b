"""Prompt-lookup speculation: the drafts, and greedy output identical to plain decoding."""

import pytest
import torch

from cheers import sampling as S
from tests.conftest import golden


def test_lookup_draft_takes_the_most_recent_longest_match():
    h = [5, 6, 7, 1, 2, 5, 6, 9, 5, 6]
    # the 2-gram (5, 6) last occurred at index 5, followed by 9, 5, 6
    assert S.lookup_draft(h, 3) == [9, 5, 6]
    assert S.lookup_draft(h, 1) == [9]
    # the 3-gram (1, 2, 3) never occurred, nor (2, 3) nor (3,): no draft
    assert S.lookup_draft([1, 2, 3], 4) == []
    assert S.lookup_draft([4, 4], 2) == [4]
    assert S.lookup_draft([7], 2) == []


def _greedy(m, g, n, speculate, stop_ids=()):
    latents = m.encode_images(g["pixel_values"])
    prefix = S.prefill(m, g["input_ids"][None], g["attention_mask"][None], latents)
    s = S.TextSampling(max_new_tokens=n, speculate=speculate, stop_ids=stop_ids)
    start = prefix.length
    out = [int(t[0]) for t in S.decode_tokens(m, prefix, s, prompt_ids=g["input_ids"])]
    return out, prefix, start


@pytest.mark.parametrize("n", [1, 2, 8, 40])
def test_lookup_decoding_equals_plain_greedy(parity_model, n):
    g = golden("a_understanding")
    plain, _, _ = _greedy(parity_model, g, n, speculate=0)
    fast, p1, start = _greedy(parity_model, g, n, speculate=4)
    assert len(plain) == n
    assert fast == plain
    if n >= 8:
        assert fast[:8] == g["greedy_ids"].tolist()
    # the committed cache holds the prompt and every token fed back (all but the last one emitted)
    assert p1.cache.length == p1.valid.shape[1] == start + n - 1


def test_lookup_decoding_stops_at_a_stop_id(parity_model):
    g = golden("a_understanding")
    plain, _, _ = _greedy(parity_model, g, 40, speculate=0)
    stop = plain[12]
    first = plain.index(stop)
    fast, _, _ = _greedy(parity_model, g, 40, speculate=4, stop_ids=(stop,))
    assert fast == plain[:first + 1]


def test_lookup_drafts_are_accepted_on_repetitive_output(parity_model):
    """The random tiny model repeats itself, so drafts must be accepted: fewer forwards than tokens."""
    g = golden("a_understanding")
    calls = []
    lm = parity_model.model.language_model
    handle = lm.register_forward_hook(lambda mod, inp, out: calls.append(1))
    try:
        fast, _, _ = _greedy(parity_model, g, 40, speculate=4)
    finally:
        handle.remove()
    forwards = len(calls) - 1  # minus the prefill
    assert len(fast) == 40
    assert forwards < 40 - 1, f"{forwards} decode forwards for 40 tokens: no draft was ever accepted"


def test_pipeline_answers_are_the_same_with_and_without_drafts():
    from PIL import Image

    from cheers.pipeline import Cheers

    c = Cheers.from_pretrained(None)  # the embedded model: small, answers with repeated phrases
    img = Image.new("RGB", (64, 64), (20, 20, 30))
    qs = ["What do you see?", "How many objects are there?"]
    plain = [c.answer([img], [q], max_new_tokens=24, speculate=0)[0] for q in qs]
    fast = [c.answer([img], [q], max_new_tokens=24, speculate=4)[0] for q in qs]
    assert fast == plain
    assert all(isinstance(a, str) and a for a in plain)


def test_eager_head_copy_gives_the_linear_logits_and_follows_weight_updates():
    from cheers.config import preset
    from cheers.decoding import OutputHead
    from cheers.model.cheers import CheersModel

    torch.manual_seed(0)
    model = CheersModel(preset("cheers-tiny")).eval()
    m = OutputHead(model)
    h = torch.randn(3, model.config.text.hidden_size)
    with torch.no_grad():
        ref = torch.nn.functional.linear(h, model.lm_head.weight)
        got = m.logits(h)
        cols = m.columns()
        assert cols is not None and cols.shape == (model.config.text.hidden_size, model.config.text.vocab_size)
        assert torch.allclose(got, ref, atol=1e-5) and torch.equal(m.greedy(h), ref.argmax(-1))
        # an in-place update (an optimizer step) must not leave a stale copy behind
        model.lm_head.weight.mul_(-1.0)
        assert torch.equal(m.greedy(h), (-ref).argmax(-1))
        assert torch.allclose(m.logits(h), -ref, atol=1e-5)
    # with gradients on (training) the copy is never used: the logits stay differentiable w.r.t. the weight
    assert m.columns() is None


# ---- the renoise sampler -------------------------------------------------------------------------------------


def test_renoise_step_noise_depends_only_on_the_image_seed_and_the_step():
    shape = (4, 2, 2)
    pair = S.step_noise(shape, [5, 7], step=3)
    assert pair.shape == (2, *shape)
    assert torch.equal(pair[1], S.step_noise(shape, [7], step=3)[0]), "independent of the batch"
    assert not torch.allclose(pair[1], S.step_noise(shape, [7], step=4)[0]), "a fresh draw per step"
    assert not torch.allclose(pair[1], S.noise(shape, [7])[0]), "not the initial noise again"
    assert not torch.allclose(pair[0], pair[1])
    big = S.step_noise((4000,), [11], step=0)
    assert abs(float(big.mean())) < 0.06 and abs(float(big.std()) - 1) < 0.05


def test_renoise_update_is_predict_clean_then_renoise():
    """One evaluation per step: x1 = x + (1 - t) v, x' = t' x1 + (1 - t') e; then the reference's final step."""
    c = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    calls = []

    def velocity(x, t, commit=False):
        calls.append((t, commit))
        return c.expand_as(x)

    x = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    grid = [0.0, 0.5, 1.0]
    out = S.integrate(velocity, x, grid, "renoise", seeds=[9])
    e0 = S.step_noise((3,), [9], 0, dtype=torch.float64)
    x_half = 0.5 * (x + 1.0 * c) + 0.5 * e0
    x_one = 1.0 * (x_half + 0.5 * c)  # t' = 1: no noise left
    expected = x_one + c / 3
    torch.testing.assert_close(out, expected)
    assert calls == [(0.0, False), (0.5, False), (1.0, True)]


def test_renoise_lands_on_the_target_of_an_exact_velocity_field():
    """For a single-point data distribution the exact velocity is (x1* - x) / (1 - t): every clean prediction is
    x1*, so the re-noised path ends exactly there whatever the noise (euler too, for comparison)."""
    target = torch.tensor([[0.3, -2.0], [1.5, 0.25]], dtype=torch.float64)

    def velocity(x, t, commit=False):
        return (target - x) / max(1.0 - t, 1e-6)

    x0 = S.noise((2,), [1, 2], dtype=torch.float64)
    grid = S.time_grid(6, shift=0.5)
    for sampler in ("renoise", "euler"):
        out = S.integrate(velocity, x0.clone(), grid, sampler, seeds=[1, 2])
        torch.testing.assert_close(out, target, atol=1e-8, rtol=0)


def test_renoise_needs_one_seed_per_image():
    v = lambda x, t, commit=False: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="one seed per image"):
        S.integrate(v, torch.zeros(2, 3), [0.0, 1.0], "renoise")
    with pytest.raises(ValueError, match="one seed per image"):
        S.integrate(v, torch.zeros(2, 3), [0.0, 1.0], "renoise", seeds=[1])
    with pytest.raises(ValueError, match="unknown sampler 'sde'"):
        S.integrate(v, torch.zeros(2, 3), [0.0, 1.0], "sde", seeds=[1, 2])


def test_every_entry_point_offers_the_same_samplers():
    from cheers import serve
    from cheers.cli import build_parser

    from cheers.samplers import SAMPLERS

    assert serve.SAMPLERS is SAMPLERS
    for name in SAMPLERS:
        for args in (["generate", "x"], ["edit", "in.png", "x"]):
            assert build_parser().parse_args([*args, "--sampler", name]).sampler == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "x", "--sampler", "rk9"])


def test_evaluation_count_matches_what_integrate_calls():
    from cheers.samplers import SAMPLERS, evaluations

    for sampler in SAMPLERS:
        calls = []

        def velocity(x, t, commit=False):
            calls.append(t)
            return torch.zeros_like(x)

        S.integrate(velocity, torch.zeros(1, 2), S.time_grid(5), sampler, seeds=[0])
        assert len(calls) == evaluations(sampler, 5), sampler
