"""LoRA runs of the flow stage (`lora:` in a training config): peft adapters on a frozen base, exported in PEFT's
format.

The adapters are injected before the model is wrapped (DDP / FSDP2), so every strategy trains the same
`lora_A` / `lora_B` parameters; training checkpoints hold only them and their AdamW state (the base comes from
`model.init` again on `--resume`). The export writes `<output_dir>/adapter` (and `adapter_ema` with an EMA), plus
the merged official-format `export/` when `lora.export_merged` is set.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cheers.adapters import (
    AdapterError,
    adapter_state,
    add_adapter,
    lora_layers,
    make_config,
    merged_state_dict,
    resolve_targets,
    save_adapter,
)
from cheers.train import ckpt as ckpt_io
from cheers.train.distributed import DistInfo, barrier, broadcast_object
from cheers.train.settings import TrainConfig, TrainConfigError

if TYPE_CHECKING:
    from peft import LoraConfig

    from cheers.train.run import RunBase

ADAPTER_NAME = "default"


def initial_adapter(base: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The adapter's starting values, the same on every rank and whether or not the model is materialized yet
    (FSDP2 loads an official directory into a model built on the meta device): A ~ U(-1/sqrt(in), 1/sqrt(in)),
    peft's default (kaiming-uniform with a = sqrt(5)), drawn from a generator of its own in layer order; B = 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in lora_layers(base):
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        bound = a.shape[1] ** -0.5
        out[f"{name}.lora_A.{ADAPTER_NAME}.weight"] = torch.empty(a.shape).uniform_(-bound, bound, generator=g)
        out[f"{name}.lora_B.{ADAPTER_NAME}.weight"] = torch.zeros(b.shape)
    return out


def attach_lora(base: nn.Module, cfg: TrainConfig) -> tuple["LoraConfig", dict[str, torch.Tensor]]:
    """Inject the run's adapter into the (unwrapped, float32) model; afterwards only the adapter trains. Returns
    the peft config and the adapter's starting values (already in place unless the model is on the meta device,
    where the sharded load puts them)."""
    lo = cfg.lora
    try:
        targets = resolve_targets(base, lo.targets, lo.exclude)
        config = make_config(targets, lo.rank, lo.alpha, lo.dropout, lo.rslora, base=cfg.model.init)
        add_adapter(base, config, ADAPTER_NAME, trainable=True)
    except AdapterError as err:
        raise TrainConfigError(f"lora: {err}") from None
    base.train()  # the injected dropout layers follow the model's mode
    init = initial_adapter(base, cfg.seed)
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, value in init.items():
            if not params[name].is_meta:
                params[name].copy_(value)
    return config, init


def _adapter_tensors(model: nn.Module, base: nn.Module, info: DistInfo):
    """(name, tensor) pairs of the trainable parameters, consolidated on rank 0 (None elsewhere). Collective."""
    if not info.distributed:
        return list(base.named_parameters())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=True))
    return list(sd.items()) if info.is_main else None


def write_adapter(model: nn.Module, base: nn.Module, out_dir: Path, info: DistInfo, config: "LoraConfig") -> Path | None:
    """The run's adapter in PEFT's format at `out_dir` (staged in `<out_dir>.tmp`, then swapped in). Collective."""
    named = _adapter_tensors(model, base, info)
    result = None
    if info.is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(tmp, config, adapter_state(named, ADAPTER_NAME))
        ckpt_io._replace_dir(tmp, out_dir)
        result = out_dir
    barrier(info)
    return broadcast_object(result, info)


def export_lora(run: "RunBase") -> Path:
    """The end-of-run export of a LoRA run: adapter/ (and adapter_ema/), merged export/ if asked. Collective."""
    config = run.lora_config
    merged = run.cfg.lora.export_merged

    def one(suffix: str, weights: str) -> Path:
        path = write_adapter(run.model, run.base, run.out / f"adapter{suffix}", run.info, config)
        run.log.event("export", step=run.step, path=str(path), weights=weights, format="peft")
        if merged:
            full = ckpt_io.export_model(run.model, run.base, run.out / f"export{suffix}", run.info, run.tokenizer,
                                        state_fn=lambda sd: merged_state_dict(sd, config, ADAPTER_NAME))
            run.log.event("export", step=run.step, path=str(full), weights=weights, format="merged")
        return path

    path = one("", "plain")
    if run.ema is not None and run.cfg.ema.export:
        with run.ema.swapped_in():
            one("_ema", "ema")
    return path
