"""Quantized inference: the linear layers of the LLM, the ViT, the projectors and the flow head in fewer bits.

Modes (`MODES`):
- `int8`: int8 weights (symmetric, one scale per output row) and int8 activations quantized per token on the fly,
  multiplied with int32 accumulation (`torch._int_mm`): on the CPUs measured (docs/quantization.md) the fastest
  kernel that reads the plain int8 weights, both for many rows (prefill, text-to-image) and for one (decoding).
- `int8-weight`: the same stored weights; the activations stay float (the weights are widened per matmul), for
  the smallest error at int8 memory.
- `int4-weight` (CUDA): 4-bit weights in groups of `INT4_GROUP` along the input, a scale and an offset per group.
- `fp8` (CUDA, compute capability >= 8.9): float8 e4m3 weights and per-token float8 activations.

The VAE and the latent-to-pixel decoder are convolutions and stay in float; so do the output head (tied to the
input embedding), the timestep embedder and norms. `QuantSpec` picks the modules by name patterns (fnmatch) on
top of those defaults. A quantized model saves as safetensors with integer weights (`<name>.weight`) and their
scales (`<name>.weight_scale`, `<name>.weight_zero`), and records the mode and the quantized modules under
config.json's `quantization_config`, so loading it never quantizes again.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int8-weight", "int4-weight", "fp8")
CUDA_ONLY = ("int4-weight", "fp8")
BITS = {"int8": 8, "int8-weight": 8, "int4-weight": 4, "fp8": 8}
# The stored weights of these modes are identical, so a checkpoint of one loads as the other.
SAME_WEIGHTS = {"int8": "int8", "int8-weight": "int8", "int4-weight": "int4-weight", "fp8": "fp8"}

QUANT_METHOD = "cheers"  # config.json quantization_config.quant_method
FORMAT_VERSION = 1  # bump when the stored layout changes; newer checkpoints are refused with a clear line
INT4_GROUP = 128

# Module name patterns (fnmatch on `named_modules` names) quantized by default, and those never quantized.
DEFAULT_INCLUDE = ("model.language_model.*", "model.vision_representation.*", "model.und_projector.*",
                   "model.gen_projector.*", "model.hi_gate.*", "model.hi_projector.*")
DEFAULT_EXCLUDE = ("lm_head", "model.vae_model.*", "model.vae_decoder_projector.*", "model.time_embed.*")
# Too small to gain: fewer bytes than this in float32 stay float (also keeps the 1-wide gate output float).
MIN_FEATURES = 16

# Rows at or above which `int8` quantizes the activations; below it the weight-only kernel runs. One: on the
# 2-core AVX-512 VNNI CPU measured, `_int_mm` also beat every weight-only kernel at one row (docs/quantization.md).
# fp8 needs 16 rows for its GPU kernel.
DYNAMIC_MIN_ROWS = 1
FP8_MIN_ROWS = 16


class QuantizationError(ValueError):
    """A quantization request or a quantized checkpoint that cannot be honoured here; the message says why."""


@dataclass(frozen=True)
class QuantSpec:
    """A mode and which linear layers it applies to: `include` patterns minus `exclude` patterns (fnmatch on
    module names such as `model.language_model.layers.0.mlp.down_proj`)."""

    mode: str
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = field(default=DEFAULT_EXCLUDE)

    def selects(self, name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))


def parse_spec(value: "str | QuantSpec | None") -> QuantSpec | None:
    """`"int8"`, `"int8:model.language_model.*"` (only those modules), `"int8:*,!model.vision_representation.*"`
    (everything quantizable but the ViT), a `QuantSpec`, or None / "none" (no quantization)."""
    if value is None or isinstance(value, QuantSpec):
        if value is not None:
            _check_mode(value.mode)
        return value
    if not isinstance(value, str):
        raise QuantizationError(f"quantize {value!r}: expected a mode name ({', '.join(MODES)}) or a QuantSpec")
    text = value.strip()
    if text.lower() in ("", "none", "off"):
        return None
    mode, _, patterns = text.partition(":")
    _check_mode(mode)
    if not patterns:
        return QuantSpec(mode)
    items = [p.strip() for p in patterns.split(",") if p.strip()]
    include = tuple(p for p in items if not p.startswith("!"))
    exclude = DEFAULT_EXCLUDE + tuple(p[1:] for p in items if p.startswith("!"))
    return QuantSpec(mode, include or DEFAULT_INCLUDE, exclude)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise QuantizationError(f"quantize mode {mode!r} is unknown; expected one of {', '.join(MODES)}")


def check_device(mode: str, device: torch.device | str) -> None:
    """Refuse a mode this device cannot run, naming the mode and what it needs."""
    device = torch.device(device)
    if mode not in CUDA_ONLY:
        return
    if device.type != "cuda":
        raise QuantizationError(f"quantize mode {mode!r} runs on CUDA GPUs only (no fast {BITS[mode]}-bit kernel for "
                                f"{device.type}); use int8 or int8-weight on this device")
    if mode == "fp8":
        if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
            raise QuantizationError(f"quantize mode 'fp8' needs float8 support, which torch {torch.__version__} lacks")
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise QuantizationError(f"quantize mode 'fp8' needs a GPU with compute capability >= 8.9 (Ada/Hopper "
                                    f"float8 tensor cores); {torch.cuda.get_device_name(device)} has "
                                    f"{cap[0]}.{cap[1]}")


# ---- weight formats ---------------------------------------------------------------------------------------------


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~ q * scale, q in [-127, 127]."""
    w = w.float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_groups(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups along the input: w ~ (q - 8) * scale + zero with q in [0, 15]; two values a byte
    (even column in the low nibble). Returns (packed uint8 [N, K/2], scale [N, K/group], zero [N, K/group])."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo).clamp(min=1e-12) / 15
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    zero = lo + 8 * scale
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = packed.shape[0]
    q = torch.stack([packed & 15, packed >> 4], -1).reshape(n, -1)
    group = q.shape[1] // scale.shape[1]
    w = (q.reshape(n, -1, group).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(n, -1).to(dtype)


def fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 per output row: w ~ q * scale."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    w = w.float()
    scale = w.abs().amax(1).clamp(min=1e-12) / fmax
    return (w / scale[:, None]).clamp(-fmax, fmax).to(torch.float8_e4m3fn), scale


# ---- kernels ----------------------------------------------------------------------------------------------------


def _int8_dynamic(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[M, K] float x int8 [N, K] with per-token int8 activations (int32 accumulation) -> [M, N] in x's dtype."""
    xs = x.float().abs().amax(-1, keepdim=True).clamp_(min=1e-12) / 127
    xq = torch.round(x.float() / xs).clamp_(-127, 127).to(torch.int8)
    return (torch._int_mm(xq, w.t()).float() * xs * scale.float()).to(x.dtype)


def _int8_weight_only(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[M, K] float x int8 [N, K] (float activations) -> [M, N]. The weight is widened for the matmul: on the CPU
    measured, `torch._weight_int8pack_mm` (the fused weight-only kernel) was 3-40x slower than this."""
    return F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)


def _fp8_dynamic(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    fmax = torch.finfo(torch.float8_e4m3fn).max
    xs = x.float().abs().amax(-1, keepdim=True).clamp_(min=1e-12) / fmax
    xq = (x.float() / xs).clamp_(-fmax, fmax).to(torch.float8_e4m3fn)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=scale.float()[None, :], out_dtype=out_dtype)
    return y.to(x.dtype)


class QuantLinear(nn.Module):
    """`nn.Linear` with quantized weights (buffers, so they save and load like any tensor); the bias stays float."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, group_size: int = INT4_GROUP,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _check_mode(mode)
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        kw = {"device": device}
        if mode == "int4-weight":
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, **kw))
            groups = in_features // group_size
            self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=dtype, **kw))
            self.register_buffer("weight_zero", torch.empty(out_features, groups, dtype=dtype, **kw))
        else:
            wdtype = torch.float8_e4m3fn if mode == "fp8" else torch.int8
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=wdtype, **kw))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32 if mode == "fp8"
                                                             else dtype, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, mode: str, group_size: int = INT4_GROUP) -> "QuantLinear":
        w = lin.weight.detach()
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, mode, group_size, device="meta",
                dtype=w.dtype)
        if mode == "int4-weight":
            packed, scale, zero = int4_groups(w, group_size)
            q.weight, q.weight_scale, q.weight_zero = packed, scale.to(w.dtype), zero.to(w.dtype)
        elif mode == "fp8":
            q.weight, q.weight_scale = fp8_rows(w)
        else:
            qw, scale = int8_rows(w)
            q.weight, q.weight_scale = qw, scale.to(w.dtype)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] these bits stand for (for error measurements and reference paths)."""
        if self.mode == "int4-weight":
            return int4_dequantize(self.weight, self.weight_scale, self.weight_zero, dtype)
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if self.mode == "int8" and rows >= DYNAMIC_MIN_ROWS:
            y = _int8_dynamic(x2, self.weight, self.weight_scale)
        elif self.mode in ("int8", "int8-weight"):
            y = _int8_weight_only(x2, self.weight, self.weight_scale)
        elif self.mode == "fp8" and rows >= FP8_MIN_ROWS:
            y = _fp8_dynamic(x2, self.weight, self.weight_scale)
        else:  # fp8 at a few rows and int4: dequantize on the fly (weights stay small in memory)
            y = F.linear(x2, self.dequantized(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


# ---- applying a spec ----------------------------------------------------------------------------------------------


def _quantizable(name: str, module: nn.Module, spec: QuantSpec) -> bool:
    if type(module) is not nn.Linear or not spec.selects(name):
        return False
    if min(module.in_features, module.out_features) < MIN_FEATURES:
        return False
    return spec.mode != "int4-weight" or module.in_features % INT4_GROUP == 0


def targets(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Names of the linear layers `spec` quantizes in `model` (works on the meta device)."""
    return [n for n, m in model.named_modules() if _quantizable(n, m, spec)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantize_model(model: nn.Module, spec: "QuantSpec | str") -> list[str]:
    """Quantize the selected linear layers of a loaded float model in place, one at a time (each float weight is
    freed as its quantized copy is made); returns their names. A `CheersModel` records it in its config."""
    spec = parse_spec(spec)
    if spec is None:
        return []
    if mode_of(model) is not None:
        raise QuantizationError(f"the model is already quantized ({mode_of(model)}); quantize a float model")
    names = targets(model, spec)
    for name in names:
        _replace(model, name, QuantLinear.from_linear(model.get_submodule(name), spec.mode))
    _note(model, spec)
    return names


def names_of(model: nn.Module) -> list[str]:
    """Names of the quantized linear layers of a model."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def _note(model: nn.Module, spec: QuantSpec) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization"):
        config.quantization = record(spec, names_of(model))


def prepare_meta(model: nn.Module, record: dict[str, Any]) -> None:
    """Turn the recorded modules of a meta-device model into empty `QuantLinear`s, shaped as stored, so the
    checkpoint's quantized tensors load into them directly."""
    for name in record["modules"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise QuantizationError(f"quantization_config lists module '{name}', which this model does not have") from None
        if type(lin) is not nn.Linear:
            raise QuantizationError(f"quantization_config lists '{name}', which is not a linear layer")
        _replace(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, record["mode"],
                                          int(record.get("group_size", INT4_GROUP)), device="meta",
                                          dtype=lin.weight.dtype))


def quantize_on_load(model: nn.Module, spec: QuantSpec) -> Callable[[str], None]:
    """A callback for `checkpoint.load_state_into`: each selected linear layer is quantized as soon as its last
    tensor is loaded, so a float checkpoint never sits in memory whole."""
    pending = {n: {f"{n}.{k}" for k, _ in m.named_parameters(recurse=False)} for n, m in model.named_modules()
               if _quantizable(n, m, spec)}
    owner = {key: n for n, keys in pending.items() for key in keys}

    def loaded(key: str) -> None:
        name = owner.get(key)
        if name is None:
            return
        pending[name].discard(key)
        if not pending[name]:
            _replace(model, name, QuantLinear.from_linear(model.get_submodule(name), spec.mode))

    return loaded


def record(spec: QuantSpec, names: list[str]) -> dict[str, Any]:
    """config.json `quantization_config` of a model quantized by `spec`."""
    rec: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "mode": spec.mode,
                           "bits": BITS[spec.mode], "include": list(spec.include), "exclude": list(spec.exclude),
                           "modules": list(names)}
    if spec.mode == "int4-weight":
        rec["group_size"] = INT4_GROUP
    return rec


