"""What every training stage shares: processes, model set-up, optimizer step, the step loop, checkpoints, export.

`RunBase` is the base of the stage trainers (`cheers.train.flow_stage`, `vae_stage`, `vision_stage`; the stage kind
picks one in `cheers.train.engine`). A stage builds its model and feed in `__init__` and ends it with `_start`;
its `train_step` does one optimizer step (forward/backward, then `optimizer_step`: clipping, the non-finite check,
AdamW, LR schedule, EMA); `timed_steps` drives the steps and `fit_plain` adds logging, the nan policy,
checkpoints and the final export for stages whose steps return a flat dict of metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cheers.checkpoint import load_model
from cheers.config import CheersConfig, preset
from cheers.model.cheers import CheersModel
from cheers.tokenizer import CheersTokenizer
from cheers.train import ckpt as ckpt_io
from cheers.train.distributed import DistInfo, barrier, is_fsdp, setup
from cheers.train.ema import WeightEMA
from cheers.train.metrics import MetricLogger
from cheers.train.optim import LRSchedule, build_optimizer
from cheers.train.settings import TrainConfig, TrainConfigError, dump_config


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite (nan_policy=error)."""

    def __init__(self, step: int, detail: str):
        self.step = step
        super().__init__(
            f"non-finite loss at step {step}: {detail}. Training stopped (nan_policy=error); lower optim.lr, "
            f"check the data of this step, or set nan_policy=skip to drop such steps."
        )


