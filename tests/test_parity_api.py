"""Parity through the path users take: `Cheers.from_pretrained(...)` and its public methods reproduce the reference's
goldens from the goldens' own inputs (prompt text, raw pictures, noise), within ../shared/parity/README.md §4.

tests/test_parity.py checks every intermediate tensor on the model `from_pretrained` prepares (the `parity_model`
fixture); this file drives the public methods end to end: ids come from the pipeline's tokenizer, pictures from its
preprocessing, and the sampler from its own settings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import SHARED, TINY_OFFICIAL, golden, golden_meta, needs_shared
from tests.test_parity import FWD, SAMPLED, close

pytestmark = needs_shared

REFERENCE_TOKENIZER = SHARED / "reference" / "tokenizer"


@pytest.fixture(scope="module")
def pipe():
    from cheers import Cheers

    return Cheers.from_pretrained(TINY_OFFICIAL, tokenizer=REFERENCE_TOKENIZER)


def _picture(g: dict) -> Image.Image:
    return Image.fromarray(g["image_raw_uint8"].numpy())


def _user_text(content: str) -> str:
    """The question/instruction of a golden's user content, without the leading image group."""
    return content.removeprefix("<im_start><image><im_end>\n")


@pytest.mark.parametrize("name", ["a_understanding", "b_text_only"])
def test_answer_and_chat_give_the_reference_logits_and_greedy_text(pipe, name):
    g, meta = golden(name), golden_meta(name)
    tok = pipe.tokenizer
    if name == "a_understanding":
        question = _user_text(meta["content"])
        messages = [{"role": "user", "content": question, "images": [_picture(g)]}]
        assert pipe._text_rows([messages])[0][0] == g["input_ids"].tolist(), "prompt ids"
        reply = pipe.answer([_picture(g)], [question], max_new_tokens=len(g["greedy_ids"]), temperature=0.0)[0]
    else:
        messages = [{"role": "user", "content": meta["content"]}]
        assert pipe._text_rows([messages])[0][0] == g["input_ids"].tolist(), "prompt ids"
        reply = pipe.chat(messages, max_new_tokens=len(g["greedy_ids"]), temperature=0.0)
    logits = pipe.next_token_logits([messages])[0]
    close(logits, g["logits_last"], FWD, "first reply token logits")
    assert reply == tok.decode(g["greedy_ids"].tolist(), skip_special_tokens=True)


def test_preprocessing_gives_the_reference_pixels(pipe):
    for name in ("a_understanding", "g_edit"):
        g = golden(name)
        close(pipe._read_images([_picture(g)])[0][None], g["pixel_values"], FWD, f"{name} pixel values")
    b = golden("b_text_only")
    close(pipe._row_images([[1]], [int(golden_meta("b_text_only")["dummy_numpy_seed"])])[0][None],
          b["pixel_values"], FWD, "dummy noise picture")


def test_generate_image_reproduces_the_sampling_golden(pipe):
    g, meta = golden("d_t2i_sampling"), golden_meta("d_t2i_sampling")
    prompt = meta["prompt_text"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    kw = dict(seed=int(meta["dummy_numpy_seed"]), noise=g["z0"][None], steps=int(meta["num_inference_steps"]),
              cfg_scale=float(meta["cfg_scale"]), shift=float(meta["alpha"]), sampler="euler", cfg_interval=(0, 1))
    latent = pipe.generate_image([prompt], output_type="latent", **kw)
    assert latent.shape == (1, *g["final_latent"].shape) and latent.dtype == torch.float32
    close(latent[0], g["final_latent"], SAMPLED, "final latent")
    image = np.asarray(pipe.generate_image([prompt], **kw)[0]).astype(np.float32) / 255
    expected = g["decoded_image"].clamp(0, 1).permute(1, 2, 0).numpy()
    err = float(np.abs(image - expected).max())
    assert err <= 1 / 255 + 1e-3, f"decoded picture off by {err * 255:.2f} levels"


def test_edit_reproduces_the_editing_golden(pipe):
    g, meta = golden("g_edit"), golden_meta("g_edit")
    instruction = meta["prompt_text"].split("<im_start><image><im_end>\n")[1].split("<|im_end|>")[0]
    latent = pipe.edit([_picture(g)], [instruction], noise=g["noise"][None], steps=int(meta["num_inference_steps_arg"]),
                       cfg_scale=float(meta["cfg_scale"]), shift=float(meta["alpha"]), sampler="euler",
                       cfg_interval=(0, 1), edit_start=float(meta["start_t"]), output_type="latent")
    close(latent[0], g["final_latent"], SAMPLED, "edited latent")


def test_from_pretrained_prepares_the_model_the_goldens_were_checked_on(pipe, parity_model):
    """The `parity_model` fixture of tests/test_parity.py is this very preparation (memory format included)."""
    assert pipe.dtype == torch.float32 and pipe.model.model.vae_model.encoder.conv_in.weight.is_contiguous(
        memory_format=torch.channels_last) == parity_model.model.vae_model.encoder.conv_in.weight.is_contiguous(
        memory_format=torch.channels_last)