def check_record(rec: Any, source: str = "config.json") -> dict[str, Any]:
    """Validate a checkpoint's `quantization_config` before any weight is read: one line naming what cannot be
    read and why."""
    where = f"{source}: quantization_config"
    if not isinstance(rec, dict):
        raise QuantizationError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    method = rec.get("quant_method")
    if method != QUANT_METHOD:
        raise QuantizationError(f"{where}: quant_method {method!r} is not one cheers reads (it reads its own "
                                f"'{QUANT_METHOD}' format; load the float checkpoint and pass quantize= instead)")
    version = rec.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise QuantizationError(f"{where}: format_version {version!r}: expected an integer")
    if version > FORMAT_VERSION:
        from cheers import __version__

        raise QuantizationError(f"{where}: format_version {version} is newer than this cheers {__version__} reads "
                                f"(<= {FORMAT_VERSION}); upgrade cheers to load this checkpoint")
    mode = rec.get("mode")
    if mode not in MODES:
        raise QuantizationError(f"{where}: mode {mode!r} is unknown to this cheers (it knows {', '.join(MODES)}); "
                                "upgrade cheers to load this checkpoint")
    if mode == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise QuantizationError(f"{where}: mode 'fp8' needs float8 tensors, which torch {torch.__version__} lacks")
    mods = rec.get("modules")
    if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
        raise QuantizationError(f"{where}: modules: expected a list of module names")
    group = rec.get("group_size", INT4_GROUP)
    if mode == "int4-weight" and (not isinstance(group, int) or group < 2 or group % 2):
        raise QuantizationError(f"{where}: group_size {group!r}: expected an even integer")
    return rec