def grad_sync_context(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradient synchronisation over ranks on (`sync`, the last micro-batch of a step) or off (DDP / FSDP2)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_gradients(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global L2 norm of the gradients (across ranks and shards), clipped to `max_norm` when given."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    limit = float(max_norm) if max_norm else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(grads, limit, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---- the run ----------------------------------------------------------------------------------------------------


def load_tokenizer(cfg: TrainConfig, required: bool = True) -> CheersTokenizer | None:
    """The run's tokenizer: model.tokenizer, data.tokenizer, or the one beside model.init (None if not
    `required` and there is none)."""
    if cfg.model.init and not Path(cfg.model.init).exists():
        raise TrainConfigError(f"model.init {cfg.model.init}: no such directory (an earlier stage's export or run)")
    candidates = [cfg.model.tokenizer, cfg.data.tokenizer]
    if cfg.model.init:
        init = Path(cfg.model.init)
        step = ckpt_io.resolve_training_checkpoint(init)
        candidates += [str(step / "tokenizer")] if step is not None else []
        candidates += [str(init), str(init / "tokenizer")]
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        if (p / "tokenizer.json").is_file() or (p / "vocab.json").is_file():
            return CheersTokenizer.from_dir(p)
        if c in (cfg.model.tokenizer, cfg.data.tokenizer):
            raise TrainConfigError(f"tokenizer directory {p} has no tokenizer.json (or vocab.json + merges.txt)")
    if required:
        raise TrainConfigError(
            "no tokenizer: set model.tokenizer (a directory with tokenizer.json), or start from a model directory "
            "that contains one"
        )
    return None


def use_channels_last(cfg: TrainConfig, info: DistInfo) -> bool:
    """Channels-last convolution weights (faster oneDNN convolutions on CPU). FSDP2 cannot shard non-contiguous
    parameters, so it is off there."""
    cl = cfg.model.channels_last
    if info.strategy == "fsdp2" and info.distributed:
        if cl == "true":
            raise TrainConfigError("model.channels_last=true is not supported with FSDP2 (non-contiguous parameters)")
        return False
    return cl == "true" or (cl == "auto" and info.device.type == "cpu")


def init_weights(model: nn.Module, std: float) -> None:
    """From-scratch initialisation: N(0, std) for every Linear and Embedding weight, zero biases. Layers the model
    deliberately initialises to zero (adaLN modulation, the last gate layer) stay zero; convolutions and norms keep
    their defaults. (PyTorch's default N(0, 1) embedding, tied to the output head, gives initial logits of std
    ~sqrt(d), i.e. a CE far above ln(vocab).)"""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                if not bool(mod.weight.any()):
                    continue
                nn.init.normal_(mod.weight, 0.0, std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, std)


def sharded_init(cfg: TrainConfig, info: DistInfo) -> Path | None:
    """The official model directory FSDP2 loads shard by shard (after wrapping), or None (the model is loaded
    whole by `build_model`)."""
    if not (cfg.model.init and info.distributed and info.strategy == "fsdp2"):
        return None
    p = Path(cfg.model.init)
    if (p / "config.json").is_file() and ckpt_io.resolve_training_checkpoint(p) is None:
        return p
    return None


def build_model(cfg: TrainConfig, tokenizer, info: DistInfo) -> tuple[nn.Module, str]:
    """The CheersModel to train (float32, on the run's device) and a description of where it came from."""
    torch.manual_seed(cfg.seed)  # identical from-scratch init on every rank
    init = cfg.model.init
    if init:
        p = Path(init)
        step = ckpt_io.resolve_training_checkpoint(p)
        if sharded_init(cfg, info) is not None:
            with torch.device("meta"):  # `distributed.wrap` shards it, then each rank loads its own shards
                model = CheersModel(CheersConfig.from_json_file(p / "config.json"))
            origin = f"official model directory {p} (sharded load per rank)"
        elif (p / "config.json").is_file() and step is None:
            model = load_model(p)
            origin = f"official model directory {p}"
        elif step is not None:
            model = ckpt_io.load_checkpoint_model(step)
            origin = f"training checkpoint {step} (weights only)"
        else:
            raise TrainConfigError(f"model.init {p}: neither a model directory (config.json) nor a training checkpoint")
    else:
        mcfg = preset(cfg.model.preset)
        if tokenizer is not None:
            mcfg.tokens = tokenizer.token_ids
            if cfg.model.vocab_size is None and tokenizer.vocab_size > mcfg.text.vocab_size:
                raise TrainConfigError(
                    f"tokenizer has {tokenizer.vocab_size} tokens but preset {cfg.model.preset} has a vocabulary of "
                    f"{mcfg.text.vocab_size}; set model.vocab_size"
                )
        if cfg.model.vocab_size is not None:
            mcfg.text.vocab_size = int(cfg.model.vocab_size)
        model = CheersModel(mcfg.validate())
        if cfg.model.init_std:
            init_weights(model, cfg.model.init_std)
        origin = f"preset {cfg.model.preset} (random init, seed {cfg.seed})"
    if tokenizer is not None:
        mt, tt = model.config.tokens, tokenizer.token_ids
        if dataclasses.asdict(mt) != dataclasses.asdict(tt):
            raise TrainConfigError(f"tokenizer special ids {tt} differ from the model's {mt}")
        if tokenizer.vocab_size > model.config.text.vocab_size:
            raise TrainConfigError(
                f"tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary only {model.config.text.vocab_size}"
            )
    if cfg.model.high_frequency_gate is not None:
        model.config.head.high_frequency_gate = bool(cfg.model.high_frequency_gate)
        model.model.hi_gate.enabled = bool(cfg.model.high_frequency_gate)
        origin += f", high-frequency gate {'on' if cfg.model.high_frequency_gate else 'OFF (ablation)'}"
    if not model.lm_head.weight.is_meta:
        model = model.float().to(info.device)
    if use_channels_last(cfg, info):
        # Only the trained convolution stack: the frozen VAE encoder stays contiguous. On a constant picture
        # (the black dummy image) GroupNorm divides by ~sqrt(eps), so rounding differences of the memory format
        # or of the thread count are magnified a thousand-fold in that latent; the contiguous encoder gives the
        # same latents for any number of threads, which keeps runs split over different process counts equal.
        model.model.vae_decoder_projector.to(memory_format=torch.channels_last)
        if cfg.kind == "vae":
            model.model.vae_model.to(memory_format=torch.channels_last)
    model.train()
    return model, origin


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    m = model.model
    for mod in (m.language_model, m.vision_representation, m.gen_projector, m.hi_projector,
                m.vae_decoder_projector.decoder, m.vae_model.decoder):
        mod.gradient_checkpointing = bool(on)


class RunBase:
    """What every stage shares: processes, output directory, model, optimizer, log, checkpoints, export."""

    kind = "base"

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.info = setup(cfg.distributed.strategy, cfg.distributed.backend, cfg.device)
        self._threads_before = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "ckpt"
        latest = ckpt_io.find_latest(self.ckpt_dir)
        if latest is not None and not resume:
            raise TrainConfigError(
                f"{self.out} already holds checkpoints (latest {latest.name}); pass --resume to continue, or choose "
                "another output_dir"
            )
        self.resume_from = latest if resume else None
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(self.info)
        self.step = 0
        self.ema = None  # set by _setup_optimizer when ema.decay > 0
        self.stop_at = cfg.steps  # where this run stops (set by timed_steps)
        self.counters = {"nan_skipped_steps": 0, "bad_samples": 0, "samples": 0, "tokens": 0}
        self.log = MetricLogger(self.out, enabled=self.info.is_main, tensorboard=cfg.log.tensorboard,
                                progress=cfg.log.progress, total=cfg.steps)

    def nan_policy(self, finite: bool, bad_run: int, detail: str) -> int:
        """Apply `nan_policy` to one finished step; returns the new count of non-finite steps in a row. A skipped
        step never reached the optimizer (the caller's step already checked before stepping)."""
        if finite:
            return 0
        cfg = self.cfg
        self.log.event("nonfinite", step=self.step, detail=detail, policy=cfg.nan_policy)
        if cfg.nan_policy == "error":
            raise NonFiniteLossError(self.step, detail)
        self.counters["nan_skipped_steps"] += 1
        bad_run += 1
        if bad_run > cfg.max_nan_skips:
            raise NonFiniteLossError(self.step, f"{bad_run} non-finite steps in a row; {detail}")
        return bad_run

    def _setup_optimizer(self, module: nn.Module) -> None:
        """AdamW over `module`'s trainable parameters and the run's LR schedule."""
        self.optimizer = build_optimizer(module, self.cfg.optim)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.schedule = LRSchedule.for_run(self.optimizer, self.cfg)
        if self.cfg.ema.decay > 0:
            # names of the unwrapped model: the same under every strategy, so checkpoints stay portable
            self.ema = WeightEMA([(n, p) for n, p in self.base.named_parameters() if p.requires_grad],
                                 self.cfg.ema.decay, self.cfg.ema.start)

    def _start(self, origin: str, **fields: Any) -> None:
        """Log the start event, keep the resolved config beside the run and resume if asked: the last step of
        every stage's set-up (the subclass has built its model, optimizer, schedule and feed by now)."""
        cfg = self.cfg
        self.log.event("start", stage=cfg.stage, kind=self.kind, model=origin, world_size=self.info.world_size,
                       strategy=self.info.strategy, global_batch=cfg.global_batch_size(self.info.world_size),
                       trainable_params=sum(p.numel() for p in self.params),
                       total_params=sum(p.numel() for p in self.base.parameters()),
                       resume=str(self.resume_from or ""), **fields)
        if self.info.is_main:
            dump_config(cfg, self.out / "config.yaml")
        if self.resume_from is not None:
            self.load(self.resume_from)

    def optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip, then step at this step's learning rate unless the loss or gradient norm is not finite (a skipped
        step never reaches the weights); gradients are cleared either way. Returns (grad norm, finite)."""
        grad_norm = clip_gradients(self.params, self.cfg.optim.grad_clip)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.schedule.step_count = self.step
            self.schedule.apply()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    # -- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "world_size": self.info.world_size,
            "stage": self.cfg.stage,
            "counters": dict(self.counters),
            "rng": ckpt_io.rng_state(),
            "feed": self.feed.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def restore_trainer_state(self, state: dict[str, Any]) -> None:
        if state.get("world_size") != self.info.world_size:
            raise ckpt_io.TrainCheckpointError(
                f"checkpoint written by {state.get('world_size')} process(es), this run has {self.info.world_size}"
            )
        self.step = int(state["step"])
        self.counters.update(state.get("counters", {}))
        ckpt_io.set_rng_state(state["rng"])
        self.feed.load_state_dict(state["feed"])
        self.schedule.load_state_dict(state["schedule"])

    def _side_files(self, tmp: Path) -> None:
        self.base.config.save_json(tmp / "config.json")
        dump_config(self.cfg, tmp / "train_config.yaml")
        if self.tokenizer is not None:
            self.tokenizer.save(tmp / "tokenizer")

    def save(self) -> Path:
        dbg = self.cfg.debug
        path = ckpt_io.save_checkpoint(
            self.ckpt_dir, self.step, self.model, self.optimizer, self.trainer_state(), self.info,
            write_files=self._side_files, keep=self.cfg.ckpt.keep,
            pause_before_commit=dbg.ckpt_pause_seconds
            if dbg.ckpt_pause_at_step is None or dbg.ckpt_pause_at_step == self.step else 0.0,
            on_staged=lambda p: self.log.event("checkpoint_staged", step=self.step, path=str(p)),
            ema=self.ema.state_dict() if self.ema is not None else None, frozen=self.cfg.lora is None,
        )
        self.log.event("checkpoint", step=self.step, path=str(path))
        return path

    def load(self, path: Path) -> None:
        with_ema = self.ema is not None and ckpt_io.has_ema(path)
        state = ckpt_io.load_checkpoint(path, self.model, self.optimizer, self.info,
                                        ema=self.ema.state_dict() if with_ema else None, frozen=self.cfg.lora is None)
        self.restore_trainer_state(state)
        self.log.event("resume", step=self.step, path=str(path))
        if self.ema is not None and not with_ema:
            self.ema.reset_to_weights()  # EMA switched on for a run whose checkpoint has none: start it here
            self.log.event("ema_start", step=self.step, detail="the checkpoint has no EMA; averaging from here")

    def export(self) -> Path | None:
        if self.cfg.lora is not None:
            from cheers.train.lora import export_lora

            return export_lora(self)
        path = ckpt_io.export_model(self.model, self.base, self.out / "export", self.info, self.tokenizer)
        self.log.event("export", step=self.step, path=str(path))
        if self.ema is not None and self.cfg.ema.export:
            with self.ema.swapped_in():
                ema_path = ckpt_io.export_model(self.model, self.base, self.out / "export_ema", self.info,
                                                self.tokenizer)
            self.log.event("export", step=self.step, path=str(ema_path), weights="ema")
        return path

    def timed_steps(self) -> Iterator[tuple[Any, float]]:
        """Run `train_step` until the stage's last step (or `debug.max_steps_this_run` steps from here), yielding
        each step's result and wall time; the caller logs, checkpoints and may stop early."""
        cfg = self.cfg
        stop_at = cfg.steps
        if cfg.debug.max_steps_this_run is not None:
            stop_at = min(cfg.steps, self.step + int(cfg.debug.max_steps_this_run))
        self.stop_at = stop_at
        self.log.progress_to(self.step)
        while self.step < stop_at:
            t0 = time.perf_counter()
            res = self.train_step()
            self.step += 1
            yield res, time.perf_counter() - t0
            if cfg.debug.sleep_per_step:
                time.sleep(cfg.debug.sleep_per_step)

    def should_checkpoint(self) -> bool:
        """At every interval and at the last step of this run (`stop_at` <= the stage's last step)."""
        iv = self.cfg.ckpt.interval
        return (iv > 0 and self.step % iv == 0) or self.step == self.stop_at

    def close(self) -> None:
        self.log.close()
        torch.set_num_threads(self._threads_before)

    def fit_plain(self, finalize: Callable[[], None] | None = None) -> dict[str, Any]:
        """Step loop of the stages whose `train_step` returns a flat dict (loss, grad_norm, finite, images, ...):
        nan policy, logging, checkpoints; at the stage's last step `finalize()` (if given) runs before the final
        checkpoint, then the export. Returns the last logged metrics."""
        cfg = self.cfg
        last: dict[str, Any] = {}
        bad_run = 0
        for res, dt in self.timed_steps():
            self.counters["samples"] += res["images"]
            bad_run = self.nan_policy(res["finite"], bad_run, f"loss={res['loss']}, grad_norm={res['grad_norm']}")
            if self.step % cfg.log.interval == 0 or self.step == cfg.steps:
                last = {"step": self.step, **{k: v for k, v in res.items() if k != "finite"},
                        "lr": self.schedule.lr(self.step - 1), "samples_per_s": res["images"] / dt, "step_time_s": dt}
                self.log.step(last)
            self.log.progress_to(self.step, res["loss"])
            if self.step == cfg.steps and finalize is not None:
                break  # the final checkpoint comes after finalize()
            if self.should_checkpoint():
                self.save()
        if self.step >= cfg.steps:
            if finalize is not None:
                finalize()
                self.save()
            if cfg.ckpt.export_final:
                self.export()
        self.log.event("end", step=self.step, counters=self.counters)
        return last
