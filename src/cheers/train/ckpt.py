"""Training checkpoints (torch.distributed.checkpoint) and the export of an official-format model directory.

Layout under `<output_dir>/ckpt/`::

    step_N/                     a complete checkpoint
        .metadata, *.distcp     DCP: {"model": ..., "optim": ...} from get_state_dict (single process, DDP, FSDP2)
        trainer_state_rank{r}.json   step, scheduler, data position, RNG states, counters (one per rank)
        config.json             the model config (official layout, so the checkpoint can seed a later stage)
        train_config.yaml       the resolved training config
        tokenizer/              the tokenizer (tokenizer.json + tokenizer_config.json)
    latest                      one line: the name of the newest complete step directory

Writing is atomic: everything goes to `step_N.tmp/`, which is renamed to `step_N/` only once every rank has
finished; then `latest` is replaced through a temporary file. A save interrupted at any point leaves the previous
`latest` and its directory untouched; stale `*.tmp` directories are removed by the next save. DCP reshards on load,
so a checkpoint written by FSDP2 loads into DDP or a single process and vice versa.

Nothing here is unpickled: DCP stores tensors and the per-rank trainer state is JSON.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from cheers.train.distributed import DistInfo, barrier, broadcast_object

LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d+)$")


class TrainCheckpointError(RuntimeError):
    """A training checkpoint is missing, incomplete or does not fit the run."""


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place. An existing one is renamed aside first and dropped only after
    the new one is in place, so a crash leaves either the old or the new copy, never neither."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def _single_process_ok():
    """DCP warns that it 'assumes' a single process even when told so (no_dist=True); that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)")
        yield


