"""Stage 0: train the autoencoder of a from-scratch (tiny) model, then hand it to the unified model.

The released model starts from a pretrained FLUX.2 VAE; the tiny presets have none, so stage 0 trains
`model.vae_model` (encoder + decoder) as a plain autoencoder on the training pictures (generation preprocessing:
short side to R, centre crop):

    mean = encoder(x)[:, :z]            (the latent the model uses: the mean half of the moments, never sampled)
    loss = recon(decoder(mean), x) + latent_reg * mean(mean^2)     recon = L1, MSE or L1 + MSE

The small L2 pull on the latent replaces a KL term (nothing is sampled, so a KL has nothing to regularise but
the scale). At the end of the stage:

* the latent standardization statistics are measured on `vae.stats_images` training pictures: per channel of the
  2x2-patchified mean (4z channels) the mean and the (population) variance, written into `running_mean` /
  `running_var` of both `model.vae_model.bn` and `model.vae_decoder_projector.bn`;
* the trained decoder is copied into `model.vae_decoder_projector.decoder` (spec §D.4: the latent-to-pixel
  decoder starts from the VAE decoder);
* a final checkpoint and the official-format export are written; stage 1 starts from the export.

The image stream is the run's record stream (`cheers.train.feed.RecordFeed`) flattened to pictures; like the flow
stages, the global batch does not depend on the number of processes (DDP; `fsdp2` is run as DDP here - the
autoencoder is small).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cheers.model.vae import patchify
from cheers.processor import ImageError, load_image, preprocess_generation
from cheers.train.data import DataError, parse_record
from cheers.train.distributed import all_reduce_sum, wrap_plain
from cheers.train.feed import RecordFeed, slot_range
from cheers.train.optim import select_trainable
from cheers.train.run import RunBase, build_model, grad_sync_context, load_tokenizer, set_activation_checkpointing
from cheers.train.settings import TrainConfig, TrainConfigError


class AutoencoderLoss(nn.Module):
    """Sums of the reconstruction errors and of the latent penalty for a batch of pictures."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.vae.z_channels
        mean = self.vae.encoder(pixels)[:, :z]
        diff = self.vae.decoder(mean) - pixels
        return diff.abs().sum(), diff.pow(2).sum(), mean.pow(2).sum()


class ImageFeed:
    """The pictures of the record stream, in order, with global indices; identical on every rank."""

    def __init__(self, records: RecordFeed):
        self.records = records
        self.queue: list[str] = []
        self.index = 0
        self.bad_records = 0

    def take(self, n: int) -> list[tuple[int, str]]:
        guard = 0
        while len(self.queue) < n:
            (_, rec), = self.records.take(1)
            try:
                paths = parse_record(rec).images
            except DataError:
                self.bad_records += 1
                paths = []
            self.queue.extend(str(p) for p in paths)
            guard = guard + 1 if not paths else 0
            if guard > 10000:
                raise TrainConfigError("stage 0 needs pictures, but 10000 records in a row had none")
        out = [(self.index + i, p) for i, p in enumerate(self.queue[:n])]
        del self.queue[:n]
        self.index += n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records.state_dict(), "queue": list(self.queue), "index": self.index,
                "bad_records": self.bad_records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records.load_state_dict(state["records"])
        self.queue = list(state["queue"])
        self.index = int(state["index"])
        self.bad_records = int(state.get("bad_records", 0))


