"""LoRA adapters on a `CheersModel`, applied with the `peft` library and stored in PEFT's own format.

An adapter directory holds `adapter_config.json` (a peft `LoraConfig`) and `adapter_model.safetensors` with PEFT's
key names (`base_model.model.<module>.lora_A.weight`, `... .lora_B.weight`), so `peft.PeftModel.from_pretrained`
loads it onto a `CheersModel` too. Adapters are injected in place with `peft.inject_adapter_in_model`: the model
stays a `CheersModel` whose module paths are the official ones; each adapted `nn.Linear` becomes a peft
`lora.Linear` holding the original layer as `base_layer`. `merge_and_unload` folds the active adapter into the
weights and puts the plain layers back, so the state dict has the official key names again.

Targets are `nn.Linear` layers chosen by module-name patterns (fnmatch, or `re:<regex>` for a full match) or by
the group names of `TARGET_GROUPS`. The frozen VAE and the output head (which decoding reads as a bare weight)
are never adapted.

peft is imported only when an adapter is used (it is the `lora` extra).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
from torch import nn

if TYPE_CHECKING:  # peft is imported lazily (a few seconds: it pulls in transformers)
    from peft import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's file keys are relative to PeftModel, whose base model sits here

# Named target groups: module-name patterns of the official layout (only the nn.Linear layers they match count).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "llm": ("model.language_model.layers.*.self_attn.*", "model.language_model.layers.*.mlp.*"),
    "llm_attention": ("model.language_model.layers.*.self_attn.*",),
    "llm_mlp": ("model.language_model.layers.*.mlp.*",),
    "flow_head": ("model.gen_projector.*", "model.hi_projector.*"),
    "vit": ("model.vision_representation.encoder.layers.*",),
    "projectors": ("model.und_projector.*",),
}
DEFAULT_TARGETS = ("llm",)
# never adapted: the frozen autoencoder, and the output head (decoding reads lm_head.weight directly)
NEVER_TARGETS = ("model.vae_model.*", "lm_head")


class AdapterError(ValueError):
    """An adapter does not fit the model, or its files or settings are invalid; the message names the cause."""


def _peft():
    try:
        import peft
    except ImportError:
        raise AdapterError("LoRA adapters need the peft package: pip install 'cheers[lora]'") from None
    return peft


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Module name -> every `nn.Linear` of the model, by its official name (an adapted layer by its base layer)."""
    out: dict[str, nn.Linear] = {}
    # nn.MultiheadAttention reads its out_proj weight directly, so an adapter there would never run
    inside_mha = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if name in inside_mha:
            continue
        if _is_lora_layer(module):
            base = module.get_base_layer()
            if isinstance(base, nn.Linear):
                out[name] = base
        elif isinstance(module, nn.Linear) and not name.endswith(".base_layer") and ".lora_" not in name:
            out[name] = module
    return out


