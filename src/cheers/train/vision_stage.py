"""Vision pretraining: give a from-scratch ViT the semantic features the released model gets from SigLIP2.

The released Cheers starts from a pretrained SigLIP2 encoder; a tiny preset's ViT starts random, and the joint
stages alone do not make it semantic: the only signal reaching it is the CE of a few answer tokens through the
whole LLM plus the flow loss through the detail path, and after 13,000 joint steps the embedded model's ViT
features still did not linearly separate ShapesWorld shapes (held-out probe 0.35, chance 0.17). This stage
pretrains the ViT the way SigLIP was pretrained: a sigmoid image-text contrastive loss between the ViT's
attention-pooling head (`model.vision_representation.head`, in the checkpoint but unused by Cheers) and a small
text tower that exists only during this stage:

    zi = normalize(centre(head(ViT(image))))     zt = normalize(centre(TextTower(text)))   (centre: minus the batch mean)
    logits = exp(s) zi zt^T + b          labels = +1 where the two texts mean the same (`meaning_keys`: the
    loss = -sum log sigmoid(labels * logits) / B      diagonal, repeated captions, rephrased prompts), -1 elsewhere

(s, b start at log 10 and -10 as in SigLIP.) Images are the records' first pictures with the understanding
preprocessing; the text is the record's turns that hold no image (a caption answer, a generation prompt) without
the generation instruction; records whose text is shorter than `vision.min_text_words` words ("Yes", "B") are
passed over and counted. Only `model.vision_representation.*` trains. The contrastive loss couples
every sample of the batch, so this stage runs in one process with `grad_accum: 1`. The text tower, scale and
bias live in the training checkpoints (exact resume) and are dropped at export: the next stage starts from
`<output_dir>/export`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cheers import constants as C
from cheers.processor import ImageError, load_image, preprocess_understanding
from cheers.train import ckpt as ckpt_io
from cheers.train.data import DataError, parse_record
from cheers.train.feed import RecordFeed
from cheers.train.optim import select_trainable
from cheers.train.run import RunBase, build_model, load_tokenizer
from cheers.train.settings import TrainConfig, TrainConfigError


def pair_text(turns: list[tuple[str, str]], min_words: int = 2) -> str:
    """The text that describes a record's picture: its non-system turns that hold no image tag, joined, with the
    generation instruction removed. "" when that leaves fewer than `min_words` words (a one-word answer such as
    "Yes" or "B" describes nothing)."""
    text = " ".join(v.replace(C.GENERATION_INSTRUCTION, " ") for role, v in turns
                    if role != "system" and "<image" not in v)
    words = text.split()
    return " ".join(words) if len(words) >= min_words else ""


class TextTower(nn.Module):
    """Token embeddings + learned positions + a small pre-LN bidirectional transformer, mean-pooled."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_tokens: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.zeros(max_tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 3 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, T] (mask True = real token) -> [B, width]."""
        h = self.encoder(self.embed(ids) + self.positions[: ids.shape[1]], src_key_padding_mask=~mask)
        h = self.norm(h) * mask[..., None]
        return self.proj(h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1))


def meaning_keys(texts: list[str], key_words: list[str]) -> list[str]:
    """What decides that two texts describe the same picture. Without `key_words`: the exact text. With them
    (entries "word" or "word=canonical", e.g. "circles=circle", "two=2"): the sorted canonical key words a text
    contains, so "Draw a star." and "A photo of a star." are the same positive; texts without any key word keep
    their exact text."""
    if not key_words:
        return list(texts)
    canon = {}
    for entry in key_words:
        word, _, target = entry.partition("=")
        canon[word.strip().lower()] = (target or word).strip().lower()
    out = []
    for t in texts:
        found = sorted(canon[w] for w in re.findall(r"[a-z0-9]+", t.lower()) if w in canon)
        out.append(" ".join(found) if found else "\0" + t)
    return out


def _centred(e: torch.Tensor) -> torch.Tensor:
    return e - e.mean(0, keepdim=True) if e.shape[0] > 1 else e


