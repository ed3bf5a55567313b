"""SigLIP2 vision encoder, fixed-grid layout (spec §A.3): conv patch embedding + learned position table,
pre-LN transformer, post-LayerNorm. The attention-pooling head is kept for checkpoint fidelity but Cheers never
uses its output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cheers.config import VisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        table = self.position_embedding.weight
        g = self.cfg.grid
        if (grid_h, grid_w) == (g, g):
            return table
        # Larger inputs: resize the table as a g x g image (bicubic, no corner alignment).
        img = table.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        img = F.interpolate(img, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return img.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(table.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [0,1] -> [B, (H/P)(W/P), d_v] raster order."""
        x = self.patch_embedding(pixels)
        gh, gw = x.shape[-2:]
        return x.flatten(2).transpose(1, 2) + self.positions(gh, gw)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class VisionEncoderLayers(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class AttentionPoolingHead(nn.Module):
    """SigLIP's probe-attention pooling. Present in the checkpoint; unused by Cheers (kept for round trips)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(h.shape[0], -1, -1)
        x = self.attention(probe, h, h, need_weights=False)[0]
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class SiglipVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoderLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = AttentionPoolingHead(cfg)
        self.gradient_checkpointing = False

    def forward_from_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return self.post_layernorm(h)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Post-LayerNorm features [B, g^2, d_v] (what Cheers uses downstream)."""
        return self.forward_from_embeddings(self.embeddings(pixels))
