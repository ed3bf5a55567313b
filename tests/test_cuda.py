"""The GPU path: bf16 weights on CUDA, the parity goldens within bf16 tolerances, device-side decoding without a
host sync per token, and loading within the memory bound. Skipped (with the reason) where CUDA is absent;
`scripts/gpu_check.sh` runs these plus the 1.5B measurements on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SHARED, TINY_OFFICIAL, golden, golden_meta, needs_shared

pytestmark = [
    pytest.mark.cuda,
    needs_shared,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

REFERENCE_TOKENIZER = SHARED / "reference" / "tokenizer"
# bf16 keeps 8 bits of mantissa: over the tiny model's few layers, logits (std ~0.5) and velocities (std ~2)
# drift by a few hundredths; sampled latents accumulate that over the steps.
BF16_LOGITS = dict(atol=0.1, rtol=0.05)
BF16_LATENT = dict(atol=0.25, rtol=0.1)


@pytest.fixture(scope="module")
def gpu():
    from cheers import Cheers

    torch.cuda.reset_peak_memory_stats()
    pipe = Cheers.from_pretrained(TINY_OFFICIAL, tokenizer=REFERENCE_TOKENIZER, device="cuda")
    return pipe


def test_auto_dtype_is_the_checkpoints_and_loading_stays_within_the_bound(gpu):
    assert gpu.dtype is torch.bfloat16  # config.json says bfloat16; "auto" follows it on CUDA
    assert {p.dtype for p in gpu.model.parameters()} == {torch.bfloat16}
    weights = sum(t.numel() * t.element_size() for t in list(gpu.model.parameters()) + list(gpu.model.buffers()))
    assert torch.cuda.max_memory_allocated() <= 1.15 * weights


def test_understanding_goldens_in_bf16(gpu):
    for name in ("a_understanding", "b_text_only"):
        g, meta = golden(name), golden_meta(name)
        content = meta["content"].removeprefix("<im_start><image><im_end>\n")
        images = [] if name == "b_text_only" else [_picture(g)]
        logits = gpu.next_token_logits([[{"role": "user", "content": content, "images": images}]])[0].cpu()
        torch.testing.assert_close(logits, g["logits_last"], **BF16_LOGITS)
        assert int(logits.argmax()) == int(g["greedy_ids"][0])


def test_sampling_and_edit_goldens_in_bf16(gpu):
    g, meta = golden("d_t2i_sampling"), golden_meta("d_t2i_sampling")
    prompt = meta["prompt_text"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    latent = gpu.generate_image([prompt], noise=g["z0"][None], steps=4, cfg_scale=3.0, shift=0.5, sampler="euler",
                                cfg_interval=(0, 1), output_type="latent")
    torch.testing.assert_close(latent[0].cpu(), g["final_latent"], **BF16_LATENT)
    e, emeta = golden("g_edit"), golden_meta("g_edit")
    instruction = emeta["prompt_text"].split("<im_start><image><im_end>\n")[1].split("<|im_end|>")[0]
    edited = gpu.edit([_picture(e)], [instruction], noise=e["noise"][None], steps=4, cfg_scale=3.0, shift=0.5,
                      sampler="euler", cfg_interval=(0, 1), edit_start=0.1, output_type="latent")
    torch.testing.assert_close(edited[0].cpu(), e["final_latent"], **BF16_LATENT)
    images = gpu.generate_image(["a red apple"], steps=3)
    assert images[0].size == (gpu.config.resolution, gpu.config.resolution)


def test_decoding_stays_on_the_device(gpu):
    """Greedy and sampled decoding copy nothing vocabulary-sized to the host and sync at most every 8 tokens."""
    from cheers import sampling as S

    rows = [gpu.tokenizer.encode_prompt("Please introduce yourself briefly.", task="chat")]
    prefix = gpu._prefill(rows, gpu._latents(gpu._row_images(rows, [0])))
    for s in (S.TextSampling(max_new_tokens=32), S.TextSampling(max_new_tokens=32, temperature=0.8, seed=1)):
        prefix_copy = gpu._prefill(rows, gpu._latents(gpu._row_images(rows, [0])))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with pytest.warns(UserWarning) as record:
                steps = list(S.decode_tokens(gpu.model, prefix_copy, s, head=gpu.head))
                torch.stack(steps).tolist()  # one copy at the end
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in record if "synchroniz" in str(w.message)]
        assert len(steps) == 32 and len(syncs) <= 32 // 8 + 2, [str(w.message) for w in syncs]
    del prefix


def test_streaming_leaves_no_autocast_behind(gpu):
    stream = gpu.chat([{"role": "user", "content": "hi"}], stream=True, max_new_tokens=4)
    next(stream, None)
    assert not torch.is_autocast_enabled("cuda") and torch.is_grad_enabled()
    list(stream)


def _picture(g):
    from PIL import Image

    return Image.fromarray(g["image_raw_uint8"].numpy())