class VisionPretraining(nn.Module):
    """What the stage trains and checkpoints: the Cheers model (only its ViT is trainable), the text tower and
    the learned logit scale and bias."""

    def __init__(self, cheers: nn.Module, text: TextTower):
        super().__init__()
        self.cheers = cheers
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                same_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sigmoid loss, image-to-text top-1 accuracy) of one batch."""
        vit = self.cheers.model.vision_representation
        # Batch-centred before normalizing: a ShapesWorld picture is mostly background, so at the start every
        # pooled image embedding is nearly the same vector (cosine ~0.92) and the uncentred loss stalls at chance.
        zi = F.normalize(_centred(vit.head(vit(pixels))), dim=-1)
        zt = F.normalize(_centred(self.text(ids, mask)), dim=-1)
        logits = zi @ zt.T * self.logit_scale.exp() + self.logit_bias
        labels = same_text.to(logits.dtype) * 2 - 1
        loss = -F.logsigmoid(labels * logits).sum() / pixels.shape[0]
        hit = same_text.gather(1, logits.argmax(1, keepdim=True)).float().mean()
        return loss, hit.detach()


class VisionTrainer(RunBase):
    kind = "vision"

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        super().__init__(cfg, resume)
        if self.info.distributed:
            raise TrainConfigError("the vision stage couples every sample of a batch in its loss; run it in one "
                                   "process (no torchrun)")
        if cfg.grad_accum != 1:
            raise TrainConfigError(f"the vision stage needs grad_accum: 1 (its loss is not a sum over samples), got "
                                   f"{cfg.grad_accum}")
        self.tokenizer = load_tokenizer(cfg)
        self.base, origin = build_model(cfg, self.tokenizer, self.info)
        trainable, _ = select_trainable(self.base, cfg.trainable.include, cfg.trainable.exclude)  # sets requires_grad
        outside = [n for n in trainable if not n.startswith("model.vision_representation.")]
        if outside:
            raise TrainConfigError(f"the vision stage trains the ViT only; trainable.include also selects {outside[:3]}")
        v = cfg.vision
        vit = self.base.config.vision
        tower = TextTower(self.tokenizer.vocab_size, vit.hidden_size, v.text_layers, vit.num_heads, v.max_text_tokens)
        self.model = VisionPretraining(self.base, tower).to(self.info.device)
        self._setup_optimizer(self.model)
        self.resolution = cfg.data.resolution or self.base.config.resolution
        self.feed = RecordFeed(cfg.data, cfg.seed)
        self.counters.update(records_without_pair=0, truncated_texts=0)
        self._start(origin, text_tower_params=sum(p.numel() for p in tower.parameters()))

    def _pair(self, record: Any) -> tuple[torch.Tensor, str] | None:
        try:
            parsed = parse_record(record)
            text = pair_text(parsed.turns, self.cfg.vision.min_text_words)
            if not parsed.images or not text:
                self.counters["records_without_pair"] += 1
                return None
            try:
                pixels = preprocess_understanding(load_image(parsed.images[0]), self.resolution)
            except (ImageError, OSError) as err:
                raise DataError(parsed.where, f"image unusable: {err}") from None
        except DataError as err:
            if self.cfg.data.on_bad_sample == "error":
                raise
            self.counters["bad_samples"] += 1
            self.log.event("bad_sample", step=self.step + 1, error=str(err))
            return None
        return pixels, text

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = []
        guard = 0
        while len(pairs) < self.cfg.micro_batch_size:
            need = self.cfg.micro_batch_size - len(pairs)
            got = [p for p in (self._pair(rec) for _, rec in self.feed.take(need)) if p is not None]
            guard = guard + 1 if not got else 0
            if guard > 100:
                raise TrainConfigError("the vision stage found no (picture, describing text) pair in 100 draws in "
                                       "a row: give it captioned or generation sources")
            pairs += got
        texts = [t for _, t in pairs]
        limit = self.cfg.vision.max_text_tokens
        encoded = [self.tokenizer.encode(t) for t in texts]
        self.counters["truncated_texts"] += sum(len(e) > limit for e in encoded)
        encoded = [e[:limit] for e in encoded]
        length = max(len(e) for e in encoded)
        ids = torch.zeros(len(encoded), length, dtype=torch.long)
        mask = torch.zeros(len(encoded), length, dtype=torch.bool)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, : len(e)] = True
        keys = meaning_keys(texts, self.cfg.vision.key_words)
        same = torch.tensor([[a == b for b in keys] for a in keys])
        dev = self.info.device
        return torch.stack([p for p, _ in pairs]).to(dev), ids.to(dev), mask.to(dev), same.to(dev)

    def train_step(self) -> dict[str, float]:
        pixels, ids, mask, same = self._batch()
        loss, hit = self.model(pixels, ids, mask, same)
        if self.cfg.debug.inject_nan_at_step is not None and self.step + 1 == self.cfg.debug.inject_nan_at_step:
            loss = loss * float("nan")
        loss.backward()
        value = float(loss.detach())
        grad_norm, finite = self.optimizer_step(value)
        return {"loss": value, "retrieval_top1": float(hit), "logit_scale": float(self.model.logit_scale.detach().exp()),
                "logit_bias": float(self.model.logit_bias.detach()), "grad_norm": grad_norm, "finite": finite,
                "images": pixels.shape[0]}

    def export(self):
        # Only the Cheers model leaves the stage (the text tower, scale and bias stay in the checkpoints).
        path = ckpt_io.export_model(self.base, self.base, self.out / "export", self.info, self.tokenizer)
        self.log.event("export", step=self.step, path=str(path))
        return path

    def fit(self) -> dict[str, Any]:
        return self.fit_plain()
