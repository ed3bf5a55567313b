"""`CheersModel`: the whole Cheers network and its training forward.

Data path (spec §A.0): pixels -> frozen VAE -> standardized latent x1 -> x_t = t x1 + (1-t) x0 -> latent-to-pixel
decoder -> ViT -> 2x2 merge -> LLM tokens beside text. Text leaves through the LM head; image positions leave
through the cascaded flow head (semantic stage -> pixel shuffle -> high-frequency gate -> detail stage) as the
velocity x1 - x0.

Attribute names below are the official checkpoint's (`model.language_model`, `model.gen_projector`, ...), so
`state_dict()` keys are exactly the released ones; class names follow the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cheers.config import CheersConfig
from cheers.constants import IGNORE_INDEX
from cheers.model.heads import (
    FlowStage,
    HighFrequencyGate,
    TimestepEmbedder,
    UnderstandingProjector,
    channel_to_space,
)
from cheers.model.qwen2 import KVCache, Qwen2Model
from cheers.model.siglip import SiglipVisionEncoder
from cheers.model.vae import AutoEncoder, LatentToPixelDecoder


@dataclass
class ImageReading:
    """What the image-reading path produces for a batch of latents."""

    tokens: torch.Tensor  # [N, N_img, d_t] LLM input tokens
    detail: torch.Tensor  # [N, g^2, d_v] ViT patch embeddings (conv + positions): the high-frequency signal
    pixels: torch.Tensor | None = None  # [N, 3, R, R] decoded x_t (kept only on request)
    features: torch.Tensor | None = None  # [N, g^2, d_v] post-LN ViT features (kept only on request)


@dataclass
class VelocityOutput:
    velocity: torch.Tensor  # [N, c_lat, g, g]
    semantic: torch.Tensor  # [N, N_img, 4 d_v] stage-1 output before the pixel shuffle
    gate: torch.Tensor  # [N, g^2, 1]
    gated: torch.Tensor  # [N, g^2, d_v]
    detail_out: torch.Tensor  # [N, g^2, c_lat] stage-2 output before reshaping


@dataclass
class SequenceLayout:
    """A batch of id rows expanded so each image placeholder becomes N_img positions."""

    embeds: torch.Tensor  # [B, L', d_t]
    mask: torch.Tensor  # [B, 1, L', L'] boolean, True = may attend
    valid: torch.Tensor  # [B, L'] real (non-padding) positions
    image_rows: torch.Tensor  # [N] row of each image
    image_pos: torch.Tensor  # [N, N_img] positions of each image's tokens
    token_pos: torch.Tensor  # [B, L] where each input id landed (placeholders: their first image position)


@dataclass
class CheersOutput:
    loss: torch.Tensor
    ce_loss: torch.Tensor
    flow_loss: torch.Tensor
    velocity: torch.Tensor | None = None  # [N, c_lat, g, g] predicted velocity of every image
    flow_target: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # [B, L', d_t] final-norm LLM states
    logits: torch.Tensor | None = None  # [B, L', V] only when requested
    ce_targets: torch.Tensor | None = None  # [B, L'-1] realigned next-token targets
    layout: SequenceLayout | None = None
    num_ce_tokens: int = 0


class CheersBackbone(nn.Module):
    """Container whose attribute names give the official `model.*` key prefixes."""

    def __init__(self, cfg: CheersConfig) -> None:
        super().__init__()
        d_t, d_v, g = cfg.text.hidden_size, cfg.vision.hidden_size, cfg.grid
        self.language_model = Qwen2Model(cfg.text)
        self.vision_representation = SiglipVisionEncoder(cfg.vision)
        self.vae_model = AutoEncoder(cfg.vae_encoder, cfg.vae_decoder)
        self.vae_decoder_projector = LatentToPixelDecoder(cfg.vae_decoder)
        self.und_projector = UnderstandingProjector(d_v, d_t, g)
        self.time_embed = TimestepEmbedder(d_t, d_v, cfg.head.time_freq_dim)
        # Cascaded flow head: semantic stage at LLM width -> pixel shuffle -> gate -> detail stage at ViT width.
        self.gen_projector = FlowStage(d_t, cfg.text.num_heads, cfg.text.num_kv_heads, cfg.head.stage1_layers,
                                       4 * d_v, repeat_positions=False)
        self.hi_gate = HighFrequencyGate(d_v, enabled=cfg.head.high_frequency_gate)
        self.hi_projector = FlowStage(d_v, cfg.vision.num_heads, cfg.stage2_kv_heads, cfg.head.stage2_layers,
                                      cfg.latent_channels, repeat_positions=True)


class CheersModel(nn.Module):
    def __init__(self, config: CheersConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.model = CheersBackbone(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()
        self.model.vae_model.requires_grad_(False)  # the VAE never trains (stage 0 trains it separately)

    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ---- image reading --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clean standardized latents x1 [N, c_lat, g, g] of pixel images in [0, 1] (frozen VAE)."""
        return self.model.vae_model.encode(pixels)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> pixels in [0, 1] with the frozen VAE decoder (clamped)."""
        return self.model.vae_model.decode(latents).clamp(0, 1)

    def read_latents(self, latents: torch.Tensor, keep: bool = False) -> ImageReading:
        """x_t -> LLM image tokens and the patch-embedding detail signal, sharing one decode and one embedding."""
        m = self.model
        pixels = m.vae_decoder_projector(latents)
        detail = m.vision_representation.embeddings(pixels)
        feats = m.vision_representation.forward_from_embeddings(detail)
        tokens = m.und_projector(feats)
        return ImageReading(tokens, detail, pixels if keep else None, feats if keep else None)

    # ---- generation head ------------------------------------------------------------------------------------
    def velocity_head(self, hidden: torch.Tensor, t: torch.Tensor, detail: torch.Tensor) -> VelocityOutput:
        """LLM states at an image's positions [N, N_img, d_t], t [N], detail [N, g^2, d_v] -> velocity."""
        m, g = self.model, self.config.grid
        tau1, tau2 = m.time_embed(t)
        semantic = m.gen_projector(hidden, tau1)
        gated, gate = m.hi_gate(channel_to_space(semantic, g), detail)
        out = m.hi_projector(gated, tau2)
        velocity = out.view(out.shape[0], g, g, -1).permute(0, 3, 1, 2)
        return VelocityOutput(velocity, semantic, gate, gated, out)

    # ---- sequence layout ------------------------------------------------------------------------------------
    def layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_tokens: torch.Tensor,
               align_right: bool = False) -> SequenceLayout:
        """Expand placeholders (ids < 0) into image tokens; rows without any placeholder get one image prepended
        as ordinary causal positions (the reference's dummy-image prefix, spec §C.3). Rows may be right-padded
        (training, as the reference) or left-padded (batched inference). Fully vectorized.
        `align_right` (inference): every row ends at the last position even when the rows expand to different
        lengths (different image counts, or a dummy prefix beside a placeholder), so the last position is each
        row's newest token and generated tokens follow it without a gap."""
        B, L = input_ids.shape
        n_img = self.config.num_image_tokens
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid_ids = attention_mask.bool()
        is_ph = (input_ids < 0) & valid_ids
        n_ph = is_ph.sum(1)
        needs_prefix = n_ph == 0
        # The prefix goes right before the first real id, so left padding stays in front of it.
        lead = valid_ids.long().argmax(1)
        width = torch.where(is_ph, n_img, 1)
        extra = torch.zeros_like(width)
        extra[needs_prefix, lead[needs_prefix]] = n_img
        new_pos = (width + extra).cumsum(1) - width  # [B, L]
        row_len = (width + extra).sum(1)
        Lx = int(row_len.max())
        if align_right:
            new_pos = new_pos + (Lx - row_len)[:, None]  # the shift is padding in front of the row

        # images in (row, textual order): placeholder images and prefixed ones, sorted by (row, start)
        ph_rows, ph_cols = is_ph.nonzero(as_tuple=True)
        ph_start = new_pos[ph_rows, ph_cols]
        pre_rows = needs_prefix.nonzero(as_tuple=True)[0]
        rows = torch.cat([ph_rows, pre_rows])
        starts = torch.cat([ph_start, new_pos[pre_rows, lead[pre_rows]] - n_img])
        bidir = torch.cat([torch.ones_like(ph_rows, dtype=torch.bool), torch.zeros_like(pre_rows, dtype=torch.bool)])
        order = torch.argsort(rows * (Lx + 1) + starts)
        rows, starts, bidir = rows[order], starts[order], bidir[order]
        if rows.numel() != image_tokens.shape[0]:
            raise ValueError(
                f"the id rows need {rows.numel()} images ({int(n_ph.sum())} placeholders + {pre_rows.numel()} "
                f"prefixed for rows without one) but {image_tokens.shape[0]} were given"
            )
        image_pos = starts[:, None] + torch.arange(n_img, device=device)

        embed = self.model.language_model.embed_tokens
        text_ids = torch.where(input_ids < 0, torch.zeros_like(input_ids), input_ids)
        embeds = embed.weight.new_zeros(B, Lx, embed.embedding_dim)
        text = ~is_ph
        embeds = embeds.index_put((torch.arange(B, device=device)[:, None].expand(B, L)[text], new_pos[text]),
                                  embed(text_ids[text]))
        embeds = embeds.index_put((rows[:, None].expand_as(image_pos), image_pos), image_tokens.to(embeds.dtype))

        valid = torch.zeros(B, Lx, dtype=torch.bool, device=device)
        valid[torch.arange(B, device=device)[:, None].expand(B, L)[valid_ids], new_pos[valid_ids]] = True
        valid[rows[:, None].expand_as(image_pos), image_pos] = True
        block = torch.zeros(B, Lx, dtype=torch.long, device=device)
        block_ids = torch.arange(1, rows.numel() + 1, device=device)[:, None].expand_as(image_pos)
        block[rows[:, None].expand_as(image_pos)[bidir], image_pos[bidir]] = block_ids[bidir]
        embeds = embeds.masked_fill(~valid[..., None], 0.0)  # padding carries nothing (as the reference)
        mask = self.attention_mask(valid, block)
        return SequenceLayout(embeds, mask, valid, rows, image_pos, new_pos)

    @staticmethod
    def attention_mask(valid: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """Boolean [B,1,L,L]: causal, plus bidirectional inside each image block (block id > 0), within the valid
        region; padding attends only to padding."""
        L = valid.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
        same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
        both_valid = valid[:, :, None] & valid[:, None, :]
        both_pad = ~valid[:, :, None] & ~valid[:, None, :]
        return ((causal | same_block) & both_valid | both_pad).unsqueeze(1)

    def ce_targets(self, labels: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """Next-token targets [B, L'-1] on the expanded sequence. Image positions are never labelled, and (as the
        reference does) the last image token does not predict `<im_end>`; `<im_end>` predicts what follows."""
        B, Lx = layout.valid.shape
        expanded = labels.new_full((B, Lx), IGNORE_INDEX)
        keep = labels.ne(IGNORE_INDEX) & (layout.token_pos >= 0)
        src = torch.where(labels < 0, torch.full_like(labels, IGNORE_INDEX), labels)  # placeholder labels
        r = torch.arange(B, device=labels.device)[:, None].expand_as(labels)
        expanded[r[keep], layout.token_pos[keep]] = src[keep]
        is_image = torch.zeros(B, Lx, dtype=torch.bool, device=labels.device)
        is_image[layout.image_rows[:, None].expand_as(layout.image_pos), layout.image_pos] = True
        expanded[is_image] = IGNORE_INDEX
        targets = expanded[:, 1:].clone()
        targets[is_image[:, :-1] & targets.eq(self.config.tokens.img_end)] = IGNORE_INDEX
        return targets

    # ---- training forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> CheersOutput:
        """Mixed-batch training forward (spec §D).

        input_ids [B, L] with -200 (read) / -300 (generate) placeholders; pixel_values [N, 3, R, R] in [0, 1]
        for every image in row-then-textual order (a row without placeholders contributes one prefixed image),
        or `latents` [N, c_lat, g, g] precomputed with `encode_images` (the VAE is frozen, so caching them is
        exact); t [N] per-image time (1 = read, 0 = noise); x0 [N, c_lat, g, g] noise (drawn if None).
        Loss = CE over labelled targets + flow_loss_weight * MSE(v, (x1 - x0)[t < 1]) over every image.
        """
        if latents is None:
            if pixel_values is None:
                raise ValueError("forward needs pixel_values or latents for the images of the batch")
            latents = self.encode_images(pixel_values)
        n = latents.shape[0]
        if t is None:
            raise ValueError("forward needs the per-image times t (1 for images read, U(0,1) for images generated)")
        t = t.reshape(n).to(latents.dtype)
        if x0 is None:
            x0 = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        tt = t.view(n, 1, 1, 1)
        x_t = tt * latents + (1 - tt) * x0
        target = (latents - x0) * (tt < 1).to(latents.dtype)

        reading = self.read_latents(x_t)
        lay = self.layout(input_ids, attention_mask, reading.tokens)
        hidden = self.model.language_model(lay.embeds, mask=lay.mask)

        image_hidden = hidden[lay.image_rows[:, None].expand_as(lay.image_pos), lay.image_pos]
        vel = self.velocity_head(image_hidden, t, reading.detail)
        flow_loss = F.mse_loss(vel.velocity.float(), target.float())

        logits = None
        ce_loss = hidden.new_zeros(())
        targets, n_ce = None, 0
        if labels is not None:
            targets = self.ce_targets(labels, lay)
            sel = targets.ne(IGNORE_INDEX)
            n_ce = int(sel.sum())
            if n_ce:
                # Only labelled positions go through the vocabulary projection.
                sel_logits = self.lm_head(hidden[:, :-1][sel]).float()
                ce_loss = F.cross_entropy(sel_logits, targets[sel], reduction="mean")
        if return_logits:
            logits = self.lm_head(hidden).float()
        loss = ce_loss + self.config.flow_loss_weight * flow_loss
        return CheersOutput(loss, ce_loss, flow_loss, vel.velocity, target, vel.gate, hidden, logits, targets, lay, n_ce)

    # ---- inference primitives (used by cheers.sampling; the fast output head lives in cheers.decoding) -------
    def new_cache(self) -> KVCache:
        return KVCache(self.config.text.num_layers)

    def channels_last_(self) -> "CheersModel":
        """Store the convolution stacks channels-last: ~30% faster convolutions with oneDNN on CPU."""
        for conv_stack in (self.model.vae_model, self.model.vae_decoder_projector):
            conv_stack.to(memory_format=torch.channels_last)
        return self

    def num_parameters(self, unique: bool = True) -> int:
        params = self.parameters() if unique else (p for _, p in self.named_parameters(remove_duplicate=False))
        return sum(p.numel() for p in params)
