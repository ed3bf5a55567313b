"""FLUX.2-style convolutional autoencoder (spec §A.4) and the latent conventions around it: keep the mean half of
the moments, 2x2 space-to-channel patchify, per-channel standardization with frozen statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cheers.config import VAEConfig


class GroupNorm(nn.GroupNorm):
    """GroupNorm that normalizes channels-last inputs in the contiguous layout. The convolutions run faster
    channels-last on CPU, but PyTorch's channels-last CPU GroupNorm kernel is far less accurate (~47x the error
    of the contiguous one against float64): enough to push the parity goldens out of tolerance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def group_norm(c: int, groups: int = 32) -> nn.GroupNorm:
    return GroupNorm(groups, c, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient is recorded (saves a full-resolution allocation per call at inference)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    def __init__(self, c: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (p(n).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # [B,1,HW,C]
        return x + self.proj_out(o.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int = 32) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: res-blocks, then an optional down/up-sampler (named as in the checkpoint)."""

    def __init__(self, widths: list[int], resample: nn.Module | None, kind: str, groups: int = 32) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths[:-1], widths[1:]))
        if resample is not None:
            setattr(self, kind, resample)
        self.kind = kind if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return getattr(self, self.kind)(x) if self.kind else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for lvl, w in enumerate(widths):
            last = lvl == len(widths) - 1
            self.down.append(Level([cin] + [w] * cfg.num_res_blocks, None if last else Downsample(w), "downsample",
                                   cfg.norm_groups))
            cin = w
        self.mid = MidBlock(cin, cfg.norm_groups)
        self.norm_out = group_norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,R,R] in [0,1] -> moments [B, 2z, R/f, R/f]."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(swish(self.norm_out(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        # Checkpoint index up.{l} is the level (up.0 = full resolution); execution goes coarse to fine.
        levels: list[nn.Module] = [None] * len(widths)  # type: ignore[list-item]
        cin = widths[-1]
        for lvl in reversed(range(len(widths))):
            w = widths[lvl]
            levels[lvl] = Level([cin] + [w] * (cfg.num_res_blocks + 1), Upsample(w) if lvl else None, "upsample",
                                cfg.norm_groups)
            cin = w
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """latent [B, z, h, w] (not patchified, not standardized) -> pixels [B, 3, h*f, w*f] (unclamped)."""
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(level, h, use_reentrant=False)
            else:
                h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


def patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, c, 2h, 2w] -> [B, 4c, h, w], output channel 4c + 2dy + dx takes input (c, 2i+dy, 2j+dx)."""
    b, c, h2, w2 = z.shape
    z = z.view(b, c, h2 // 2, 2, w2 // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, 4 * c, h2 // 2, w2 // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, c4, h, w = z.shape
    z = z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c4 // 4, 2 * h, 2 * w)


class LatentNorm(nn.Module):
    """Per-channel standardization with frozen statistics (stored like an affine-free BatchNorm, never updated)."""

    eps = 1e-4

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.running_mean.to(x.dtype).view(1, -1, 1, 1)
        std = torch.sqrt(self.running_var.float() + self.eps).to(x.dtype).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return x * std + mean


class AutoEncoder(nn.Module):
    """The frozen VAE (`vae_model`): encode pixels to standardized patchified latents and decode them back."""

    def __init__(self, enc: VAEConfig, dec: VAEConfig) -> None:
        super().__init__()
        self.z_channels = enc.z_channels
        self.encoder = Encoder(enc)
        self.decoder = Decoder(dec)
        self.bn = LatentNorm(4 * enc.z_channels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,R,R] in [0,1] -> x1 [B, 4z, g, g]: mean half, patchify, standardize (no sampling)."""
        moments = self.encoder(pixels)
        return self.bn.normalize(patchify(moments[:, : self.z_channels]))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """x [B, 4z, g, g] -> pixels [B,3,R,R] (unclamped)."""
        return self.decoder(unpatchify(self.bn.denormalize(latent)))


class LatentToPixelDecoder(nn.Module):
    """`vae_decoder_projector`: a second, trainable decoder copy with its own statistics. It turns any (noisy)
    standardized latent into the pixels the ViT reads (spec §A.5)."""

    def __init__(self, dec: VAEConfig) -> None:
        super().__init__()
        self.decoder = Decoder(dec)
        self.bn = LatentNorm(4 * dec.z_channels)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(unpatchify(self.bn.denormalize(latent)))
