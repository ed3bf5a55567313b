"""Training configuration: typed sections read from a stage YAML file, with `key.sub=value` overrides.

A config is one YAML mapping whose top-level keys are the fields of `TrainConfig` below; unknown keys are errors
(with a suggestion), so a typo never silently falls back to a default. Stage files shipped with the package live in
`cheers/configs/stage*.yaml` and can be named without a path (`stage1_align`). A file may start from another one
with `extends: <name or path>` (deep-merged, the child wins; lists are replaced, not merged).

Overrides use dotted paths, list items by index, and YAML values: `optim.lr=3e-4`, `data.sources.0.weight=2`,
`trainable.include=[model.gen_projector.*]`, `init=null`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
STAGE_KINDS = ("flow", "vae", "vision")  # each has its trainer in cheers.train.engine.TRAINERS


class TrainConfigError(ValueError):
    """A training config file or override is invalid; the message names the key."""


# ---- sections ---------------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    """Which network to train and where its starting weights come from."""

    preset: str | None = "cheers-tiny"  # used when `init` is empty (from-scratch training)
    vocab_size: int | None = None  # overrides the preset's vocabulary (small tokenizers); default = tokenizer size
    init: str | None = None  # official model directory (load_model) or a training checkpoint (run dir / step dir)
    tokenizer: str | None = None  # tokenizer directory; default: `init` (if it holds one), else data.tokenizer
    init_std: float | None = 0.02  # from scratch: N(0, std) for Linear/Embedding weights (zero-inits kept); null = torch defaults
    activation_checkpointing: bool = False  # recompute LLM/ViT/heads/decoder blocks in backward
    # channels-last latent-to-pixel decoder: auto = on CPU unless FSDP2. Off by default: measured ~6% slower for
    # forward + backward at 1 thread on the parity config (it helps inference-only convolutions).
    channels_last: str = "false"  # false | auto | true
    bf16_autocast: bool = True  # only ever applied on CUDA; CPU always computes in float32
    # Ablation of the paper's central claim: false cuts the gated patch-detail injection (Y = LN(S)); null keeps
    # the model's own setting. Saved into the exported config, so the ablated model samples the same way.
    high_frequency_gate: bool | None = None


@dataclass
class TrainableSection:
    """Parameter-name patterns (fnmatch by default, or `re:<regex>`), matched against `named_parameters()` names
    such as `model.gen_projector.diffusion_head_a.0.attn.q_proj.weight` (a tied weight matches under either of its
    names, e.g. `lm_head.weight`). A parameter trains when it matches one of `include` and none of `exclude`."""

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["model.vae_model.*"])


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay: list[str] = field(default_factory=lambda: ["*.bias", "*norm*", "*.bn.*", "*embed_tokens*"])
    grad_clip: float = 1.0  # max global L2 norm; 0 or null disables clipping (the norm is still logged)
    fused: bool = False  # torch's fused AdamW (CUDA only)


@dataclass
class ScheduleSection:
    kind: str = "constant"  # constant | cosine | wsd (warm-up, stable, linear decay at the end)
    warmup: float = 0.02  # < 1: fraction of `steps`; >= 1: number of steps; linear from 0
    min_lr_ratio: float = 0.0  # cosine / wsd floor as a fraction of lr
    decay: float = 0.2  # wsd only: < 1: fraction of `steps`; >= 1: number of steps of the final decay


@dataclass
class SourceSection:
    """One JSON-lines data source (official format, spec §D.3)."""

    path: str = ""
    name: str | None = None
    weight: float = 1.0  # mixing ratio (relative to the other sources)
    image_root: str | None = None  # base directory of relative image paths (default: the jsonl's directory)
    # understanding | generation | edit | text: informational (logged at start). Metrics and losses use the task
    # inferred from each sample's image placeholders, so a mixed file needs no label.
    task: str | None = None


@dataclass
class DataSection:
    sources: list[SourceSection] = field(default_factory=list)
    max_length: int = 2048  # positions after image expansion; longer samples are bad samples (never truncated)
    cfg_dropout: float = 0.2  # probability of the unconditional prompt for samples with an image to generate
    t_sampling: str = "uniform"  # uniform | logit_normal: flow time t of an image to generate (t = 0 is noise)
    t_mean: float = 0.0  # logit_normal: t = sigmoid(N(t_mean, t_std^2)); t_mean < 0 trains more near the noise
    t_std: float = 1.0
    t_uniform: float = 0.0  # logit_normal: this share of the draws is uniform on (0, 1) instead
    on_bad_sample: str = "skip"  # skip | error : malformed record, unreadable image, sample too long
    bad_image: str = "error"  # error | black : a missing or unreadable image file (black = what the reference does)
    pairing: str = "mix"  # mix (weighted per-sample draws) | alternate (equal contiguous share per source per batch)
    # on --resume, sources of this config that the checkpoint's stream lacks start from their beginning (the others
    # continue where they were); off, any change of the source list is an error. Appending keeps the others' seeds.
    add_sources_on_resume: bool = False
    tokenizer: str | None = None  # tokenizer directory (see model.tokenizer)
    resolution: int | None = None  # image side; default: the model's


@dataclass
class LatentsSection:
    """Cache of frozen-VAE latents of every image the trainer reads (stages >= 1 only)."""

    cache: bool = True
    dir: str | None = None  # on-disk cache (default: <output_dir>/latent_cache); "memory" = in-process only
    max_memory_items: int = 4096


@dataclass
class VAESection:
    """Stage 0: train the autoencoder itself (tiny presets have no pretrained VAE)."""

    loss: str = "l1"  # l1 | mse | l1+mse
    latent_reg: float = 1e-4  # weight of a small L2 penalty on the latent mean (KL-free regularisation)
    stats_images: int = 256  # training images used to measure the latent standardization statistics
    copy_to_projector: bool = True  # copy the trained decoder into model.vae_decoder_projector


@dataclass
class VisionSection:
    """Vision pretraining stage (kind: vision): SigLIP-style image-text training of a from-scratch ViT."""

    text_layers: int = 2  # transformer layers of the stage's text tower (width and heads: the ViT's)
    max_text_tokens: int = 64  # longer texts are truncated (counted in the run's counters)
    min_text_words: int = 2  # records whose describing text is shorter are passed over ("Yes", "B")
    # words that carry a text's meaning ("word" or "word=canonical"): texts with the same sorted key words are
    # positives of each other (rephrasings of templated prompts); empty = only identical texts
    key_words: list[str] = field(default_factory=list)


@dataclass
class LoRASection:
    """Low-rank adapters (peft LoRA) on a frozen base model instead of training its weights (kind flow only).

    With a `lora:` block every base parameter stays frozen and `trainable` is not read: only the adapters of the
    layers `targets` selects train. Targets are `nn.Linear` layers, by group name (llm = the LLM's attention and
    MLP projections, llm_attention, llm_mlp, flow_head, vit, projectors) or by module-name pattern (fnmatch, or
    `re:<regex>`), e.g. `model.gen_projector.diffusion_head_a.*.attn.*`. The run exports `<output_dir>/adapter`
    in PEFT's format (adapter_config.json + adapter_model.safetensors); training checkpoints hold only the
    adapters and their optimizer state."""

    rank: int = 16
    alpha: float = 32.0  # the update B @ A is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # dropout on the adapters' input
    rslora: bool = False
    targets: list[str] = field(default_factory=lambda: ["llm"])
    exclude: list[str] = field(default_factory=list)  # module-name patterns removed from the targets
    # also write <output_dir>/export: the adapter merged into the base, in the official format (a second copy of
    # the weights in memory while it is written)
    export_merged: bool = False


@dataclass
class EMASection:
    """Exponential moving average of the trainable weights (kind flow), exported beside the plain weights."""

    decay: float = 0.0  # 0 = off; otherwise the per-step decay (0.998: an average over the last ~500 steps)
    start: int = 0  # the average starts after this step (before it, it is the weights themselves)
    export: bool = True  # with decay > 0, also write <output_dir>/export_ema at the end


@dataclass
class DistributedSection:
    strategy: str = "none"  # none | ddp | fsdp2  (under torchrun; plain python runs one process)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    reshard_after_forward: bool = True  # fsdp2


@dataclass
class LogSection:
    interval: int = 10  # steps between jsonl/console records (per-task losses are computed on these steps only)
    per_task: bool = True
    tensorboard: bool = False  # used only if the tensorboard package is importable
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class CkptSection:
    interval: int = 500  # steps between checkpoints (0 = only at the end)
    keep: int = 2  # most recent step_N directories kept (0 = keep all)
    export_final: bool = True  # write an official-format model directory at the end (<output_dir>/export)


@dataclass
class DebugSection:
    inject_nan_at_step: int | None = None  # multiply the loss of this (1-based) step by NaN (tests the nan policy)
    max_steps_this_run: int | None = None  # stop early (after checkpointing) without changing the schedule
    sleep_per_step: float = 0.0  # seconds to sleep after each step (crash tests)
    ckpt_pause_seconds: float = 0.0  # pause between staging a checkpoint and committing it (crash tests)
    ckpt_pause_at_step: int | None = None  # only pause when saving this step (None: every save)


@dataclass
class TrainConfig:
    stage: str = "custom"
    kind: str = "flow"  # flow (stages >= 1) | vae (stage 0) | vision (ViT pretraining, tiny presets)
    seed: int = 0
    steps: int = 1000
    micro_batch_size: int = 4  # per process
    grad_accum: int = 1
    output_dir: str = "runs/custom"
    nan_policy: str = "error"  # error | skip
    max_nan_skips: int = 100  # "skip": give up after this many skipped steps in a row
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch.set_num_threads (CPU)
    model: ModelSection = field(default_factory=ModelSection)
    trainable: TrainableSection = field(default_factory=TrainableSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    data: DataSection = field(default_factory=DataSection)
    latents: LatentsSection = field(default_factory=LatentsSection)
    vae: VAESection = field(default_factory=VAESection)
    vision: VisionSection = field(default_factory=VisionSection)
    ema: EMASection = field(default_factory=EMASection)
    lora: LoRASection | None = None  # null = train the base weights themselves
    distributed: DistributedSection = field(default_factory=DistributedSection)
    log: LogSection = field(default_factory=LogSection)
    ckpt: CkptSection = field(default_factory=CkptSection)
    debug: DebugSection = field(default_factory=DebugSection)

    # ---- derived --------------------------------------------------------------------------------------------
    def warmup_steps(self) -> int:
        w = self.schedule.warmup
        return int(round(w * self.steps)) if w < 1 else int(w)

    def decay_steps(self) -> int:
        d = self.schedule.decay
        return int(round(d * self.steps)) if d < 1 else int(d)

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * world_size

    def validate(self) -> "TrainConfig":
        problems = []

        def one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                problems.append(f"{key}: '{value}' is not one of {', '.join(allowed)}")

        one_of("kind", self.kind, STAGE_KINDS)
        one_of("nan_policy", self.nan_policy, ("error", "skip"))
        one_of("device", self.device, ("auto", "cpu", "cuda"))
        one_of("schedule.kind", self.schedule.kind, ("constant", "cosine", "wsd"))
        one_of("model.channels_last", self.model.channels_last, ("auto", "true", "false"))
        one_of("data.on_bad_sample", self.data.on_bad_sample, ("skip", "error"))
        one_of("data.bad_image", self.data.bad_image, ("error", "black"))
        one_of("data.pairing", self.data.pairing, ("mix", "alternate"))
        one_of("data.t_sampling", self.data.t_sampling, ("uniform", "logit_normal"))
        one_of("distributed.strategy", self.distributed.strategy, ("none", "ddp", "fsdp2"))
        one_of("distributed.backend", self.distributed.backend, ("auto", "gloo", "nccl"))
        one_of("vae.loss", self.vae.loss, ("l1", "mse", "l1+mse"))
        for key in ("steps", "micro_batch_size", "grad_accum"):
            if int(getattr(self, key)) < 1:
                problems.append(f"{key}: must be >= 1 (got {getattr(self, key)})")
        if self.optim.lr < 0:
            problems.append(f"optim.lr: must be >= 0 (got {self.optim.lr})")
        if len(self.optim.betas) != 2:
            problems.append(f"optim.betas: need two values (got {self.optim.betas})")
        if self.schedule.warmup < 0:
            problems.append(f"schedule.warmup: must be >= 0 (got {self.schedule.warmup})")
        if not 0.0 <= self.data.cfg_dropout <= 1.0:
            problems.append(f"data.cfg_dropout: must be in [0, 1] (got {self.data.cfg_dropout})")
        if not self.data.t_std > 0:
            problems.append(f"data.t_std: must be > 0 (got {self.data.t_std})")
        if not 0.0 <= self.data.t_uniform <= 1.0:
            problems.append(f"data.t_uniform: must be in [0, 1] (got {self.data.t_uniform})")
        if self.vision.text_layers < 1 or self.vision.max_text_tokens < 1 or self.vision.min_text_words < 1:
            problems.append(f"vision: text_layers, max_text_tokens and min_text_words must be >= 1 (got {self.vision})")
        if not 0.0 <= self.ema.decay < 1.0:
            problems.append(f"ema.decay: must be in [0, 1) (got {self.ema.decay})")
        if self.ema.start < 0:
            problems.append(f"ema.start: must be >= 0 (got {self.ema.start})")
        if self.ema.decay > 0 and self.kind != "flow":
            problems.append(f"ema: only kind 'flow' keeps an average of its weights (got kind '{self.kind}')")
        if self.lora is not None:
            lo = self.lora
            if lo.rank < 1:
                problems.append(f"lora.rank: must be >= 1 (got {lo.rank})")
            if not lo.alpha > 0:
                problems.append(f"lora.alpha: must be > 0 (got {lo.alpha})")
            if not 0.0 <= lo.dropout < 1.0:
                problems.append(f"lora.dropout: must be in [0, 1) (got {lo.dropout})")
            if not lo.targets:
                problems.append("lora.targets: empty (name the layers to adapt, e.g. [llm])")
            if self.kind != "flow":
                problems.append(f"lora: only kind 'flow' trains adapters (got kind '{self.kind}')")
        if self.log.interval < 1:
            problems.append(f"log.interval: must be >= 1 (got {self.log.interval})")
        if self.ckpt.interval < 0:
            problems.append(f"ckpt.interval: must be >= 0 (got {self.ckpt.interval})")
        if not self.model.init and not self.model.preset:
            problems.append("model: give model.init (a checkpoint) or model.preset (from scratch)")
        for i, s in enumerate(self.data.sources):
            if not s.path:
                problems.append(f"data.sources.{i}.path: empty")
            if s.weight < 0:
                problems.append(f"data.sources.{i}.weight: must be >= 0 (got {s.weight})")
            if s.task is not None:
                one_of(f"data.sources.{i}.task", s.task, ("understanding", "generation", "edit", "text"))
        if problems:
            raise TrainConfigError(f"invalid training config '{self.stage}': " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- reading ----------------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _build(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, recursively and strictly."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TrainConfigError(f"{path}: unknown key{hint}; known: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    base = _unwrap_optional(tp)
    if value is None:
        if base is not tp:  # Optional
            return None
        raise TrainConfigError(f"{path}: may not be null")
    if dataclasses.is_dataclass(base):
        return _build(base, value, path)
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if base is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TrainConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if base is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if base is str:
        if isinstance(value, bool):  # YAML reads true/false as booleans; keep them as the words
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise TrainConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A file path, or the name of a packaged stage config (`stage1_align` or `stage1_align.yaml`)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    packaged = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise TrainConfigError(f"{name}: no such config file (packaged stage configs: {', '.join(packaged)})")


def _deep_merge(base: dict, child: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_raw(name: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = resolve_config_path(name)
    key = str(path.resolve())
    if key in _seen:
        raise TrainConfigError(f"{path}: 'extends' cycle ({' -> '.join(_seen + (key,))})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping")
    parent = raw.pop("extends", None)
    if parent:
        ppath = Path(parent)
        if not ppath.is_absolute() and (path.parent / ppath).is_file():
            ppath = path.parent / ppath
        raw = _deep_merge(read_raw(ppath if ppath.is_file() else parent, _seen + (key,)), raw)
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into the raw mapping; integer parts index lists."""
    if "=" not in override:
        raise TrainConfigError(f"override '{override}': expected key.sub=value")
    key, _, text = override.partition("=")
    key = key.strip()
    if not key:
        raise TrainConfigError(f"override '{override}': empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise TrainConfigError(f"override '{override}': value is not valid YAML ({err})") from None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = _index(part, node, key)
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(last, node, key, allow_append=True)
        if idx == len(node):
            node.append(value)
        else:
            node[idx] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise TrainConfigError(f"override '{override}': '{'.'.join(parts[:-1])}' is not a mapping")


def _index(part: str, node: list, key: str, allow_append: bool = False) -> int:
    if not part.isdigit():
        raise TrainConfigError(f"override '{key}': '{part}' indexes a list; use a number")
    idx = int(part)
    if idx > len(node) or (idx == len(node) and not allow_append):
        raise TrainConfigError(f"override '{key}': index {idx} out of range (list has {len(node)} items)")
    return idx


def load_config(name: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                raw: dict[str, Any] | None = None) -> TrainConfig:
    """Read a stage YAML (or start from `raw`), apply the overrides, build and validate the typed config."""
    data = read_raw(name) if name is not None else {}
    if raw:
        data = _deep_merge(data, raw)
    for ov in overrides:
        apply_override(data, ov)
    return _build(TrainConfig, data, "").validate()


def dump_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