def resolve(stored: dict[str, Any] | None, requested: QuantSpec | None, device: torch.device, source: str) -> \
        tuple[dict[str, Any] | None, QuantSpec | None]:
    """What loading a checkpoint does: (the stored record to load as is, or None; the spec to quantize a float
    checkpoint with, or None). A quantized checkpoint loads in its own mode, or in one with the same stored
    weights (int8 <-> int8-weight); anything else would quantize twice and is refused."""
    if stored is not None:
        stored = dict(check_record(stored, source))
        if requested is not None and requested.mode != stored["mode"]:
            if SAME_WEIGHTS[requested.mode] != SAME_WEIGHTS[stored["mode"]]:
                raise QuantizationError(f"{source}: the checkpoint is quantized as {stored['mode']}; it cannot be "
                                        f"re-quantized as {requested.mode} (load the float checkpoint for that)")
            stored["mode"] = requested.mode
        try:
            check_device(stored["mode"], device)
        except QuantizationError as err:
            raise QuantizationError(f"{source}: the checkpoint is quantized: {err}") from None
        return stored, None
    if requested is not None:
        check_device(requested.mode, device)
    return None, requested


# ---- random weights without a float copy -------------------------------------------------------------------------


@torch.no_grad()
def materialize_random(model: nn.Module, spec: QuantSpec | None, device: torch.device | str = "cpu",
                       seed: int = 0) -> list[str]:
    """Give a meta-device model random weights module by module, quantizing the selected linear layers as they
    are made, so peak memory stays near the quantized size (for benchmarks of large presets). Linear, conv,
    embedding and norm layers use their own `reset_parameters`; other weights are ones (norm scales) or
    N(0, 0.02); biases and running means zero, running variances one. Returns the quantized names."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        names = _materialize(model, spec, device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if spec is not None:
        _note(model, spec)
    return names


def _materialize(model: nn.Module, spec: QuantSpec | None, device: torch.device | str) -> list[str]:
    names = targets(model, spec) if spec is not None else []
    chosen = set(names)
    for name, module in list(model.named_modules()):
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own or not any(t.is_meta for _, t in own):
            continue
        if name in chosen:
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            _replace(model, name, QuantLinear.from_linear(lin.to(device), spec.mode))
            continue
        module.to_empty(device=device, recurse=False)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            continue
        for key, t in own:
            t = getattr(module, key)
            if not t.is_floating_point():
                t.zero_()
            elif key == "running_var" or (key == "weight" and t.dim() == 1):
                t.fill_(1.0)
            elif key in ("bias", "running_mean"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02)
    return names


def random_model(config: Any, spec: QuantSpec, device: torch.device | str = "cpu") -> nn.Module:
    """A `CheersModel` of `config` with random weights, quantized by `spec` as it is made (no float copy)."""
    from cheers.model.cheers import CheersModel

    check_device(spec.mode, device)
    with torch.device("meta"):
        model = CheersModel(config)
    materialize_random(model, spec)
    return model.eval()


# ---- reporting ----------------------------------------------------------------------------------------------------


def footprint(module: nn.Module) -> dict[str, Any]:
    """Bytes of a module's unique tensors, its parameter count (a quantized weight counts its values), and the
    average stored bits per value (scales included); works on the meta device."""
    seen: set[int] = set()
    nbytes = values = 0
    for mod in module.modules():
        for key, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            nbytes += t.numel() * t.element_size()
            if isinstance(mod, QuantLinear) and key == "weight":
                values += mod.in_features * mod.out_features
            elif not (isinstance(mod, QuantLinear) and key.startswith("weight_")):
                values += t.numel()
    return {"bytes": nbytes, "bits": round(8 * nbytes / values, 2) if values else 0.0,
            "quantized_linears": sum(isinstance(m, QuantLinear) for m in module.modules())}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def mode_of(model: nn.Module) -> str | None:
    """The quantization mode of a model's linear layers, or None when it has none."""
    modes = {m.mode for m in model.modules() if isinstance(m, QuantLinear)}
    return modes.pop() if len(modes) == 1 else (None if not modes else ",".join(sorted(modes)))


__all__ = ["MODES", "QuantSpec", "QuantLinear", "QuantizationError", "parse_spec", "quantize_model", "footprint",
           "check_device", "check_record", "record", "materialize_random"]
