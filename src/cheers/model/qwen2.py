"""The Qwen2 decoder-only language model (spec §A.2), with a preallocated KV cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import nn

from cheers.config import TextConfig
from cheers.model.layers import GQAttention, RMSNorm, SwiGLU, attention, rope_cos_sin


class KVCache:
    """Per-layer key/value buffers [B, KV, capacity, hd] written in place.

    `length` is the number of committed positions. Writing at `length` without committing is how the sampler
    evaluates an image block on top of a prompt repeatedly (the reference appends and then crops 256 entries).
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end or buf_k.shape[0] != k.shape[0]:
            self._grow(layer, k, v, start, end)
            buf_k, buf_v = self.keys[layer], self.values[layer]
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def _grow(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int) -> None:
        buf_k, buf_v = self.keys[layer], self.values[layer]
        capacity = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 0), 64)
        new_k = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
        new_v = v.new_zeros(v.shape[0], v.shape[1], capacity, v.shape[3])
        if buf_k is not None and buf_k.shape[0] == k.shape[0]:
            new_k[:, :, :start] = buf_k[:, :, :start]
            new_v[:, :, :start] = buf_v[:, :, :start]
        self.keys[layer], self.values[layer] = new_k, new_v

    def reserve(self, end: int) -> None:
        """Grow every allocated buffer so that positions < end, and one more, fit: called before a (compiled)
        forward so the forward never reallocates and never writes up to the buffer's exact end, which keeps
        torch.compile's shape guards stable from token to token."""
        for layer, buf_k in enumerate(self.keys):
            if buf_k is not None and buf_k.shape[2] <= end:
                self._grow(layer, buf_k[:, :, :0], self.values[layer][:, :, :0], self.length, end + 1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. when finished sequences leave a batch)."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]

    def repeat(self, n: int) -> "KVCache":
        """A copy with every row repeated n times (row-major: r0,r0,..,r1,..)."""
        out = KVCache(len(self.keys))
        out.keys = [None if k is None else k.repeat_interleave(n, 0) for k in self.keys]
        out.values = [None if v is None else v.repeat_interleave(n, 0) for v in self.values]
        out.length = self.length
        return out


class Qwen2Layer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GQAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, qkv_bias=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer_idx: int,
        start: int,
        causal: bool = True,
    ) -> torch.Tensor:
        q, k, v = self.self_attn.project(self.input_layernorm(h), cos, sin)
        if cache is not None:
            k, v = cache.write(layer_idx, start, k, v)
        h = h + self.self_attn.output(attention(q, k, v, mask, is_causal=causal and mask is None and q.shape[2] > 1))
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    """Token embedding, decoder layers and final norm. Works on embeddings so images can be spliced in."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, n, d].

        inputs_embeds [B, n, d]; positions [B, n] (default: start..start+n-1); mask boolean [B, 1, n, S] with
        S = start + n (None: causal if `causal`, else every position sees every other and the cache); cache: written at `start` (default cache.length), not committed here.
        """
        b, n, _ = inputs_embeds.shape
        if start is None:
            start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + n, device=inputs_embeds.device).expand(b, n)
        if causal and mask is None and start > 0 and n > 1:
            # SDPA's is_causal aligns top-left; a chunk on top of a cache needs the bottom-right alignment.
            mask = torch.ones(n, start + n, dtype=torch.bool, device=inputs_embeds.device).tril(start)[None, None]
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, None, i, start, causal,
                                                     use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, i, start, causal)
        return self.norm(h)

