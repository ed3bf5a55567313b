"""Typed configuration of a Cheers model, named presets, and conversion to/from the official `config.json`.

The official file (`UMMConfig`) nests four sub-configs: `text_config` (Qwen2), `vision_representation_config`
(SigLIP2), `vae_encoder_config` and `vae_decoder_config`. Fields it leaves out take the released model's values,
which is how the released `config.json` gets away with listing only a few of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from cheers import constants as C


class ConfigError(ValueError):
    """A configuration is inconsistent or cannot be read."""


# Bounds of the size fields: far beyond any real model, tight enough that a typo (num_hidden_layers 1e5, a string
# hidden_size) fails with one line here instead of after minutes of building a model that cannot exist.
_LIMITS: dict[str, tuple[float, float]] = {
    "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18), "num_layers": (1, 1024), "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024), "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 22),
    "patch_size": (1, 1024), "image_size": (1, 1 << 14), "num_channels": (1, 16), "resolution": (1, 1 << 14),
    "in_channels": (1, 16), "out_ch": (1, 16), "ch": (1, 1 << 13), "num_res_blocks": (1, 64),
    "z_channels": (1, 1 << 12), "norm_groups": (1, 1 << 13), "ch_mult": (1, 64), "stage1_layers": (1, 256),
    "stage2_layers": (1, 256), "time_freq_dim": (2, 1 << 14), "stage2_kv_heads": (1, 1024),
    "rope_theta": (1e-6, 1e12), "rms_norm_eps": (0.0, 1.0), "layer_norm_eps": (0.0, 1.0),
}


def _field_problem(name: str, value: Any, kind: str, label: str) -> str | None:
    """Why `value` cannot be the field `name` of declared type `kind` (None if it can); `label` names it."""
    lo, hi = _LIMITS.get(name, (0, 1 << 31))
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    if kind == "bool":
        return None if isinstance(value, bool) else f"{label} must be true or false, got {shown}"
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not lo <= value <= hi:
            return f"{label} must be a number in [{lo:g}, {hi:g}], got {shown}"
        return None
    if kind == "tuple[int, ...]":
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 8:
            return f"{label} must be a list of 1 to 8 integers, got {shown}"
        bad = [v for v in value if _field_problem(name, v, "int", label)]
        return f"{label} must hold integers in [{lo:g}, {hi:g}], got {shown}" if bad else None
    if kind in ("int", "int | None"):
        if value is None and kind == "int | None":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"{label} must be an integer in [{lo:g}, {hi:g}], got {shown}"
    return None


def _check_fields(section: Any, where: str) -> list[str]:
    """Type and range problems of a config section's fields (int, float, bool, tuple[int, ...] fields)."""
    return [p for f in dataclasses.fields(section)
            if (p := _field_problem(f.name, getattr(section, f.name), str(f.type), f"{where} {f.name}"))]