def resolve_targets(model: nn.Module, targets: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """The names of the `nn.Linear` layers that `targets` (group names or patterns) select, minus `exclude`.
    A target that selects no linear layer, or one that reaches the VAE or the output head, is an error."""
    layers = linear_layers(model)
    chosen: dict[str, None] = {}
    for target in targets:
        patterns = TARGET_GROUPS.get(target, (target,))
        hit = [n for n in layers if any(_matches(n, p) for p in patterns)]
        if not hit:
            raise AdapterError(f"target '{target}' matches no linear layer of the model (groups: "
                               f"{', '.join(TARGET_GROUPS)}; or a module-name pattern such as "
                               "'model.language_model.layers.*.self_attn.q_proj')")
        banned = [n for n in hit if any(_matches(n, p) for p in NEVER_TARGETS)]
        if banned:
            raise AdapterError(f"target '{target}' selects {banned[0]}: the VAE and the output head are never adapted")
        chosen.update(dict.fromkeys(hit))
    exclude = list(exclude)
    names = [n for n in chosen if not any(_matches(n, p) for p in exclude)]
    if not names:
        raise AdapterError("the exclude patterns remove every target layer")
    return names


def make_config(targets: list[str], rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                base: str | None = None) -> "LoraConfig":
    """A peft `LoraConfig` over explicit module names (portable: any peft reads it back the same way)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"rank must be an integer >= 1 (got {rank!r})")
    if not alpha > 0:
        raise AdapterError(f"alpha must be > 0 (got {alpha!r})")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout must be in [0, 1) (got {dropout!r})")
    peft = _peft()
    return peft.LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), use_rslora=bool(rslora),
                           target_modules=list(targets), bias="none", base_model_name_or_path=base)


def scaling(config: "LoraConfig") -> float:
    """The factor of B @ A in the adapted layer (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    r = config.r
    return config.lora_alpha / (r ** 0.5 if config.use_rslora else r)


# ---- injecting, switching, merging ------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if _is_lora_layer(module):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters injected into the model, in the order they were added."""
    return list(getattr(model, "peft_config", {}) or {})


def add_adapter(model: nn.Module, config: "LoraConfig", name: str = "default", trainable: bool = False) -> None:
    """Inject a new (freshly initialised: B = 0) adapter `name` into the model with peft, in place, and make it
    the active one. The base model's parameters are frozen; the adapter's require gradients if `trainable`."""
    peft = _peft()
    if name in adapter_names(model):
        raise AdapterError(f"an adapter named '{name}' is already loaded")
    missing = sorted(set(config.target_modules) - set(linear_layers(model)))
    if missing:
        raise AdapterError(f"the adapter targets {len(missing)} layer(s) the model lacks, e.g. {missing[0]}")
    with warnings.catch_warnings():
        # peft warns that a second adapter makes a multi-adapter model: that is the intent here
        warnings.filterwarnings("ignore", message=".*peft_config.*attribute in the model")
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    set_active(model, name, trainable=trainable)


def set_active(model: nn.Module, name: str | None, trainable: bool = False) -> None:
    """Make adapter `name` the only active one (layers it does not adapt run plain), or run the base model
    (None). The active adapter's weights require gradients only if `trainable` (training); the others never."""
    if name is not None and name not in adapter_names(model):
        known = ", ".join(adapter_names(model)) or "none"
        raise AdapterError(f"no adapter named '{name}' (loaded: {known})")
    for _, layer in lora_layers(model):
        if name is not None and name in layer.lora_A:
            layer.enable_adapters(True)
            layer.set_adapter(name, inference_mode=not trainable)
        else:
            layer.enable_adapters(False)


def active_adapter(model: nn.Module) -> str | None:
    for _, layer in lora_layers(model):
        if not layer.disable_adapters:
            return layer.active_adapters[0]
    return None


def merge_and_unload(model: nn.Module, name: str | None = None) -> None:
    """Fold adapter `name` (default: the active one) into the base weights and replace every adapted layer by
    its plain `nn.Linear`, dropping all adapters: the model is a plain `CheersModel` with official key names."""
    name = name if name is not None else active_adapter(model)
    for path, layer in list(lora_layers(model)):
        if name is not None and name in layer.lora_A:
            layer.merge(adapter_names=[name])
        parent_name, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def merged_state_dict(state: dict[str, torch.Tensor], config: "LoraConfig",
                      name: str = "default") -> dict[str, torch.Tensor]:
    """A state dict with official key names from an adapted model's one (`X.base_layer.weight`,
    `X.lora_A.<name>.weight`, ...): each adapted weight becomes W + scaling * B @ A (computed in float32, as
    peft's merge does for float32 weights); the other adapters' tensors are dropped."""
    s = scaling(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        module, _, leaf = key.partition(".base_layer.")
        if leaf == "weight" and f"{module}.lora_A.{name}.weight" in state:
            a = state[f"{module}.lora_A.{name}.weight"].float()
            b = state[f"{module}.lora_B.{name}.weight"].float()
            value = (value.float() + (b @ a) * s).to(value.dtype)
        out[f"{module}.{leaf}"] = value
    return out


# ---- PEFT files -------------------------------------------------------------------------------------------------


def _file_key(param_name: str, name: str) -> str | None:
    """`X.lora_A.<name>.weight` -> `base_model.model.X.lora_A.weight` (None for other parameters)."""
    for part in ("lora_A", "lora_B"):
        tag = f".{part}.{name}."
        if tag in param_name:
            module, _, leaf = param_name.partition(tag)
            return f"{PEFT_PREFIX}{module}.{part}.{leaf}"
    return None


def adapter_state(named: Iterable[tuple[str, torch.Tensor]], name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT file keys -> tensors (CPU, contiguous) of adapter `name` from (parameter name, tensor) pairs."""
    out = {}
    for pname, tensor in named:
        key = _file_key(pname, name)
        if key is not None:
            out[key] = tensor.detach().to("cpu").contiguous()
    return out


def save_adapter(directory: str | os.PathLike, config: "LoraConfig", state: dict[str, torch.Tensor],
                 dtype: torch.dtype | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT's format) into `directory`, each file
    under a temporary name first. `state` has PEFT file keys (`adapter_state`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    tmp_weights = directory / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    fields = config.to_dict()
    fields["target_modules"] = sorted(config.target_modules)  # peft keeps a set; a sorted list is reproducible
    tmp_config = directory / f".{ADAPTER_CONFIG}.tmp"
    tmp_config.write_text(json.dumps(fields, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp_weights, directory / ADAPTER_WEIGHTS)
    os.replace(tmp_config, directory / ADAPTER_CONFIG)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple["LoraConfig", dict[str, torch.Tensor]]:
    """The LoraConfig and the tensors (PEFT file keys) of an adapter directory."""
    from safetensors import safe_open

    directory = Path(directory)
    cfg_file, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not directory.is_dir():
        raise AdapterError(f"{directory}: not a directory")
    if not cfg_file.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    if not weights.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    try:
        fields = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterError(f"{cfg_file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(fields, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")
    if fields.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {fields.get('peft_type')!r}; only LoRA adapters (LORA) are supported")
    rank = fields.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{cfg_file}: r must be an integer >= 1 (got {rank!r})")
    targets = fields.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{cfg_file}: target_modules must be a list of module names or a regex (got {targets!r})")
    unsupported = {k: fields.get(k) for k in ("use_dora", "fan_in_fan_out", "lora_bias", "target_parameters",
                                              "layers_to_transform", "rank_pattern", "alpha_pattern") if fields.get(k)}
    if fields.get("init_lora_weights", True) not in (True, False, "gaussian"):
        # PiSSA, OLoRA, EVA, ... initialisations also rewrite the base weights
        unsupported["init_lora_weights"] = fields["init_lora_weights"]
    if fields.get("bias", "none") != "none":
        unsupported["bias"] = fields["bias"]
    if fields.get("modules_to_save"):
        unsupported["modules_to_save"] = fields["modules_to_save"]
    if unsupported:
        key, value = next(iter(unsupported.items()))
        raise AdapterError(f"{cfg_file}: {key}={value!r} is not supported (plain LoRA on linear layers only)")
    peft = _peft()
    known = set(peft.LoraConfig.__dataclass_fields__)
    try:
        config = peft.LoraConfig(**{k: v for k, v in fields.items() if k in known and k not in ("peft_type",)})
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{cfg_file}: {str(err).strip().splitlines()[0]}") from None
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise AdapterError(f"{weights}: corrupt or truncated safetensors file ({err})") from None
    return config, state


def peft_targets(config: "LoraConfig", layers: Iterable[str], where: str) -> list[str]:
    """The layers an adapter config's `target_modules` name, as peft reads them: a string is a regular
    expression over the full module name; a list entry names a module or a suffix of dotted parts
    (`q_proj` = every `*.q_proj`). An entry that names nothing is an error."""
    layers = list(layers)
    spec = config.target_modules
    if isinstance(spec, str):
        hit = [n for n in layers if re.fullmatch(spec, n)]
        if not hit:
            raise AdapterError(f"{where}: target_modules '{spec}' matches no linear layer of this model (an adapter "
                               "for another base model?)")
        return hit
    chosen: dict[str, None] = {}
    for entry in sorted(spec):
        hit = [n for n in layers if n == entry or n.endswith("." + entry)]
        if not hit:
            raise AdapterError(f"{where}: targets {entry}, which this model lacks (an adapter for another base "
                               "model?)")
        chosen.update(dict.fromkeys(hit))
    return list(chosen)


def check_adapter(model: nn.Module, config: "LoraConfig", state: dict[str, torch.Tensor], where: str) -> list[str]:
    """Does this adapter fit the model? Target names, file keys and every tensor's shape; one line if not.
    Returns the names of the layers it adapts."""
    layers = linear_layers(model)
    targets = peft_targets(config, layers, where)
    banned = [t for t in targets if any(_matches(t, p) for p in NEVER_TARGETS)]
    if banned:
        raise AdapterError(f"{where}: adapts {banned[0]}; the VAE and the output head are never adapted")
    r = config.r
    expected = {}
    for t in targets:
        layer = layers[t]
        expected[f"{PEFT_PREFIX}{t}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{PEFT_PREFIX}{t}.lora_B.weight"] = (layer.out_features, r)
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise AdapterError(f"{where}: {ADAPTER_WEIGHTS} holds {len(unknown)} tensor(s) outside the adapter's targets, "
                           f"e.g. {unknown[0]} (an adapter for another base model?)")
    lacking = sorted(set(expected) - set(state))
    if lacking:
        raise AdapterError(f"{where}: {ADAPTER_WEIGHTS} lacks {len(lacking)} tensor(s), e.g. {lacking[0]}")
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != shape:
            raise AdapterError(f"{where}: {key} is {list(got)} but this model needs {list(shape)} (rank {r}; an "
                               "adapter for another base model?)")
        if not state[key].is_floating_point() or not bool(torch.isfinite(state[key]).all()):
            raise AdapterError(f"{where}: {key} is not a finite floating-point tensor")
    return targets


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 activate: bool = True) -> "LoraConfig":
    """Check an adapter directory against the model, inject it as `name` and load its weights (cast to the
    dtype and device of the layers they adapt). Activates it, or keeps the active adapter (`activate=False`)."""
    config, state = read_adapter(directory)
    config.target_modules = set(check_adapter(model, config, state, str(directory)))  # peft's suffixes resolved
    config.init_lora_weights = True  # the weights are overwritten below; skip any costlier initialisation
    before = active_adapter(model) if adapter_names(model) else None
    add_adapter(model, config, name)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for key, tensor in state.items():
            module, _, rest = key[len(PEFT_PREFIX):].rpartition(".lora_")
            part = "lora_" + rest.split(".")[0]
            target = getattr(layers[module], part)[name].weight
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    set_active(model, name if activate else before)
    return config


@contextlib.contextmanager
def using(model: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block adapter `name` (None: the base model) is the active one; the previous choice afterwards."""
    before = active_adapter(model)
    set_active(model, name)
    try:
        yield
    finally:
        set_active(model, before)


# ---- the pipeline's adapter methods -----------------------------------------------------------------------------


class PipelineAdapters:
    """LoRA adapter methods of the `Cheers` pipeline (mixed into `cheers.pipeline.Cheers`): several adapters may
    be loaded, one (or none: the base model) is active at a time. A compiled pipeline (`compile=True`) keeps the
    adapter it was compiled with: its graphs do not re-check the model's modules between calls."""

    model: nn.Module

    def _adapters_switchable(self, what: str) -> None:
        head = getattr(self, "head", None)
        if head is not None and getattr(head, "compiled", False):
            raise AdapterError(f"{what}: this pipeline is compiled and keeps its adapter; load adapters before "
                               "compiling (from_pretrained(..., adapter=..., compile=True))")

    def load_adapter(self, name_or_path: str | os.PathLike, name: str = "default", activate: bool = True,
                     revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                     local_files_only: bool = False, token: str | bool | None = None) -> str:
        """Load a PEFT LoRA adapter (a directory or a Hub repo id holding adapter_config.json +
        adapter_model.safetensors) under `name`, checked against this model; it becomes the active adapter
        unless `activate=False`. Returns the name."""
        from cheers.hub import resolve_adapter_dir

        self._adapters_switchable("load_adapter")
        path = resolve_adapter_dir(name_or_path, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, token=token)
        load_adapter(self.model, path, name, activate=activate)
        return name

    def set_adapter(self, name: str | None) -> None:
        """Run with adapter `name` from now on, or with the base model (None)."""
        self._adapters_switchable("set_adapter")
        set_active(self.model, name)

    @property
    def adapters(self) -> list[str]:
        """The names of the loaded adapters."""
        return adapter_names(self.model)

    @property
    def active_adapter(self) -> str | None:
        return active_adapter(self.model) if self.adapters else None

    def using_adapter(self, name: str | None) -> contextlib.AbstractContextManager:
        """`with pipe.using_adapter(name): ...` runs the block with adapter `name` (None: the base model)."""
        self._adapters_switchable("using_adapter")
        return using(self.model, name)

    def merge_adapter(self, name: str | None = None) -> None:
        """Fold adapter `name` (default: the active one) into the weights and drop every adapter: the model is a
        plain Cheers model again (what `save_pretrained` writes)."""
        if name is not None and name not in self.adapters:
            raise AdapterError(f"no adapter named '{name}' (loaded: {', '.join(self.adapters) or 'none'})")
        merge_and_unload(self.model, name)

    def _require_no_adapters(self, what: str) -> None:
        if self.adapters:
            raise AdapterError(f"{what}: adapters are loaded ({', '.join(self.adapters)}); merge one first "
                               "(merge_adapter) or save from a pipeline without adapters")