# ---- RNG state <-> JSON -----------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state(extra_generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "generators": {k: _b64(g.get_state()) for k, g in (extra_generators or {}).items()},
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any], extra_generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    for k, g in (extra_generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(_unb64(state["generators"][k]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- finding checkpoints ----------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def is_complete(path: Path, world_size: int | None = None) -> bool:
    if not path.is_dir() or not (path / ".metadata").is_file():
        return False
    states = list(path.glob("trainer_state_rank*.json"))
    if not states:
        return False
    return world_size is None or len(states) >= world_size


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = STEP_RE.match(p.name)
            if m and is_complete(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The directory `latest` names if it is complete, else the newest complete `step_N` (None if none)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        cand = ckpt_dir / name
        if name and is_complete(cand):
            return cand
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def resolve_training_checkpoint(path: str | os.PathLike) -> Path | None:
    """A step directory, a `ckpt/` directory or a run directory -> the complete step directory (or None)."""
    p = Path(path)
    if is_complete(p):
        return p
    for base in (p, p / "ckpt"):
        if (base / LATEST).is_file() or list_checkpoints(base):
            found = find_latest(base)
            if found is not None:
                return found
    return None


# ---- saving -----------------------------------------------------------------------------------------------------


def _without_frozen(model: nn.Module, model_sd: dict[str, Any]) -> dict[str, Any]:
    """The state dict without frozen parameters under any of their names (torch's `ignore_frozen_params` keeps
    the second name of a tied weight, e.g. `lm_head.weight`); buffers stay."""
    from cheers.train.distributed import unwrap

    frozen = {n for n, p in unwrap(model).named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_sd.items() if k not in frozen}



def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    info: DistInfo,
    write_files: Callable[[Path], None] | None = None,
    keep: int = 0,
    pause_before_commit: float = 0.0,
    on_staged: Callable[[Path], None] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    frozen: bool = True,
) -> Path:
    """Save model + optimizer (DCP) and this rank's `trainer_state`, atomically. Collective: every rank calls it.

    `write_files(tmp_dir)` (rank 0) adds side files (config, tokenizer). `ema` (parameter name -> averaged weight)
    is saved under the key "ema". `frozen=False` leaves the frozen parameters out (a LoRA run: its base comes
    from `model.init` on resume, only the adapters are saved). `keep` > 0 prunes older step
    directories. `pause_before_commit` / `on_staged` exist for crash tests (a kill between staging and commit).
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / (final.name + ".tmp")
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if not frozen:
        model_sd = _without_frozen(model, model_sd)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not info.distributed)
    _write_json(tmp / f"trainer_state_rank{info.rank}.json", trainer_state)
    if info.is_main and write_files is not None:
        write_files(tmp)
    barrier(info)
    if info.is_main:
        if on_staged is not None:
            on_staged(tmp)
        if pause_before_commit > 0:
            time.sleep(pause_before_commit)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) swaps the old copy out
        _fsync_dir(ckpt_dir)
        pointer_tmp = ckpt_dir / (LATEST + ".tmp")
        with open(pointer_tmp, "w", encoding="utf-8") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, ckpt_dir / LATEST)
        _fsync_dir(ckpt_dir)
        if keep > 0:
            for s, p in list_checkpoints(ckpt_dir)[:-keep]:
                if p != final:
                    shutil.rmtree(p, ignore_errors=True)
    barrier(info)
    return final


# ---- loading ----------------------------------------------------------------------------------------------------


def saved_keys(path: str | os.PathLike) -> set[str]:
    """The flattened tensor keys of a training checkpoint ("model.<fqn>", "optim.state.<fqn>.<name>", "ema.<fqn>")."""
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def has_ema(path: str | os.PathLike) -> bool:
    return any(k.startswith("ema.") for k in saved_keys(path))


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo,
    ema: dict[str, torch.Tensor] | None = None, frozen: bool = True,
) -> dict[str, Any]:
    """Load model + optimizer into the (wrapped) model and return this rank's trainer state. `ema` (parameter
    name -> tensor, e.g. `WeightEMA.state_dict()`) is filled in place from the checkpoint's averaged weights; the
    caller checks `has_ema` first. `frozen=False`: the checkpoint holds only the trainable parameters (as
    `save_checkpoint(frozen=False)` writes them)."""
    path = Path(path)
    state_file = path / f"trainer_state_rank{info.rank}.json"
    if not state_file.is_file():
        n = len(list(path.glob("trainer_state_rank*.json")))
        raise TrainCheckpointError(
            f"{path}: no trainer state for rank {info.rank} (the checkpoint was written by {n} process(es), "
            f"this run has {info.world_size}); resume with the same number of processes"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if not frozen:
        model_sd = _without_frozen(model, model_sd)
    # Trainable parameters that never received a gradient before the save (e.g. a module no batch used) have no
    # AdamW state in the checkpoint; get_state_dict just created zero state for them. Drop those entries so the
    # loaded optimizer matches the saved one exactly (AdamW skips parameters without gradient either way).
    saved = saved_keys(path)
    absent = [k for k in model_sd if f"model.{k}" not in saved]
    if absent:
        raise TrainCheckpointError(f"{path}: no weights for {len(absent)} model tensor(s) of this run, e.g. "
                                   f"{absent[0]} (written by a run with other trainable parameters or lora settings)")
    for fqn in list(optim_sd.get("state", {})):
        if not any(k.startswith(f"optim.state.{fqn}.") for k in saved):
            del optim_sd["state"][fqn]
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        missing = [n for n in ema if f"ema.{n}" not in saved]
        if missing:
            raise TrainCheckpointError(f"{path}: no averaged (EMA) weights for {len(missing)} trainable "
                                       f"parameter(s), e.g. {missing[0]}; the checkpoint trained other parameters")
        state["ema"] = ema
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path), no_dist=not info.distributed)
    # dcp.load above already required every model tensor to be present; strict=False only lets the optimizer
    # load without state for the parameters dropped above.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    with open(state_file, encoding="utf-8") as f:
        return json.load(f)


def _load_in_place(state: dict[str, Any], path: str | os.PathLike) -> None:
    """dcp.load of part of a checkpoint outside a run's own save/load (collective only if a process group exists)."""
    import torch.distributed as dist

    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path), no_dist=not (dist.is_available() and dist.is_initialized()))


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Model weights only (a later stage starting from an earlier stage's training checkpoint)."""
    state = {"model": get_model_state_dict(model)}
    _load_in_place(state, path)
    set_model_state_dict(model, state["model"])


def load_checkpoint_model(step: str | os.PathLike, ema: bool = False) -> nn.Module:
    """A `CheersModel` built from a training checkpoint's `config.json` with its weights (train mode, as built);
    with `ema`, the trained parameters hold the checkpoint's averaged weights instead."""
    from cheers.config import CheersConfig
    from cheers.model.cheers import CheersModel
    from cheers.train.settings import read_raw

    train_cfg = Path(step) / "train_config.yaml"
    raw = read_raw(train_cfg) if train_cfg.is_file() else {}
    if raw.get("kind") == "vision":
        raise TrainCheckpointError(f"{step} is a vision-pretraining checkpoint (its weights hold a text tower); start "
                                   f"from that run's export/ directory instead")
    if raw.get("lora"):
        raise TrainCheckpointError(f"{step} is a LoRA run's checkpoint (adapters only); start from its base merged "
                                   "with the run's adapter: cheers merge-adapter BASE RUN/adapter OUT")
    model = CheersModel(CheersConfig.from_json_file(Path(step) / "config.json"))
    load_model_weights(step, model)
    if ema:
        names = sorted(k[len("ema."):] for k in saved_keys(step) if k.startswith("ema."))
        if not names:
            raise TrainCheckpointError(f"{step} holds no averaged (EMA) weights: the run had ema.decay = 0")
        params = dict(model.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise TrainCheckpointError(f"{step}: EMA entry {unknown[0]} is not a parameter of the model")
        _load_in_place({"ema": {n: params[n].data for n in names}}, step)
        model.tie_weights()
    return model


# ---- export -----------------------------------------------------------------------------------------------------


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The consolidated state dict on rank 0 (None elsewhere). Collective for DDP/FSDP2."""
    if not info.distributed:
        return None
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else None


def export_model(model: nn.Module, base: nn.Module, out_dir: str | os.PathLike, info: DistInfo,
                 tokenizer: Any = None,
                 state_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Path | None:
    """Write an official-format model directory (config.json + safetensors) plus the tokenizer, atomically
    (staged in `<out_dir>.tmp`, then swapped in). `base` is the unwrapped model. `state_fn` maps the model's
    full state dict to the official one that is written (e.g. adapters merged in). Collective."""
    from cheers.checkpoint import save_model
    from cheers.model.cheers import CheersModel

    out_dir = Path(out_dir)
    full = full_model_state(model, info)
    result = None
    if info.is_main:
        if state_fn is not None:
            full = state_fn(full if full is not None else base.state_dict())
        if full is not None:
            with torch.device("meta"):
                target = CheersModel(base.config)
            target.to_empty(device="cpu")
            target.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
            target.tie_weights()
        else:
            target = base
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(target, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        _replace_dir(tmp, out_dir)
        result = out_dir
    barrier(info)
    return broadcast_object(result, info)
