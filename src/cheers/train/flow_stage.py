"""Stages >= 1 (`kind: flow`): the unified model on mixed understanding / generation / edit / text batches with
`loss = CE + flow_loss_weight * MSE` (spec §D).

One optimizer step (`FlowTrainer.train_step`):
1. the global records of the step are drawn (identical on every rank) and each rank builds its slots
   (`cheers.train.feed`): micro-batches via the data pipeline's `SampleBuilder` + `collate`;
2. images become frozen-VAE latents through the latent cache (the VAE encoder does not run every step);
   per-image noise x0 is a pure function of (seed, global sample index);
3. the CE-token and image counts of the whole global batch are summed over ranks *before* any backward, and
   each micro-batch's loss is weighted by its share of them: the gradient is that of the global-batch loss
   (CE averaged over all labelled tokens, MSE over all image elements), however the batch is split over ranks
   and accumulation steps. With one process and no accumulation the loss is `model(**batch).loss` itself;
4. gradient clipping (global L2 norm), non-finite check (policy error / skip), AdamW step, LR schedule;
5. metrics (per-task CE / flow losses on log steps), checkpoints, and at the end an official-format export.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cheers import constants as C
from cheers.train.data import DataError, SampleBuilder, collate, parse_record
from cheers.train.distributed import DistInfo, all_reduce_sum, is_fsdp, unwrap, wrap
from cheers.train.feed import RecordFeed, sample_noise, slot_range
from cheers.train.latents import LatentCache, sample_image_keys, vae_fingerprint
from cheers.train.optim import select_trainable
from cheers.train.run import (
    RunBase,
    build_model,
    grad_sync_context,
    load_tokenizer,
    set_activation_checkpointing,
    sharded_init,
)
from cheers.train.settings import TrainConfig, TrainConfigError

ROW_KINDS = ("understanding", "generation", "edit", "text")
IMAGE_ROLES = ("gen_target", "edit_target", "und_image", "edit_source", "text_dummy")

# ---- batch bookkeeping ------------------------------------------------------------------------------------------


def count_ce_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     num_image_tokens: int, img_end: int) -> torch.Tensor:
    """Per-row number of next-token targets the model's loss averages over (`CheersModel.ce_targets` rules:
    targets live on the expanded sequence shifted by one; image positions and placeholders are never targets;
    an `<im_end>` right after an image is not a target). Computed from ids alone, before the forward, so that
    the normalisation of the global batch is known before any backward."""
    valid = attention_mask.bool()
    is_ph = (input_ids < 0) & valid
    needs_prefix = ~is_ph.any(1)
    lead = valid.long().argmax(1)
    width = torch.where(is_ph, torch.full_like(input_ids, num_image_tokens), torch.ones_like(input_ids))
    extra = torch.zeros_like(width)
    rows = needs_prefix.nonzero(as_tuple=True)[0]
    extra[rows, lead[rows]] = num_image_tokens
    new_pos = (width + extra).cumsum(1) - width
    labelled = labels.ge(0) & ~is_ph & new_pos.ge(1)
    prev_image = torch.zeros_like(is_ph)
    prev_image[:, 1:] = is_ph[:, :-1]
    prev_image[rows, lead[rows]] = True
    dropped = labelled & labels.eq(img_end) & prev_image
    return labelled.sum(1) - dropped.sum(1)


def row_kinds(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Index into ROW_KINDS per row: an image to generate + one to read = edit; only to generate = generation;
    only to read = understanding; none = text."""
    valid = attention_mask.bool()
    gen = ((input_ids == C.IMAGE_GEN_PLACEHOLDER) & valid).any(1)
    read = ((input_ids == C.IMAGE_PLACEHOLDER) & valid).any(1)
    kind = torch.full((input_ids.shape[0],), 3, dtype=torch.long)
    kind[read & ~gen] = 0
    kind[gen & ~read] = 1
    kind[gen & read] = 2
    return kind


