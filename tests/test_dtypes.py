"""Native dtypes and complete model directories, through the public API (`Cheers.from_pretrained`,
`save_pretrained`): weights are held in the chosen dtype with no float32 copy, "auto" follows the checkpoint on
CUDA only, and a saved directory reloads with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch

from cheers import Cheers
from tests.conftest import SHARED, TINY_OFFICIAL, golden, needs_shared

REFERENCE_TOKENIZER = SHARED / "reference" / "tokenizer"


def _dtypes(pipe: Cheers) -> set[torch.dtype]:
    return {t.dtype for t in list(pipe.model.parameters()) + list(pipe.model.buffers()) if t.is_floating_point()}


def test_dtype_names_and_auto_resolution():
    from cheers.defaults import resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, "bfloat16") is torch.float32  # bf16 matmuls are slow on CPUs
    assert resolve_dtype(None, cuda, "bfloat16") is torch.bfloat16
    assert resolve_dtype("auto", cuda, "float16") is torch.float16
    assert resolve_dtype(torch.bfloat16, cpu) is torch.bfloat16 and resolve_dtype("float16", cpu) is torch.float16
    with pytest.raises(ValueError, match=r"dtype 'int8': expected one of float32, bfloat16, float16 or 'auto'"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ValueError, match="torch.float64"):
        resolve_dtype(torch.float64, cpu)


@needs_shared
def test_bfloat16_weights_are_held_in_bfloat16_and_stay_close_to_float32():
    g = golden("b_text_only")
    messages = [[{"role": "user", "content": "Please introduce yourself briefly."}]]
    full = Cheers.from_pretrained(TINY_OFFICIAL, tokenizer=REFERENCE_TOKENIZER)
    half = Cheers.from_pretrained(TINY_OFFICIAL, tokenizer=REFERENCE_TOKENIZER, dtype="bfloat16")
    assert full.dtype is torch.float32 and _dtypes(full) == {torch.float32}
    assert half.dtype is torch.bfloat16 and _dtypes(half) == {torch.bfloat16}  # no float32 copy anywhere
    held = sum(p.numel() * p.element_size() for p in half.model.parameters())
    assert held * 2 == sum(p.numel() * p.element_size() for p in full.model.parameters())
    a, b = full.next_token_logits(messages)[0], half.next_token_logits(messages)[0]
    # bf16 keeps ~3 significant digits: logits of this random tiny model (std ~0.5) move by a few hundredths
    assert float((a - b).abs().max()) < 0.1 and int(a.argmax()) == int(b.argmax()) == int(g["greedy_ids"][0])
    latents = [p.generate_image(["a red apple"], steps=2, cfg_scale=3.0, output_type="latent") for p in (full, half)]
    assert latents[1].dtype is torch.float32  # the ODE state stays float32 whatever the weights' dtype
    rel = float((latents[0] - latents[1]).abs().max() / latents[0].abs().max())
    assert rel < 0.1, f"bf16 latent off by {rel:.1%} of its range"


def test_save_pretrained_writes_a_complete_directory_that_reloads_identically(tiny_model_dir, tmp_path):
    pipe = Cheers.from_pretrained(tiny_model_dir)
    out = pipe.save_pretrained(tmp_path / "saved", max_shard_bytes=400_000, dtype="bfloat16")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json",
            "preprocessor_config.json"} <= names
    assert len([n for n in names if n.startswith("model-")]) >= 2
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["scale_resolution"] == pipe.config.resolution
    again = Cheers.from_pretrained(out, dtype="bfloat16")
    assert again.image_defaults == pipe.image_defaults and again.text_defaults == pipe.text_defaults
    # float32 -> bf16 storage is the only change: reloading the bf16 copy in bf16 and saving it again is exact
    exact = again.save_pretrained(tmp_path / "again")
    back = Cheers.from_pretrained(exact, dtype="bfloat16")
    conv = [[{"role": "user", "content": "a red circle"}]]
    assert torch.equal(again.next_token_logits(conv), back.next_token_logits(conv))
    assert again.chat(conv[0], max_new_tokens=6) == back.chat(conv[0], max_new_tokens=6)
    images = [p.generate_image(["a red circle"], steps=2, output_type="latent") for p in (again, back)]
    assert torch.equal(images[0], images[1])


def test_generation_config_standard_fields_set_the_text_defaults(tiny_model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
        "eos_token_id": [5, 7], "cheers": {"text": {"max_new_tokens": 12}}}))
    pipe = Cheers.from_pretrained(d)
    t = pipe.text_defaults
    assert (t.temperature, t.top_k, t.top_p, t.repetition_penalty, t.max_new_tokens) == (0.7, 20, 0.8, 1.05, 12)
    s, _ = pipe._sampling({})
    assert s.stop_ids == (pipe.config.tokens.chat_end, 5, 7)  # every eos id ends a reply
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert Cheers.from_pretrained(d).text_defaults.temperature == 0.0  # greedy, as transformers would decode
    (d / "generation_config.json").write_text(json.dumps({"top_k": "many"}))
    with pytest.raises(Exception, match=r"generation_config.json: top_k 'many': expected an integer >= 0"):
        Cheers.from_pretrained(d)
    (d / "generation_config.json").unlink()
    (d / "preprocessor_config.json").write_text(json.dumps({"scale_resolution": 999}))
    with pytest.raises(Exception, match=r"preprocessor_config.json: scale_resolution 999 differs from the model's"):
        Cheers.from_pretrained(d)


@needs_shared
def test_released_generation_config_gives_the_reference_text_defaults(tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(TINY_OFFICIAL, d)
    shutil.copy(SHARED / "reference" / "generation_config.json", d)
    pipe = Cheers.from_pretrained(d, tokenizer=REFERENCE_TOKENIZER)
    t = pipe.text_defaults
    assert (t.temperature, t.top_k, t.top_p, t.repetition_penalty) == (0.7, 20, 0.8, 1.05)
    assert pipe._sampling({})[0].stop_ids == (151645, 151643)


def test_streaming_leaves_no_autocast_or_grad_state_behind(tiny_model_dir):
    pipe = Cheers.from_pretrained(tiny_model_dir)
    stream = pipe.chat([{"role": "user", "content": "hi"}], stream=True, max_new_tokens=4)
    next(stream, None)
    # a half-consumed generator must not leave an autocast region or no-grad mode open in the caller
    assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
    list(stream)
    assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