@dataclass
class TextConfig:
    """Qwen2 decoder (spec §A.2)."""

    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_layers: int = 28
    num_heads: int = 12
    num_kv_heads: int = 2
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class VisionConfig:
    """SigLIP2 fixed-grid ViT (spec §A.3)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 16
    image_size: int = 512
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass
class VAEConfig:
    """One half of the FLUX.2-style autoencoder (spec §A.4). The decoder uses num_res_blocks + 1 blocks per level."""

    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    # GroupNorm groups. The released VAE's 32 groups are 4 channels each at its 128-wide full-resolution level;
    # at 32 channels they would be 1 channel each (instance norm), which washes out colour, so small presets
    # keep 4 channels per group instead. Written to config.json only when it differs from 32.
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class TokenIds:
    """Special ids the model logic needs. Defaults are the released Qwen2 ids; tiny tokenizers bring their own."""

    pad: int = C.PAD_ID
    chat_start: int = C.CHAT_START_ID
    chat_end: int = C.CHAT_END_ID
    image: int = C.IMAGE_ID
    image_gen: int = C.IMAGE_GEN_ID
    img_start: int = C.IMG_START_ID
    img_end: int = C.IMG_END_ID
    no_mean: int = C.NO_MEAN_ID
    newline: int = C.NEWLINE_ID


@dataclass
class HeadConfig:
    """The cascaded flow-matching head (spec §A.7-A.11)."""

    stage1_layers: int = 7  # a constant of the released model
    stage2_layers: int = 3
    time_freq_dim: int = 256
    # The reference gives the stage-2 head the LLM's number of KV heads (spec §G.8); None means "take it from there".
    stage2_kv_heads: int | None = None
    # Ablation switch for the paper's central claim: False drops the gated patch-detail injection (Y = LN(S)).
    high_frequency_gate: bool = True


# dtypes a checkpoint may be stored and run in (config.json `torch_dtype` names)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class CheersConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vae_encoder: VAEConfig = field(default_factory=VAEConfig)
    vae_decoder: VAEConfig = field(default_factory=VAEConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    tokens: TokenIds = field(default_factory=TokenIds)
    flow_loss_weight: float = 1.0
    name: str = "custom"
    # the stored weights' dtype (config.json `torch_dtype`; "auto" loads in it on GPU): storage, not architecture,
    # so two configs that differ only here compare equal
    torch_dtype: str = field(default="float32", compare=False)
    # config.json `quantization_config` of a quantized checkpoint (cheers.quantize.record), else None
    quantization: dict[str, Any] | None = field(default=None, compare=False)

    # ---- derived geometry -------------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.vision.image_size

    @property
    def grid(self) -> int:
        """Side of the ViT patch grid = side of the patchified latent grid."""
        return self.vision.grid

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image after the 2x2 merge."""
        return (self.grid // 2) ** 2

    @property
    def latent_channels(self) -> int:
        """Channels of the patchified latent (2x2 space-to-channel of the z-channel VAE mean)."""
        return 4 * self.vae_encoder.z_channels

    @property
    def stage2_kv_heads(self) -> int:
        return self.head.stage2_kv_heads or self.text.num_kv_heads

    def validate(self) -> "CheersConfig":
        t, v, e, d = self.text, self.vision, self.vae_encoder, self.vae_decoder
        problems = [p for sec, where in ((t, "text"), (v, "vision"), (e, "VAE encoder"), (d, "VAE decoder"),
                                         (self.head, "head"), (self.tokens, "token id"))
                    for p in _check_fields(sec, where)]
        if problems:  # the checks below compute with these values
            raise ConfigError(f"invalid Cheers config '{self.name}': " + "; ".join(problems))
        if t.hidden_size % t.num_heads:
            problems.append(f"text hidden_size {t.hidden_size} not divisible by num_heads {t.num_heads}")
        if t.num_heads % t.num_kv_heads:
            problems.append(f"text num_heads {t.num_heads} not divisible by num_kv_heads {t.num_kv_heads}")
        if t.head_dim % 2:
            problems.append(f"text head_dim {t.head_dim} must be even for RoPE")
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        if v.image_size % v.patch_size:
            problems.append(f"vision image_size {v.image_size} not a multiple of patch_size {v.patch_size}")
        if v.grid % 2:
            problems.append(f"vision grid {v.grid} must be even (2x2 token merge)")
        if v.num_heads % self.stage2_kv_heads:
            problems.append(f"vision num_heads {v.num_heads} not divisible by stage-2 kv heads {self.stage2_kv_heads}")
        if (v.hidden_size // v.num_heads) % 2:
            problems.append(f"vision head_dim {v.hidden_size // v.num_heads} must be even for the stage-2 RoPE")
        if e.z_channels != d.z_channels:
            problems.append(f"VAE encoder z_channels {e.z_channels} != decoder z_channels {d.z_channels}")
        if e.downsample_factor != d.downsample_factor:
            problems.append(f"VAE encoder factor {e.downsample_factor} != decoder factor {d.downsample_factor}")
        if v.patch_size != 2 * e.downsample_factor:
            problems.append(
                f"vision patch_size {v.patch_size} must be 2x the VAE downsampling factor {e.downsample_factor} "
                "so that the patchified latent grid equals the ViT grid"
            )
        for name, vc in (("encoder", e), ("decoder", d)):
            for m in vc.ch_mult:
                if vc.norm_groups < 1 or (vc.ch * m) % vc.norm_groups:
                    problems.append(f"VAE {name} width ch*mult={vc.ch * m} not divisible by norm_groups="
                                    f"{vc.norm_groups} (GroupNorm)")
        if t.vocab_size <= max(dataclasses.astuple(self.tokens)):
            problems.append(f"text vocab_size {t.vocab_size} too small for special id {max(dataclasses.astuple(self.tokens))}")
        if problems:
            raise ConfigError(f"invalid Cheers config '{self.name}': " + "; ".join(problems))
        return self

    # ---- official config.json ---------------------------------------------------------------------------------
    def to_hf_config(self) -> dict[str, Any]:
        """The official `config.json` layout, every field explicit, plus our extras under `cheers`."""
        t, v = self.text, self.vision

        def vae(c: VAEConfig, decoder: bool) -> dict[str, Any]:
            out = {"resolution": c.resolution, "in_channels": c.in_channels}
            if decoder:
                out["out_ch"] = c.out_ch
            out.update(ch=c.ch, ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks, z_channels=c.z_channels)
            if c.norm_groups != 32:
                out["norm_groups"] = c.norm_groups
            return out

        return {
            "architectures": ["Cheers"],
            "model_type": "umm",
            "torch_dtype": self.torch_dtype,
            "vae_encoder_config": vae(self.vae_encoder, False),
            "vae_decoder_config": vae(self.vae_decoder, True),
            "vision_representation_config": {
                "attention_dropout": 0.0,
                "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": v.hidden_size,
                "image_size": v.image_size,
                "intermediate_size": v.intermediate_size,
                "layer_norm_eps": v.layer_norm_eps,
                "model_type": "umm",
                "num_attention_heads": v.num_heads,
                "num_channels": v.num_channels,
                "num_hidden_layers": v.num_layers,
                "num_patches": v.num_patches,
                "patch_size": v.patch_size,
            },
            "text_config": {
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "max_window_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "rope_theta": t.rope_theta,
                "rms_norm_eps": t.rms_norm_eps,
                "sliding_window": t.max_position_embeddings,
                "tie_word_embeddings": t.tie_word_embeddings,
                "vocab_size": t.vocab_size,
                "max_position_embeddings": t.max_position_embeddings,
            },
            "cheers": {
                "name": self.name,
                "head": dataclasses.asdict(self.head),
                "tokens": dataclasses.asdict(self.tokens),
                "flow_loss_weight": self.flow_loss_weight,
            },
            **({"quantization_config": self.quantization} if self.quantization else {}),
        }

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "CheersConfig":
        """Read the official layout. Missing fields default to the released model (as the official classes do)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        for key in ("text_config", "vision_representation_config"):
            if key not in hf:
                raise ConfigError(f"{source}: missing '{key}' (is this a Cheers/UMM config?)")

        def section(value: Any, where: str) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{where}' must be a JSON object, got {type(value).__name__}")
            return value

        def pick(sub: dict[str, Any], mapping: dict[str, str], target: Any, where: str, ours: bool = False) -> Any:
            sub = section(sub, where)
            unknown = sorted(set(sub) - set(mapping)) if ours else []  # our own sections have no foreign keys
            if unknown:
                raise ConfigError(f"{source}: unknown field '{where}.{unknown[0]}'")
            kinds = {f.name: str(f.type) for f in dataclasses.fields(target)}
            kw = {}
            for hf_key, our_key in mapping.items():
                if hf_key in sub:
                    problem = _field_problem(our_key, sub[hf_key], kinds[our_key], f"{where}.{hf_key}")
                    if problem:
                        raise ConfigError(f"{source}: {problem}")
                    kw[our_key] = sub[hf_key]
            return target(**kw)

        t = pick(
            hf["text_config"],
            {
                "hidden_size": "hidden_size",
                "intermediate_size": "intermediate_size",
                "num_hidden_layers": "num_layers",
                "num_attention_heads": "num_heads",
                "num_key_value_heads": "num_kv_heads",
                "vocab_size": "vocab_size",
                "rope_theta": "rope_theta",
                "rms_norm_eps": "rms_norm_eps",
                "tie_word_embeddings": "tie_word_embeddings",
                "max_position_embeddings": "max_position_embeddings",
            },
            TextConfig,
            "text_config",
        )
        vsub = hf["vision_representation_config"]
        v = pick(
            vsub,
            {
                "hidden_size": "hidden_size",
                "intermediate_size": "intermediate_size",
                "num_hidden_layers": "num_layers",
                "num_attention_heads": "num_heads",
                "patch_size": "patch_size",
                "image_size": "image_size",
                "num_channels": "num_channels",
                "layer_norm_eps": "layer_norm_eps",
            },
            VisionConfig,
            "vision_representation_config",
        )
        if "num_patches" in vsub and vsub["num_patches"] != v.num_patches:
            raise ConfigError(
                f"{source}: vision num_patches {vsub['num_patches']} != (image_size/patch_size)^2 = {v.num_patches}"
            )
        vae_map = {k: k for k in ("resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "z_channels",
                                  "norm_groups")}
        enc = pick(hf.get("vae_encoder_config", {}), vae_map, VAEConfig, "vae_encoder_config")
        dec = pick(hf.get("vae_decoder_config", {}), vae_map, VAEConfig, "vae_decoder_config")
        for vc, key in ((enc, "vae_encoder_config"), (dec, "vae_decoder_config")):
            if "ch_mult" in hf.get(key, {}):
                problem = _field_problem("ch_mult", hf[key]["ch_mult"], "tuple[int, ...]", f"{key}.ch_mult")
                if problem:
                    raise ConfigError(f"{source}: {problem}")
                vc.ch_mult = tuple(hf[key]["ch_mult"])
        extra = section(hf.get("cheers", {}), "cheers")
        flow_loss_weight = extra.get("flow_loss_weight", 1.0)
        problem = _field_problem("flow_loss_weight", flow_loss_weight, "float", "cheers.flow_loss_weight")
        if problem:
            raise ConfigError(f"{source}: {problem}")
        stored = hf.get("torch_dtype", "float32")
        if stored not in WEIGHT_DTYPES:
            raise ConfigError(f"{source}: torch_dtype {stored!r}: expected one of {', '.join(WEIGHT_DTYPES)}")
        cfg = cls(
            text=t,
            vision=v,
            vae_encoder=enc,
            vae_decoder=dec,
            head=pick(extra.get("head", {}), {f.name: f.name for f in dataclasses.fields(HeadConfig)}, HeadConfig,
                      "cheers.head", ours=True),
            tokens=pick(extra.get("tokens", {}), {f.name: f.name for f in dataclasses.fields(TokenIds)}, TokenIds,
                        "cheers.tokens", ours=True),
            flow_loss_weight=flow_loss_weight,
            name=str(extra.get("name", "from-config")),
            torch_dtype=stored,
            quantization=hf.get("quantization_config"),  # checked by cheers.quantize before weights are read
        )
        try:
            return cfg.validate()
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "CheersConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
        return cls.from_hf_config(data, source=str(path))

    def save_json(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_config(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)


# ---- presets ----------------------------------------------------------------------------------------------------


def _released() -> CheersConfig:
    return CheersConfig(name="cheers-1.5b")


def _parity_tiny() -> CheersConfig:
    """The configuration of `../shared/parity/tiny-official` (Qwen2 vocab, 128 px)."""
    return CheersConfig(
        text=TextConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=128),
        vae_encoder=VAEConfig(resolution=128, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=32),
        vae_decoder=VAEConfig(resolution=128, ch=128, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=32),
        name="cheers-parity-tiny",
    )


def _tiny_tokens() -> TokenIds:
    """Special ids of our small byte-level BPE tokenizers (cheers.tokenizer.train_small_tokenizer): the eight
    specials take ids 0-7 in this order and the newline byte is id 8."""
    return TokenIds(pad=0, chat_start=1, chat_end=2, image=3, image_gen=4, img_start=5, img_end=6, no_mean=7, newline=8)


def _tiny(vocab_size: int = 1024) -> CheersConfig:
    """Smallest complete model, for unit tests: 64 px images, 4 image tokens, small vocabulary."""
    return CheersConfig(
        text=TextConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        vocab_size=vocab_size, max_position_embeddings=2048),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=64),
        vae_encoder=VAEConfig(resolution=64, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=8),
        vae_decoder=VAEConfig(resolution=64, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=8),
        head=HeadConfig(stage1_layers=1, stage2_layers=1),
        tokens=_tiny_tokens(),
        name="cheers-tiny",
    )


def _small(vocab_size: int = 2048) -> CheersConfig:
    """The embedded default's size: trains on 2 CPU cores in a few hours. 64 px images, 4x4 latent grid, 4 tokens."""
    return CheersConfig(
        text=TextConfig(hidden_size=256, intermediate_size=768, num_layers=6, num_heads=8, num_kv_heads=2,
                        vocab_size=vocab_size, max_position_embeddings=2048),
        vision=VisionConfig(hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4, image_size=64),
        # Narrow full-resolution levels: on 2 CPU cores the convolutions dominate every training step.
        vae_encoder=VAEConfig(resolution=64, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8, norm_groups=8),
        vae_decoder=VAEConfig(resolution=64, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8, norm_groups=8),
        head=HeadConfig(stage1_layers=2, stage2_layers=2),
        tokens=_tiny_tokens(),
        name="cheers-small",
    )


def _small_p8(vocab_size: int = 2048) -> CheersConfig:
    """`cheers-small` with 16 image tokens instead of 4: ViT patch 8, VAE factor 4 (16x16x8 latent, 8x8 grid).
    At 4 tokens a 13-22 px ShapesWorld object is a fraction of one token and the model never learned shapes."""
    cfg = _small(vocab_size)
    cfg.vision.patch_size = 8
    for vae in (cfg.vae_encoder, cfg.vae_decoder):
        vae.ch_mult = (1, 2, 2)
    cfg.name = "cheers-small-p8"
    return cfg


PRESETS = {
    "cheers-1.5b": _released,
    "cheers-parity-tiny": _parity_tiny,
    "cheers-tiny": _tiny,
    "cheers-small": _small,
    "cheers-small-p8": _small_p8,
}


def preset(name: str) -> CheersConfig:
    """A fresh config for a named preset."""
    try:
        return PRESETS[name]().validate()
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}") from None
