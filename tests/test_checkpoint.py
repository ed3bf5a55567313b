"""Official checkpoint format: key set of the released model, bit-exact round trips, strict validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cheers.checkpoint import CheckpointError, load_model, save_model
from cheers.config import PRESETS, CheersConfig, ConfigError, preset
from cheers.model.cheers import CheersModel
from tests.conftest import SHARED, needs_shared

REFERENCE = SHARED / "reference"


def tiny_model(seed: int = 0) -> CheersModel:
    torch.manual_seed(seed)
    model = CheersModel(preset("cheers-tiny"))
    with torch.no_grad():  # make zero-initialized layers non-zero so round trips test real values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@needs_shared
def test_released_config_keys_and_shapes():
    cfg = CheersConfig.from_json_file(REFERENCE / "config.json")
    ref = preset("cheers-1.5b")
    assert (cfg.text, cfg.vision, cfg.vae_encoder, cfg.vae_decoder) == (ref.text, ref.vision, ref.vae_encoder, ref.vae_decoder)
    with torch.device("meta"):
        model = CheersModel(cfg)
    state = model.state_dict()
    index_json = json.loads((REFERENCE / "model.safetensors.index.json").read_text())
    index = index_json["weight_map"]
    assert len(index) == 1321
    assert set(state) == set(index), (sorted(set(index) - set(state))[:5], sorted(set(state) - set(index))[:5])
    expected_shapes = {
        "lm_head.weight": (151936, 1536),
        "model.language_model.layers.27.self_attn.k_proj.weight": (256, 1536),
        "model.language_model.layers.0.mlp.down_proj.weight": (1536, 8960),
        "model.vision_representation.embeddings.patch_embedding.weight": (1152, 3, 16, 16),
        "model.vision_representation.embeddings.position_embedding.weight": (1024, 1152),
        "model.vision_representation.head.attention.in_proj_weight": (3456, 1152),
        "model.vision_representation.head.probe": (1, 1, 1152),
        "model.und_projector.mlp.0.weight": (4608, 4608),
        "model.und_projector.mlp.2.weight": (1536, 4608),
        "model.time_embed.mlp_1.0.weight": (1536, 256),
        "model.time_embed.mlp_2.2.weight": (1152, 1152),
        "model.gen_projector.diffusion_head_a.6.adaLN_modulation.1.weight": (9216, 1536),
        "model.gen_projector.diffusion_head_a.0.mlp.gate_proj.weight": (6144, 1536),
        "model.gen_projector.diffusion_head_b.linear.weight": (4608, 1536),
        "model.hi_gate.gate.2.weight": (1, 1152),
        "model.hi_projector.diffusion_head_a.2.attn.k_proj.weight": (144, 1152),
        "model.hi_projector.diffusion_head_a.0.adaLN_modulation.1.weight": (6912, 1152),
        "model.hi_projector.diffusion_head_b.linear.weight": (128, 1152),
        "model.vae_model.encoder.conv_out.weight": (64, 512, 3, 3),
        "model.vae_model.encoder.quant_conv.weight": (64, 64, 1, 1),
        "model.vae_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "model.vae_model.decoder.conv_in.weight": (512, 32, 3, 3),
        "model.vae_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "model.vae_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "model.vae_decoder_projector.decoder.post_quant_conv.weight": (32, 32, 1, 1),
        "model.vae_model.bn.running_var": (128,),
        "model.vae_decoder_projector.bn.num_batches_tracked": (),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # every derived shape is consistent with the file: 2 bytes per element gives the index's total_size exactly
    total_bf16 = sum(t.numel() * 2 for t in state.values())
    assert total_bf16 == index_json["metadata"]["total_size"] == 5_609_423_890
    unique = model.num_parameters()
    print(f"cheers-1.5b: {len(state)} tensors, {unique / 1e9:.3f}B unique parameters (output head tied)")
    assert 2.50e9 < unique < 2.60e9  # spec: ~2.57B unique


def test_hf_config_round_trip():
    for name in PRESETS:
        cfg = preset(name)
        again = CheersConfig.from_hf_config(json.loads(json.dumps(cfg.to_hf_config())))
        assert again == cfg, name


def test_small_p8_geometry_gives_16_image_tokens():
    cfg = preset("cheers-small-p8")
    assert (cfg.vision.patch_size, cfg.vae_encoder.downsample_factor, cfg.grid, cfg.num_image_tokens) == (8, 4, 8, 16)
    model = CheersModel(cfg).eval()
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        latents = model.encode_images(pixels)
        reading = model.read_latents(latents)
        hidden = torch.randn(2, cfg.num_image_tokens, cfg.text.hidden_size)
        v = model.velocity_head(hidden, torch.tensor([0.3, 0.7]), reading.detail).velocity
    assert latents.shape == (2, cfg.latent_channels, 8, 8) and cfg.latent_channels == 32  # 16x16x8 patchified 2x2
    assert reading.tokens.shape == (2, 16, cfg.text.hidden_size)
    assert reading.detail.shape == (2, 64, cfg.vision.hidden_size)
    assert v.shape == latents.shape


def test_vae_norm_groups_written_only_when_not_the_released_value():
    released = preset("cheers-1.5b").to_hf_config()
    assert "norm_groups" not in released["vae_encoder_config"]  # the official layout is unchanged
    small = preset("cheers-small")
    assert small.vae_encoder.norm_groups == small.vae_decoder.norm_groups == 8
    hf = small.to_hf_config()
    assert hf["vae_decoder_config"]["norm_groups"] == 8
    model = CheersModel(small)
    norms = [m for m in model.model.vae_model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    # a config without the field (e.g. the official one) means 32 groups
    del hf["vae_encoder_config"]["norm_groups"]
    assert CheersConfig.from_hf_config(hf).vae_encoder.norm_groups == 32
    hf["vae_encoder_config"]["norm_groups"] = 7  # 32 channels do not split into 7 groups
    with pytest.raises(ConfigError, match="norm_groups=7"):
        CheersConfig.from_hf_config(hf)


@pytest.mark.parametrize("shard_bytes", [2**40, 400_000])
def test_save_load_round_trip_bit_exact(tmp_path, shard_bytes):
    model = tiny_model()
    save_model(model, tmp_path, max_shard_bytes=shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (shard_bytes < 2**40)
    if sharded:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded = load_model(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight


def test_bf16_file_loads_into_fp32(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path, dtype=torch.bfloat16)
    raw = load_file(str(tmp_path / "model.safetensors"))
    assert raw["model.hi_gate.gate.0.weight"].dtype == torch.bfloat16
    loaded = load_model(tmp_path)
    w = loaded.model.hi_gate.gate[0].weight
    assert w.dtype == torch.float32
    assert torch.equal(w, model.model.hi_gate.gate[0].weight.to(torch.bfloat16).float())


@needs_shared
def test_parity_checkpoint_without_lm_head_loads_tied(parity_model):
    assert parity_model.lm_head.weight is parity_model.model.language_model.embed_tokens.weight
    assert parity_model.lm_head.weight.dtype == torch.float32


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    return tmp_path / "m"


def test_directory_without_config(tmp_path, saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(saved)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")


def test_no_weights_and_pickle_only(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model weights"):
        load_model(saved)
    (saved / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(saved)


def test_missing_unexpected_and_shape_errors_named_together(saved):
    path = saved / "model.safetensors"
    state = load_file(str(path))
    del state["model.hi_gate.gate.0.bias"]
    del state["model.time_embed.mlp_1.0.weight"]
    state["model.extra.weight"] = torch.zeros(3)
    state["model.und_projector.mlp.2.bias"] = torch.zeros(7)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_model(saved)
    msg = str(err.value)
    for culprit in ("model.hi_gate.gate.0.bias", "model.time_embed.mlp_1.0.weight", "model.extra.weight",
                    "model.und_projector.mlp.2.bias: checkpoint [7] vs config [64]", "2 missing", "1 unexpected"):
        assert culprit in msg, (culprit, msg)


def test_config_that_does_not_match_weights(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json does not match the weights.*mlp\.gate_proj\.weight"):
        load_model(saved)


def test_invalid_config_values(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["vision_representation_config"]["patch_size"] = 12
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*patch_size"):
        load_model(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON.*line 1"):
        load_model(saved)


@pytest.mark.parametrize("section,key,value,message", [
    ("text_config", "num_hidden_layers", 100000, r"text_config\.num_hidden_layers must be an integer in \[1, 1024\], got 100000$"),
    ("text_config", "num_hidden_layers", 1e5, r"text_config\.num_hidden_layers must be an integer .* got 100000\.0$"),
    ("text_config", "hidden_size", "64", r"text_config\.hidden_size must be an integer in \[1, 65536\], got '64'$"),
    ("text_config", "hidden_size", True, r"text_config\.hidden_size must be an integer"),
    ("text_config", "vocab_size", -5, r"text_config\.vocab_size must be an integer in \[1, "),
    ("text_config", "rope_theta", "big", r"text_config\.rope_theta must be a number"),
    ("text_config", "rms_norm_eps", float("inf"), r"rms_norm_eps must be a number"),
    ("text_config", "tie_word_embeddings", "yes", r"tie_word_embeddings must be true or false"),
    ("vision_representation_config", "image_size", [64], r"vision_representation_config\.image_size must be an integer"),
    ("vae_encoder_config", "ch_mult", ["a", 2], r"vae_encoder_config\.ch_mult must hold integers"),
    ("vae_decoder_config", "ch_mult", list(range(1, 20)), r"vae_decoder_config\.ch_mult must be a list of 1 to 8"),
    ("vae_decoder_config", "z_channels", None, r"vae_decoder_config\.z_channels must be an integer"),
    ("cheers", "head", {"stage1_layers": 10**9}, r"cheers\.head\.stage1_layers must be an integer in \[1, 256\]"),
    ("cheers", "head", {"bogus": 1}, r"unknown field 'cheers\.head\.bogus'"),
    ("cheers", "tokens", {"pad": "0"}, r"cheers\.tokens\.pad must be an integer"),
    ("cheers", "flow_loss_weight", "x", r"cheers\.flow_loss_weight must be a number"),
    (None, "text_config", [1, 2], r"'text_config' must be a JSON object, got list"),
])
def test_config_sizes_and_types_one_line_errors(saved, section, key, value, message):
    """Checked while reading config.json, before any model is built: a typo fails at once with one line."""
    import time

    cfg = json.loads((saved / "config.json").read_text())
    if section is None:
        cfg[key] = value
    else:
        cfg.setdefault(section, {})[key] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        load_model(saved)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert "config.json" in msg and __import__("re").search(message, msg), msg
    assert time.monotonic() - t0 < 2


def test_preset_configs_are_checked_too():
    cfg = preset("cheers-tiny")
    cfg.text.num_layers = "2"
    with pytest.raises(ConfigError, match=r"text num_layers must be an integer in \[1, 1024\], got '2'"):
        cfg.validate()
    cfg = preset("cheers-tiny")
    cfg.tokens.newline = 10**12
    with pytest.raises(ConfigError, match="token id newline must be an integer"):
        cfg.validate()
    for name in PRESETS:
        preset(name)  # every shipped preset is within the bounds


@pytest.mark.parametrize("fname", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors", "",
                                   "C:\\weights.safetensors", "a\\..\\b.safetensors", 7, None])
def test_index_names_only_files_inside_the_directory(tmp_path, fname):
    save_model(tiny_model(), tmp_path / "m", max_shard_bytes=400_000)
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = sorted(data["weight_map"])[0]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((tmp_path / "m" / data["weight_map"][key]).read_bytes())  # a file that would load
    data["weight_map"][key] = fname
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"is not a file name inside .* \(absolute paths and '\.\.' are refused\)"):
        load_model(tmp_path / "m")


def test_index_may_name_files_in_subfolders(tmp_path):
    save_model(tiny_model(), tmp_path, max_shard_bytes=400_000)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    (tmp_path / "w").mkdir()
    (tmp_path / shard).rename(tmp_path / "w" / shard)
    data["weight_map"] = {k: (f"w/{v}" if v == shard else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    reference = tiny_model()
    loaded = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), loaded.state_dict().values()))


def test_truncated_and_corrupt_files(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_model(saved)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}" + data[100:200])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_model(saved)


def test_nan_weights_rejected(saved):
    path = saved / "model.safetensors"
    state = load_file(str(path))
    state["model.hi_gate.layer_norm.weight"][3] = float("nan")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="hi_gate.layer_norm.weight.*NaN"):
        load_model(saved)


def test_tied_config_ignores_a_differing_stored_head_with_one_warning(saved, caplog):
    """As the reference (transformers) does: with tie_word_embeddings true the head *is* the embedding."""
    path = saved / "model.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    save_file(state, str(path))
    with caplog.at_level("WARNING", logger="cheers"):
        model = load_model(saved)
    warnings = [r for r in caplog.records if "lm_head.weight" in r.getMessage()]
    assert len(warnings) == 1 and "differs" in warnings[0].getMessage()
    embed = state["model.language_model.embed_tokens.weight"]
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight.data, embed.float())


def test_untied_config_uses_the_stored_head(saved):
    path = saved / "model.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    save_file(state, str(path))
    cfg = json.loads((saved / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = False
    (saved / "config.json").write_text(json.dumps(cfg))
    model = load_model(saved)
    assert torch.equal(model.lm_head.weight.data, state["lm_head.weight"].float())
    assert not torch.equal(model.lm_head.weight.data, model.model.language_model.embed_tokens.weight.data)


def test_index_with_missing_shard(tmp_path):
    save_model(tiny_model(), tmp_path, max_shard_bytes=400_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard '{shard.name}', which is missing"):
        load_model(tmp_path)


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    import cheers.checkpoint as ck

    model = tiny_model()
    save_model(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_model(seed=1), tmp_path)  # overwrite in place, interrupted
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert torch.equal(load_model(tmp_path).model.hi_gate.gate[0].weight, model.model.hi_gate.gate[0].weight)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset("nope")