class VAETrainer(RunBase):
    kind = "vae"

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        super().__init__(cfg, resume)
        self.tokenizer = load_tokenizer(cfg, required=False)
        self.base, origin = build_model(cfg, self.tokenizer, self.info)
        set_activation_checkpointing(self.base, cfg.model.activation_checkpointing)
        trainable, _ = select_trainable(self.base, cfg.trainable.include, cfg.trainable.exclude)
        outside = [n for n in trainable if not n.startswith("model.vae_model.")]
        if outside:
            raise TrainConfigError(f"stage 0 trains the VAE only; trainable.include also selects {outside[:3]}")
        if self.info.distributed and self.info.strategy == "fsdp2":
            self.info.strategy = "ddp"  # the autoencoder is small: replicate it
        self.vae = self.base.model.vae_model
        self.ae = wrap_plain(AutoencoderLoss(self.vae), self.info)
        self.model = self.base  # checkpoints hold the whole CheersModel
        self._setup_optimizer(self.base)
        self.resolution = cfg.data.resolution or self.base.config.resolution
        self.feed = ImageFeed(RecordFeed(cfg.data, cfg.seed))
        self._filler: torch.Tensor | None = None
        self._start(origin)

    def _picture(self, path: str) -> torch.Tensor | None:
        try:
            return preprocess_generation(load_image(path), self.resolution)
        except (ImageError, OSError) as err:
            if self.cfg.data.on_bad_sample == "error":
                raise
            self.counters["bad_samples"] += 1
            self.log.event("bad_sample", step=self.step + 1, rank=self.info.rank, error=str(err))
            return None

    def _micro_batches(self) -> list[tuple[torch.Tensor, float]]:
        cfg, info = self.cfg, self.info
        items = self.feed.take(cfg.global_batch_size(info.world_size))
        out = []
        for k in range(cfg.grad_accum):
            a, b = slot_range(k, info.rank, info.world_size, cfg.micro_batch_size)
            pics = [p for p in (self._picture(path) for _, path in items[a:b]) if p is not None]
            if pics:
                batch = torch.stack(pics)
                self._filler = batch[:1]
                out.append((batch, 1.0))
            elif self._filler is not None:
                out.append((self._filler, 0.0))
            else:
                raise RuntimeError(f"step {self.step + 1}: every picture of rank {info.rank}'s micro-batch was bad")
        return out

    def train_step(self) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        micro = self._micro_batches()
        n_local = sum(b.shape[0] for b, w in micro if w > 0)
        counts = torch.tensor([float(n_local)], dtype=torch.float64)
        all_reduce_sum(counts, info)
        n_img = max(counts.item(), 1.0)
        c, r = 3, self.resolution
        zc, f = self.vae.z_channels, self.base.config.vae_encoder.downsample_factor
        pix_elems, lat_elems = n_img * c * r * r, n_img * zc * (r // f) ** 2
        sums = torch.zeros(3, dtype=torch.float64)
        device = self.info.device
        for k, (batch, weight) in enumerate(micro):
            batch = batch.to(device)
            with grad_sync_context(self.ae, k == len(micro) - 1):
                l1, mse, reg = self.ae(batch)
                rec = {"l1": l1, "mse": mse, "l1+mse": l1 + mse}[cfg.vae.loss]
                loss = (rec / pix_elems + cfg.vae.latent_reg * reg / lat_elems) * info.world_size * weight
                if cfg.debug.inject_nan_at_step is not None and self.step + 1 == cfg.debug.inject_nan_at_step:
                    loss = loss * float("nan")
                loss.backward()
            sums += torch.stack([l1.detach(), mse.detach(), reg.detach()]).double().cpu() * weight
        all_reduce_sum(sums, info)
        l1m, msem, regm = float(sums[0] / pix_elems), float(sums[1] / pix_elems), float(sums[2] / lat_elems)
        rec_m = {"l1": l1m, "mse": msem, "l1+mse": l1m + msem}[cfg.vae.loss]
        loss = rec_m + cfg.vae.latent_reg * regm
        grad_norm, finite = self.optimizer_step(loss)
        return {"loss": loss, "recon_l1": l1m, "recon_mse": msem, "psnr": 10 * math.log10(1 / max(msem, 1e-12)),
                "latent_reg": regm, "grad_norm": grad_norm, "finite": finite, "images": int(counts.item())}

    @torch.no_grad()
    def measure_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean / variance of the patchified latent mean over `vae.stats_images` pictures."""
        cfg, info = self.cfg, self.info
        feed = ImageFeed(RecordFeed(cfg.data, cfg.seed))
        items = feed.take(cfg.vae.stats_images)
        mine = [path for i, path in items if i % info.world_size == info.rank]
        zc = self.vae.z_channels
        acc = torch.zeros(3, 4 * zc, dtype=torch.float64)
        was = self.vae.training
        self.vae.eval()
        for j in range(0, len(mine), max(1, cfg.micro_batch_size)):
            pics = [p for p in (self._picture(path) for path in mine[j:j + cfg.micro_batch_size]) if p is not None]
            if not pics:
                continue
            z = patchify(self.vae.encoder(torch.stack(pics).to(info.device))[:, :zc]).double().cpu()
            acc[0] += z.sum(dim=(0, 2, 3))
            acc[1] += z.pow(2).sum(dim=(0, 2, 3))
            acc[2] += z.shape[0] * z.shape[2] * z.shape[3]
        self.vae.train(was)
        all_reduce_sum(acc, info)
        n = acc[2].clamp_min(1)
        mean = acc[0] / n
        var = (acc[1] / n - mean.pow(2)).clamp_min(0.0)
        return mean.float(), var.float()

    @torch.no_grad()
    def finalize(self) -> None:
        mean, var = self.measure_statistics()
        m = self.base.model
        for bn in (m.vae_model.bn, m.vae_decoder_projector.bn):
            bn.running_mean.copy_(mean.to(bn.running_mean.device))
            bn.running_var.copy_(var.to(bn.running_var.device))
        if self.cfg.vae.copy_to_projector:
            m.vae_decoder_projector.decoder.load_state_dict(m.vae_model.decoder.state_dict())
        self.log.event("latent_statistics", step=self.step, channels=int(mean.numel()),
                       mean_abs_avg=float(mean.abs().mean()), var_avg=float(var.mean()),
                       var_min=float(var.min()), var_max=float(var.max()))

    def fit(self) -> dict[str, Any]:
        return self.fit_plain(self.finalize)