def image_roles(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Index into IMAGE_ROLES per image, in the batch's image order (row by row, textual order, one dummy image
    for a row without placeholders)."""
    kinds = row_kinds(input_ids, attention_mask)
    roles = []
    for r in range(input_ids.shape[0]):
        ids = input_ids[r][attention_mask[r].bool()]
        ph = ids[ids < 0].tolist()
        if not ph:
            roles.append(4)
            continue
        edit = int(kinds[r]) == 2
        for p in ph:
            if p == C.IMAGE_GEN_PLACEHOLDER:
                roles.append(1 if edit else 0)
            else:
                roles.append(3 if edit else 2)
    return torch.tensor(roles, dtype=torch.long)


def expanded_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_image_tokens: int) -> int:
    valid = attention_mask.bool()
    n_ph = ((input_ids < 0) & valid).sum(1)
    n = valid.sum(1) + n_ph * (num_image_tokens - 1) + (n_ph == 0).long() * num_image_tokens
    return int(n.sum())


@dataclasses.dataclass
class MicroBatch:
    """One forward/backward of one rank: model inputs, flow noise, and its share of the global counts."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, labels, t, and pixel_values or latents
    x0: torch.Tensor
    n_ce: int
    n_img: int
    n_samples: int
    n_tokens: int
    weight: float = 1.0  # 0: a filler batch of a rank whose slots were all bad (keeps collectives in step)

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], x0: torch.Tensor, num_image_tokens: int, img_end: int,
                   latents: torch.Tensor | None = None, weight: float = 1.0) -> "MicroBatch":
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "t")}
        if latents is not None:
            inputs["latents"] = latents
        else:
            inputs["pixel_values"] = batch["pixel_values"]
        n_ce = int(count_ce_targets(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                    num_image_tokens, img_end).sum())
        live = weight > 0
        return cls(
            inputs=inputs,
            x0=x0,
            n_ce=n_ce if live else 0,
            n_img=int(batch["t"].numel()) if live else 0,
            n_samples=int(batch["input_ids"].shape[0]) if live else 0,
            n_tokens=expanded_tokens(batch["input_ids"], batch["attention_mask"], num_image_tokens) if live else 0,
            weight=weight,
        )

    def to(self, device: torch.device) -> "MicroBatch":
        if device.type == "cpu":
            return self
        return dataclasses.replace(
            self, inputs={k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            x0=self.x0.to(device, non_blocking=True),
        )


@dataclasses.dataclass
class StepResult:
    loss: float
    ce_loss: float
    flow_loss: float
    grad_norm: float
    finite: bool
    samples: int
    tokens: int
    per_task: dict[str, float] | None = None


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _per_task_sums(base: nn.Module, model: nn.Module, kept: dict[str, Any], mb: MicroBatch) -> torch.Tensor:
    """[sum, count] of CE per row kind and of flow MSE per image role, as one float64 vector."""
    ids, am = mb.inputs["input_ids"].cpu(), mb.inputs["attention_mask"].cpu()
    kinds = row_kinds(ids, am)
    roles = image_roles(ids, am)
    nk, nr = len(ROW_KINDS), len(IMAGE_ROLES)
    out = torch.zeros(2 * nk + 2 * nr, dtype=torch.float64)
    if mb.weight == 0:
        return out
    with torch.no_grad():
        targets = kept["ce_targets"]
        if targets is not None:
            sel = targets.ne(C.IGNORE_INDEX)
            if bool(sel.any()):
                hidden = kept["hidden"][:, :-1][sel]
                fsdp = is_fsdp(model)
                if fsdp:
                    model.unshard()
                try:
                    w = base.lm_head.weight
                    logits = F.linear(hidden.to(w.dtype), w).float()
                    ce = F.cross_entropy(logits, targets[sel], reduction="none").double().cpu()
                finally:
                    if fsdp:
                        model.reshard()
                row_of = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[sel].cpu()
                k = kinds[row_of]
                out[:nk].index_add_(0, k, ce)
                out[nk:2 * nk].index_add_(0, k, torch.ones_like(ce))
        err = (kept["velocity"].float() - kept["flow_target"].float()).pow(2).flatten(1).mean(1).double().cpu()
        out[2 * nk:2 * nk + nr].index_add_(0, roles, err)
        out[2 * nk + nr:].index_add_(0, roles, torch.ones_like(err))
    return out


def _per_task_metrics(sums: torch.Tensor) -> dict[str, float]:
    nk, nr = len(ROW_KINDS), len(IMAGE_ROLES)
    out = {}
    for i, k in enumerate(ROW_KINDS):
        if sums[nk + i] > 0:
            out[f"ce/{k}"] = float(sums[i] / sums[nk + i])
    for i, r in enumerate(IMAGE_ROLES):
        if sums[2 * nk + nr + i] > 0:
            out[f"flow/{r}"] = float(sums[2 * nk + i] / sums[2 * nk + nr + i])
    return out


def forward_backward(model: nn.Module, micro: Sequence[MicroBatch], info: DistInfo, flow_weight: float,
                     autocast: bool = True, per_task: bool = False, base: nn.Module | None = None,
                     nan_inject: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward + backward of every micro-batch of one step (gradients accumulate in `.grad`).

    Returns the global-batch (loss, ce_loss, flow_loss) as float64 CPU scalars summed over ranks, and the
    per-task sums (or None). The gradient equals that of `loss = ce + flow_weight * flow` over the global batch;
    with one process and one micro-batch `loss` is the model's own float32 `out.loss`, bit for bit."""
    base = base if base is not None else unwrap(model)
    counts = torch.tensor([[mb.n_ce, mb.n_img] for mb in micro], dtype=torch.float64).sum(0)
    all_reduce_sum(counts, info)
    n_ce_all, n_img_all = max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)
    exact = info.world_size == 1 and len(micro) == 1 and micro[0].weight == 1
    ce_total = torch.zeros((), dtype=torch.float64)
    flow_total = torch.zeros((), dtype=torch.float64)
    task = torch.zeros(2 * len(ROW_KINDS) + 2 * len(IMAGE_ROLES), dtype=torch.float64) if per_task else None
    device = next(base.parameters()).device
    for k, mb in enumerate(micro):
        mb = mb.to(device)
        with grad_sync_context(model, k == len(micro) - 1):
            with _autocast(device, autocast):
                out = model(**mb.inputs, x0=mb.x0)
            if mb.weight > 0 and out.num_ce_tokens != mb.n_ce:
                raise RuntimeError(
                    f"CE-token count mismatch: the model averaged over {out.num_ce_tokens} targets, the trainer "
                    f"expected {mb.n_ce} (cheers.train.flow_stage.count_ce_targets is out of sync with "
                    "CheersModel.ce_targets)"
                )
            if exact:
                loss = out.loss
                exact_loss = out.loss.detach().double().cpu()
            else:
                w_ce = mb.weight * mb.n_ce / n_ce_all
                w_fl = mb.weight * mb.n_img / n_img_all
                # DDP / FSDP2 average gradients over ranks; the loss is a sum over ranks, hence * world_size
                loss = (out.ce_loss * w_ce + flow_weight * out.flow_loss * w_fl) * info.world_size
                if mb.weight == 0:
                    loss = loss + 0.0 * out.loss  # a filler batch: every parameter in the graph, zero gradient
            if nan_inject:
                loss = loss * float("nan")
            loss.backward()
        ce_total += out.ce_loss.detach().double().cpu() * (mb.n_ce / n_ce_all)
        flow_total += out.flow_loss.detach().double().cpu() * (mb.n_img / n_img_all)
        if nan_inject:
            ce_total = ce_total * float("nan")
        if per_task:
            kept = {"hidden": out.hidden.detach(), "ce_targets": out.ce_targets, "velocity": out.velocity.detach(),
                    "flow_target": out.flow_target.detach()}
            del out
            task += _per_task_sums(base, model, kept, mb)
        else:
            del out
    if is_fsdp(model):
        model.set_requires_gradient_sync(True)
    totals = torch.stack([ce_total, flow_total])
    all_reduce_sum(totals, info)
    if task is not None:
        all_reduce_sum(task, info)
    total = exact_loss if exact else totals[0] + flow_weight * totals[1]
    if nan_inject:
        total = total * float("nan")
    return total, totals[0], totals[1], task


class FlowTrainer(RunBase):
    """Stages >= 1: the unified model on mixed understanding / generation / edit / text batches."""

    kind = "flow"

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        super().__init__(cfg, resume)
        self.tokenizer = load_tokenizer(cfg)
        self.base, origin = build_model(cfg, self.tokenizer, self.info)
        set_activation_checkpointing(self.base, cfg.model.activation_checkpointing)
        self.lora_config, lora_init = None, None
        if cfg.lora is not None:
            from cheers.train.lora import attach_lora

            self.lora_config, lora_init = attach_lora(self.base, cfg)
            n_layers = sum(1 for n, _ in self.base.named_parameters() if ".lora_A." in n)
            origin += f", LoRA rank {cfg.lora.rank} on {n_layers} linear layers (base frozen)"
            self.trainable = [n for n, p in self.base.named_parameters() if p.requires_grad]
            self.frozen = [n for n, p in self.base.named_parameters() if not p.requires_grad]
        else:
            self.trainable, self.frozen = select_trainable(self.base, cfg.trainable.include, cfg.trainable.exclude)
        if any(n.startswith("model.vae_model.") for n in self.trainable):
            raise TrainConfigError("stages >= 1 never train the VAE (model.vae_model.*): add it to trainable.exclude")
        self.base.model.vae_model.eval()  # frozen encoder: no running statistics anywhere, but keep it explicit
        self.model = wrap(self.base, self.info, cfg.distributed.reshard_after_forward, bf16=cfg.model.bf16_autocast,
                          init_dir=sharded_init(cfg, self.info), init_extra=lora_init)
        self._setup_optimizer(self.model)
        mcfg = self.base.config
        self.n_img_tokens = mcfg.num_image_tokens
        self.img_end = mcfg.tokens.img_end
        self.latent_shape = (mcfg.latent_channels, mcfg.grid, mcfg.grid)
        self.resolution = cfg.data.resolution or mcfg.resolution
        if self.resolution != mcfg.resolution:
            raise TrainConfigError(f"data.resolution {self.resolution} != the model's image size {mcfg.resolution}")
        self.feed = RecordFeed(cfg.data, cfg.seed)
        self.builder = SampleBuilder.from_config(
            mcfg, self.tokenizer, max_length=cfg.data.max_length, cfg_dropout=cfg.data.cfg_dropout, seed=cfg.seed,
            bad_image=cfg.data.bad_image, t_sampling=cfg.data.t_sampling, t_mean=cfg.data.t_mean, t_std=cfg.data.t_std,
            t_uniform=cfg.data.t_uniform,
        )
        self.cache = None
        if cfg.latents.cache:
            vae = self.base.model.vae_model
            where = cfg.latents.dir
            directory = None if where == "memory" else (where or str(self.out / "latent_cache"))
            self.cache = LatentCache(vae.encode, vae_fingerprint(vae), directory, cfg.latents.max_memory_items)
        self._filler = None
        self._bad_before = 0
        self.bad_samples_all = 0  # over all ranks, this run
        self._start(origin, device=str(self.info.device),
                    sources={n: {"weight": s.weight, "task": s.task} for n, s in zip(self.feed.names, cfg.data.sources)})

    # -- state
    def trainer_state(self) -> dict[str, Any]:
        state = super().trainer_state()
        if self.cache is not None:
            state["latent_cache"] = self.cache.stats()
        return state

    def restore_trainer_state(self, state: dict[str, Any]) -> None:
        super().restore_trainer_state(state)
        self._bad_before = self.counters["bad_samples"]

    # -- data
    def _build_slot(self, index: int, record) -> tuple[Any, list[str]] | None:
        try:
            sample = self.builder.build(record, index)
            keys = None
            if self.cache is not None:
                parsed = parse_record(record)
                kinds = sample.input_ids[sample.input_ids < 0].tolist()
                keys = sample_image_keys(parsed.images, kinds, self.resolution)
            return sample, keys
        except DataError as err:
            if self.cfg.data.on_bad_sample == "error":
                raise
            self.counters["bad_samples"] += 1
            self.log.event("bad_sample", step=self.step + 1, rank=self.info.rank, error=str(err))
            return None

    def next_micro_batches(self) -> list[MicroBatch]:
        cfg, info = self.cfg, self.info
        records = self.feed.take(cfg.global_batch_size(info.world_size))
        micro = []
        for k in range(cfg.grad_accum):
            a, b = slot_range(k, info.rank, info.world_size, cfg.micro_batch_size)
            built = []
            for index, rec in records[a:b]:
                got = self._build_slot(index, rec)
                if got is not None:
                    built.append((index, *got))
            weight = 1.0
            if not built:
                if self._filler is None:
                    raise RuntimeError(
                        f"step {self.step + 1}: every sample of rank {info.rank}'s micro-batch {k} was bad and no "
                        "earlier sample exists to stand in; check the data"
                    )
                built, weight = [self._filler], 0.0
            else:
                self._filler = built[0]
            samples = [s for _, s, _ in built]
            batch = collate(samples, self.tokenizer.token_ids.pad)
            x0 = torch.cat([sample_noise(cfg.seed, i, int(s.t.numel()), self.latent_shape) for i, s, _ in built])
            latents = None
            if self.cache is not None:
                keys = [key for _, _, ks in built for key in ks]
                latents = self.cache.latents(keys, batch["pixel_values"].to(info.device))
            micro.append(MicroBatch.from_batch(batch, x0, self.n_img_tokens, self.img_end, latents, weight))
        return micro

    # -- one step
    def train_step(self) -> StepResult:
        cfg = self.cfg
        step_no = self.step + 1
        log_now = step_no % cfg.log.interval == 0 or step_no == cfg.steps
        micro = self.next_micro_batches()
        inject = cfg.debug.inject_nan_at_step is not None and step_no == cfg.debug.inject_nan_at_step
        loss, ce, flow, task = forward_backward(
            self.model, micro, self.info, self.base.config.flow_loss_weight, cfg.model.bf16_autocast,
            per_task=log_now and cfg.log.per_task, base=self.base, nan_inject=inject,
        )
        loss = float(loss)
        grad_norm, finite = self.optimizer_step(loss)
        bad = self.counters["bad_samples"] - self._bad_before
        self._bad_before = self.counters["bad_samples"]
        counts = torch.tensor([sum(m.n_samples for m in micro), sum(m.n_tokens for m in micro), bad],
                              dtype=torch.float64)
        all_reduce_sum(counts, self.info)
        self.bad_samples_all += int(counts[2])
        return StepResult(loss, float(ce), float(flow), grad_norm, finite, int(counts[0]), int(counts[1]),
                          _per_task_metrics(task) if task is not None else None)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        consecutive_bad = 0
        last: dict[str, Any] = {}
        for res, dt in self.timed_steps():
            self.counters["samples"] += res.samples
            self.counters["tokens"] += res.tokens
            consecutive_bad = self.nan_policy(res.finite, consecutive_bad, f"loss={res.loss}, ce_loss={res.ce_loss}, "
                                              f"flow_loss={res.flow_loss}, grad_norm={res.grad_norm}")
            if self.step % cfg.log.interval == 0 or self.step == cfg.steps:
                last = {
                    "step": self.step, "loss": res.loss, "ce_loss": res.ce_loss, "flow_loss": res.flow_loss,
                    "grad_norm": res.grad_norm, "lr": self.schedule.lr(self.step - 1), "samples_per_s": res.samples / dt,
                    "tokens_per_s": res.tokens / dt, "step_time_s": dt, "samples": res.samples,
                    "skipped_steps": self.counters["nan_skipped_steps"], "bad_samples": self.bad_samples_all,
                }
                if res.per_task:
                    last.update(res.per_task)
                if self.cache is not None:
                    last["latent_cache_misses"] = self.cache.misses
                self.log.step(last)
            self.log.progress_to(self.step, res.loss)
            if self.should_checkpoint():
                self.save()
        if self.step >= cfg.steps and cfg.ckpt.export_final:
            self.export()
        self.log.event("end", step=self.step, counters=self.counters)
        return last
