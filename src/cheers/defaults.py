"""Sampling defaults and dtypes of a model directory: what `generation_config.json` and `preprocessor_config.json`
say (read and written), and which dtype the weights are held in."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cheers import sampling as S
from cheers.checkpoint import CheckpointError
from cheers.config import WEIGHT_DTYPES, CheersConfig
from cheers.samplers import SAMPLERS


@dataclass
class ImageDefaults:
    """Sampling defaults: the reference demo's (w = 9.5, N = 80, a = 0.5) unless the model directory says otherwise."""

    steps: int = 80
    cfg_scale: float = 9.5
    shift: float = 0.5
    sampler: str = "euler"
    edit_start: float = 0.1
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guidance only for lo <= t <= hi (t = 0 is noise)


def check_edit_start(value: Any) -> float:
    """An editing start time t0: a number in [0, 1) (t0 = 1 would leave no step to take)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
        raise ValueError(f"edit_start must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass
class TextDefaults:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()  # besides the end-of-turn token: generation_config.json's eos ids


DType = torch.dtype | str | None


def resolve_dtype(dtype: DType, device: torch.device, stored: str = "float32") -> torch.dtype:
    """The dtype the weights are held and run in: float32 / bfloat16 / float16 (a torch.dtype or its name), or
    "auto" / None = the checkpoint's `torch_dtype` on CUDA and float32 elsewhere (bf16 matmuls are slow on CPUs)."""
    if dtype is None or dtype == "auto":
        return getattr(torch, stored) if device.type == "cuda" else torch.float32
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(WEIGHT_DTYPES)} or 'auto'")
    return getattr(torch, name)


def _read_json(f: Path) -> dict[str, Any]:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{f}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data


def stored_dtype(path: Path) -> str:
    """config.json's `torch_dtype` (validated when the config itself is read)."""
    f = path / "config.json"
    return str(_read_json(f).get("torch_dtype", "float32")) if f.exists() else "float32"


# generation_config.json's standard (transformers) fields -> TextDefaults fields
_STANDARD_TEXT_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                         "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}


def read_defaults(path: Path, config: CheersConfig) -> tuple[ImageDefaults, TextDefaults]:
    """Sampling defaults of a model directory. Text: the standard fields of generation_config.json (temperature,
    top_k, top_p, repetition_penalty, do_sample, eos_token_id: every listed id stops a reply), then its optional
    `cheers.text` section; images: the reference demo's settings unless `cheers.image` says otherwise. A
    preprocessor_config.json `scale_resolution` must match the model's resolution."""
    img, txt = ImageDefaults(), TextDefaults()
    f = path / "generation_config.json"
    if f.exists():
        data = _read_json(f)
        std = {ours: data[key] for key, ours in _STANDARD_TEXT_FIELDS.items() if data.get(key) is not None}
        if data.get("do_sample") is False:
            std["temperature"] = 0.0  # transformers decodes greedily whatever the temperature says
        eos = data.get("eos_token_id")
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.text.vocab_size
                       for i in ids):
                raise CheckpointError(f"{f}: eos_token_id {eos!r}: expected token ids below {config.text.vocab_size}")
            std["stop_ids"] = tuple(i for i in dict.fromkeys(ids) if i != config.tokens.chat_end)
        ours = data.get("cheers", {})
        img = replace(img, **{k: v for k, v in ours.get("image", {}).items() if hasattr(img, k)})
        try:  # both checks' messages start with the field's name
            img.cfg_interval = S.guidance_interval(img.cfg_interval)  # JSON gives a list
            img.edit_start = check_edit_start(img.edit_start)
        except ValueError as err:
            raise CheckpointError(f"{f}: cheers.image.{err}") from None
        if img.sampler not in SAMPLERS:
            raise CheckpointError(f"{f}: cheers.image.sampler '{img.sampler}': expected one of {', '.join(SAMPLERS)}")
        txt = replace(txt, **std)
        txt = replace(txt, **{k: v for k, v in ours.get("text", {}).items() if hasattr(txt, k) and k != "stop_ids"})
        for field in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(txt, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise CheckpointError(f"{f}: {field} {value!r}: expected a number >= 0")
        for field in ("top_k", "max_new_tokens"):
            value = getattr(txt, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{f}: {field} {value!r}: expected an integer >= 0")
    pre = path / "preprocessor_config.json"
    if pre.exists():
        res = _read_json(pre).get("scale_resolution")
        if res is not None and res != config.resolution:
            raise CheckpointError(f"{pre}: scale_resolution {res!r} differs from the model's resolution "
                                  f"{config.resolution} (config.json vision image_size)")
    return img, txt


def write_defaults(directory: Path, img: ImageDefaults, txt: TextDefaults, config: CheersConfig) -> None:
    """generation_config.json (standard fields + our `cheers` section) and preprocessor_config.json, as
    `read_defaults` reads them back."""
    tk = config.tokens
    gen = {
        "bos_token_id": tk.pad, "pad_token_id": tk.pad, "eos_token_id": list(dict.fromkeys((tk.chat_end, *txt.stop_ids))),
        "do_sample": txt.temperature > 1e-6, "temperature": txt.temperature, "top_k": txt.top_k, "top_p": txt.top_p,
        "repetition_penalty": txt.repetition_penalty, "max_new_tokens": txt.max_new_tokens,
        "cheers": {"image": {**vars(img), "cfg_interval": list(img.cfg_interval)}},
    }
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    pre = {"image_processor_type": "UMMImageProcessor", "processor_class": "UMMProcessor",
           "scale_resolution": config.resolution, "patch_size": config.vision.patch_size}
    (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n", encoding="utf-8")
