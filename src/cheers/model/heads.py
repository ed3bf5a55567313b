"""The generation side of Cheers (spec §A.7-A.11): timestep embedder, adaLN transformer blocks, the cascaded
flow-matching head's two stages and the high-frequency gate between them."""

from __future__ import annotations

import math

import torch
from torch import nn

from cheers.model.layers import GQAttention, RMSNorm, SwiGLU, rope_cos_sin


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the raw t in [0, 1] (no x1000), cosines first; two MLPs for the two stages."""

    def __init__(self, dim1: int, dim2: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_1 = nn.Sequential(nn.Linear(freq_dim, dim1), nn.SiLU(), nn.Linear(dim1, dim1))
        self.mlp_2 = nn.Sequential(nn.Linear(freq_dim, dim2), nn.SiLU(), nn.Linear(dim2, dim2))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # The reference materializes t in the activation dtype first (in bf16, 1/3 becomes 0.333984375).
        t = t.to(self.mlp_1[0].weight.dtype).float()
        angles = t.view(-1, 1) * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [N] -> (tau1 [N,1,d_t], tau2 [N,1,d_v])."""
        e = self.features(t).to(self.mlp_1[0].weight.dtype).unsqueeze(1)
        return self.mlp_1(e), self.mlp_2(e)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


class AdaLNBlock(nn.Module):
    """Bidirectional GQA + SwiGLU block modulated by a condition vector (shift/scale/gate for each half)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.attn = GQAttention(dim, num_heads, num_kv_heads, qkv_bias=False)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)  # a fresh block is the identity
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = h + gate1 * self.attn(modulate(self.input_layernorm(h), shift1, scale1), cos, sin)
        return h + gate2 * self.mlp(modulate(self.post_attention_layernorm(h), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class FlowStage(nn.Module):
    """A stack of adaLN blocks plus a final layer: one stage of the cascaded flow head.

    `repeat_positions` reproduces the released stage-2 head's RoPE quirk: token k uses position k mod (L/2).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, layers: int, out_dim: int, repeat_positions: bool) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.repeat_positions = repeat_positions
        self.diffusion_head_a = nn.ModuleList(AdaLNBlock(dim, num_heads, num_kv_heads) for _ in range(layers))
        self.diffusion_head_b = FinalLayer(dim, out_dim)
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n = h.shape[1]
        pos = torch.arange(n, device=h.device)
        if self.repeat_positions:
            pos = pos % (n // 2)
        cos, sin = rope_cos_sin(pos[None], self.head_dim, 10000.0, h.dtype)
        for block in self.diffusion_head_a:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, c, cos, sin, use_reentrant=False)
            else:
                h = block(h, c, cos, sin)
        return self.diffusion_head_b(h, c)


class HighFrequencyGate(nn.Module):
    """`Y = LayerNorm(S + sigma(S) * E)`: inject the ViT patch embeddings E (high-frequency detail) of the decoded
    x_t into the up-sampled semantic features S, weighted by a learned per-token scalar (spec §A.10)."""

    def __init__(self, dim: int, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, semantic: torch.Tensor, detail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (gated features [B, g^2, d_v], gate values [B, g^2, 1])."""
        sigma = self.gate(semantic)
        if not self.enabled:  # ablation: the detail path is cut, the semantic path unchanged
            return self.layer_norm(semantic), torch.zeros_like(sigma)
        return self.layer_norm(semantic + sigma * detail), sigma


def channel_to_space(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, (g/2)^2, 4d] -> [B, g^2, d]: token (i,j) sub-cell (dy,dx) = channels (2dy+dx)*d.. goes to (2i+dy, 2j+dx)."""
    b, _, c4 = x.shape
    d, half = c4 // 4, grid // 2
    x = x.view(b, half, half, 2, 2, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * grid, d)


def space_to_channel(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, g^2, d] -> [B, (g/2)^2, 4d]: the 2x2 token merge, window order (0,0),(0,1),(1,0),(1,1)."""
    b, _, d = x.shape
    half = grid // 2
    x = x.view(b, half, 2, half, 2, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, half * half, 4 * d)


class UnderstandingProjector(nn.Module):
    """LayerNorm, 2x2 merge, MLP: ViT features -> LLM image tokens (the 4x compression, spec §A.6)."""

    def __init__(self, d_v: int, d_t: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.layernorm = nn.LayerNorm(d_v, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(4 * d_v, 4 * d_v), nn.GELU(), nn.Linear(4 * d_v, d_t))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp(space_to_channel(self.layernorm(feats), self.grid))
