"""Training data of Cheers: the official JSON-lines format (spec §D.3) turned into model batches.

Pipeline (each stage has `state_dict()` / `load_state_dict()` so a run resumes at the exact same sample):

    JsonlSource(path, data_root)  ─┐
    JsonlSource(...)              ─┼─ MixedSource({name: (source, weight)}, seed)   raw lines + "file:line"
                                   │
    SampleStream(source, SampleBuilder(tokenizer, R, N_img, ...), on_bad_sample)   validated `Sample`s
        .batches(batch_size)  ->  collate(samples, pad_id)  ->  {input_ids, attention_mask, labels, pixel_values, t}

Record format, one JSON object per line::

    {"id": "...", "image": "a.png" | "src.png, tgt.png" | ["a.png", ...] | null,
     "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}

Images are matched to the `<image>` (read) / `<image_gen>` (generate) tags of the conversation in textual order.
Relative image paths are resolved against the source's `data_root` (default: the folder of the jsonl file).

Conventions (golden e of the parity set, chat template "rae_qwen"):

* rendered conversation: default system turn unless the first turn is "system", then
  `<|im_start|>{role}\\n{value.strip()}<|im_end|>\\n` per turn;
* labels: assistant turns are labelled completely (header and closing `<|im_end|>\\n` included, with the ids of
  the tokens as written, so an `<image_gen>` of an assistant turn is labelled with the `<image_gen>` id while its
  input id is -300); in other turns only newline, `<|im_start|>`, `<|im_end|>`, `<im_start>`, `<im_end>` and
  `<no_mean>` are labelled; everything else is -100. Labels are not shifted; the model realigns them;
* `<image>` -> -200 and `<image_gen>` -> -300 placeholders in `input_ids`, each expanded by the model to
  `num_image_tokens` positions; a sample without placeholder carries one black dummy image the model prepends;
* per-image `t`: read 1.0, generated U(0, 1) clamped to [1e-6, 1 - 1e-6], dummy 0.0;
* CFG dropout (spec §D.2): in samples with an image to generate, with probability `cfg_dropout` every input id
  except -300, -200, `<im_start>` and `<im_end>` becomes `<no_mean>`; labels unchanged.

Records and their validation are `cheers.train.records`, the sources `cheers.train.sources`; this module turns
records into samples and batches, and re-exports the names of the whole pipeline.

Bad data never passes silently: every problem is a `DataError("file:line: cause")`. With
`on_bad_sample="skip"` the sample is logged (logger `cheers.data`) and counted (`SampleStream.skipped`) instead.
Samples longer than `max_length` after image expansion are bad samples too (never truncated).

Randomness (shuffling, mixing, t, CFG dropout) is a pure function of the seeds and of positions in the stream, so
resuming from a state dict reproduces exactly the samples an uninterrupted run would have produced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cheers import constants as C
from cheers.config import TokenIds
from cheers.processor import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    load_image,
    preprocess_generation,
    preprocess_understanding,
)
from cheers.train.records import DataError, ParsedRecord, Record, check_turns, parse_record
from cheers.train.sources import JsonlSource, MixedSource

__all__ = [
    "DataError",
    "Record",
    "ParsedRecord",
    "Sample",
    "JsonlSource",
    "MixedSource",
    "SampleBuilder",
    "SampleStream",
    "encode_conversation",
    "cfg_dropout",
    "collate",
    "parse_record",
    "T_MIN",
    "T_MAX",
]

logger = logging.getLogger("cheers.data")

T_MIN, T_MAX = 1e-6, 1.0 - 1e-6
T_SAMPLINGS = ("uniform", "logit_normal")
BAD_SAMPLE_POLICIES = ("error", "skip")


def _seed_int(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across processes and platforms)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---- tokenization and labels --------------------------------------------------------------------------------------


def _always_labelled(t: TokenIds) -> torch.Tensor:
    return torch.tensor([t.newline, t.chat_start, t.chat_end, t.img_start, t.img_end, t.no_mean], dtype=torch.long)


def encode_conversation(
    conversations: Sequence[Mapping[str, str]],
    tokenizer: Any,
    system_prompt: str = C.DEFAULT_SYSTEM_PROMPT,
    where: str = "<conversation>",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and labels (1-D LongTensors of equal length) of one training conversation (template "rae_qwen").

    `conversations` are `{"from": "human"|"gpt"|"system", "value"}` turns (or `{"role", "content"}`).
    `<image>` / `<image_gen>` become -200 / -300 in the ids; see the module docstring for the labels.
    `tokenizer` is a `CheersTokenizer` (its `token_ids` decide every special id).
    """
    try:
        turns = check_turns(list(conversations))
    except ValueError as err:
        raise DataError(where, str(err)) from None
    return _encode_turns(turns, tokenizer, system_prompt)


def _encode_turns(
    turns: Sequence[tuple[str, str]], tokenizer: Any, system_prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    tid: TokenIds = tokenizer.token_ids
    if turns[0][0] != "system":
        turns = [("system", system_prompt)] + list(turns)
    texts = [f"<|im_start|>{role}\n{value.strip()}<|im_end|>\n" for role, value in turns]
    # one call per turn (not encode_batch: its thread pool does not survive forked data-loader workers)
    pieces = [torch.tensor(tokenizer.encode(text), dtype=torch.long) for text in texts]
    ids = torch.cat(pieces)
    assistant = torch.repeat_interleave(
        torch.tensor([role == "assistant" for role, _ in turns]), torch.tensor([len(p) for p in pieces])
    )
    labelled = assistant | torch.isin(ids, _always_labelled(tid))
    labels = torch.where(labelled, ids, torch.full_like(ids, C.IGNORE_INDEX))
    input_ids = torch.where(ids == tid.image, torch.full_like(ids, C.IMAGE_PLACEHOLDER), ids)
    input_ids = torch.where(ids == tid.image_gen, torch.full_like(ids, C.IMAGE_GEN_PLACEHOLDER), input_ids)
    return input_ids, labels


# ---- CFG dropout --------------------------------------------------------------------------------------------------


def cfg_dropout(
    input_ids: torch.Tensor,
    token_ids: TokenIds,
    p: float = 0.2,
    generator: torch.Generator | None = None,
    eligible: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free-guidance dropout of whole prompts (spec §D.2).

    `input_ids` is [L] or [B, L]. A row is eligible when it contains an image to generate (-300) unless
    `eligible` ([B] bool) says otherwise; each eligible row is dropped with probability `p` (one uniform draw per
    row from `generator`, drawn for every row so that the stream of draws does not depend on eligibility). In a
    dropped row every id except -300, -200, `<im_start>` and `<im_end>` (and padding, where `attention_mask` is
    0) becomes `<no_mean>`. Returns (new ids, dropped [B] or [] bool). Labels are not touched.
    """
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    if eligible is None:
        eligible = (ids == C.IMAGE_GEN_PLACEHOLDER).any(dim=1)
    else:
        eligible = eligible.reshape(-1).to(torch.bool)
    u = torch.rand(ids.shape[0], generator=generator)
    dropped = (u < p) & eligible
    keep_ids = torch.tensor(
        [C.IMAGE_GEN_PLACEHOLDER, C.IMAGE_PLACEHOLDER, token_ids.img_start, token_ids.img_end], dtype=ids.dtype
    )
    replace = dropped[:, None] & ~torch.isin(ids, keep_ids)
    if attention_mask is not None:
        am = attention_mask.unsqueeze(0) if squeeze else attention_mask
        replace &= am.to(torch.bool)
    out = torch.where(replace, torch.full_like(ids, token_ids.no_mean), ids)
    return (out[0], dropped[0]) if squeeze else (out, dropped)


# ---- samples --------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One training sample, ready for `collate`."""

    input_ids: torch.Tensor  # [L] long, images as -200 / -300
    labels: torch.Tensor  # [L] long, -100 = ignored (unshifted)
    pixel_values: torch.Tensor  # [n_img, 3, R, R] float in [0, 1]; one black dummy if the sample has no image
    t: torch.Tensor  # [n_img] float
    id: str = ""
    where: str = ""
    source: str = ""
    cfg_dropped: bool = False

    @property
    def num_placeholders(self) -> int:
        return int((self.input_ids < 0).sum())

    def expanded_length(self, num_image_tokens: int) -> int:
        return _expanded_length(len(self.input_ids), self.num_placeholders, num_image_tokens)


def _expanded_length(n_ids: int, n_placeholders: int, num_image_tokens: int) -> int:
    """Sequence length the model sees: placeholders expanded, or the dummy image prepended."""
    if n_placeholders == 0:
        return n_ids + num_image_tokens
    return n_ids + n_placeholders * (num_image_tokens - 1)


class SampleBuilder:
    """Turns records into `Sample`s: validation, tokenization, labels, images, t, CFG dropout.

    `resolution` and `num_image_tokens` come from the model config (`SampleBuilder.from_config`). `max_length`
    bounds the expanded length (None = no bound). `bad_image="black"` replaces a missing or unreadable image file
    by a black picture (the reference does this for missing files), logged and counted in `black_images`, instead
    of the default error. Random draws of sample number `index` use a generator seeded from (seed, index).
    """

    def __init__(
        self,
        tokenizer: Any,
        resolution: int,
        num_image_tokens: int,
        max_length: int | None = None,
        cfg_dropout: float = 0.2,
        seed: int = 0,
        bad_image: str = "error",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        system_prompt: str = C.DEFAULT_SYSTEM_PROMPT,
        t_sampling: str = "uniform",
        t_mean: float = 0.0,
        t_std: float = 1.0,
        t_uniform: float = 0.0,
    ):
        if bad_image not in ("error", "black"):
            raise ValueError(f"bad_image must be 'error' or 'black', got {bad_image!r}")
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {', '.join(T_SAMPLINGS)}, got {t_sampling!r}")
        if not t_std > 0:
            raise ValueError(f"t_std must be > 0, got {t_std}")
        if not 0.0 <= t_uniform <= 1.0:
            raise ValueError(f"t_uniform must be in [0, 1], got {t_uniform}")
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {cfg_dropout}")
        self.tokenizer = tokenizer
        self.token_ids: TokenIds = tokenizer.token_ids
        self.resolution = int(resolution)
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = max_length
        self.cfg_dropout = float(cfg_dropout)
        self.seed = int(seed)
        self.bad_image = bad_image
        self.black_images = 0  # images replaced by black pictures under bad_image="black"
        self.max_pixels = max_pixels
        self.system_prompt = system_prompt
        self.t_sampling, self.t_mean, self.t_std = t_sampling, float(t_mean), float(t_std)
        self.t_uniform = float(t_uniform)

    def draw_t(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Flow times of n images to generate: uniform on (0, 1), or logit-normal, sigmoid(N(t_mean, t_std^2))
        (t_mean < 0 puts more of the training near the noise, where a picture's layout and shapes are chosen).
        With t_uniform > 0, that share of the logit-normal draws is uniform instead, so the late, detail-setting
        part of the path keeps some training."""
        if self.t_sampling == "uniform":
            t = torch.rand(n, generator=g)
        else:
            t = torch.sigmoid(self.t_mean + self.t_std * torch.randn(n, generator=g))
            if self.t_uniform > 0:  # drawn only when asked, so existing configs keep their random stream
                uniform = torch.rand(n, generator=g)
                t = torch.where(torch.rand(n, generator=g) < self.t_uniform, uniform, t)
        return t.clamp_(T_MIN, T_MAX)

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any, **kwargs: Any) -> "SampleBuilder":
        """Resolution and image-token count of a `CheersConfig`."""
        return cls(tokenizer, config.resolution, config.num_image_tokens, **kwargs)

    def generator(self, index: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(_seed_int(self.seed, index))
        return g

    def build(self, record: Record, index: int = 0) -> Sample:
        """Validate and build one sample; `DataError(file:line, cause)` on any problem."""
        parsed = parse_record(record)
        where = parsed.where
        input_ids, labels = _encode_turns(parsed.turns, self.tokenizer, self.system_prompt)
        kinds = input_ids[input_ids < 0].tolist()  # placeholders in textual order
        n_read = kinds.count(C.IMAGE_PLACEHOLDER)
        n_gen = kinds.count(C.IMAGE_GEN_PLACEHOLDER)
        if len(kinds) != len(parsed.images):
            raise DataError(
                where,
                f"{len(kinds)} image tag(s) in the conversation (<image> x{n_read}, <image_gen> x{n_gen}) "
                f"but {len(parsed.images)} image path(s)",
            )
        length = _expanded_length(len(input_ids), len(kinds), self.num_image_tokens)
        if self.max_length is not None and length > self.max_length:
            raise DataError(
                where,
                f"sample too long: {length} positions after image expansion ({len(input_ids)} ids, "
                f"{max(len(kinds), 1)} image(s) x {self.num_image_tokens} tokens) > max_length {self.max_length}",
            )
        g = self.generator(index)
        dropped = False
        if self.cfg_dropout > 0 and n_gen > 0:
            input_ids, d = cfg_dropout(input_ids, self.token_ids, self.cfg_dropout, g)
            dropped = bool(d)
        pixels = []
        r = self.resolution
        for k, (kind, path) in enumerate(zip(kinds, parsed.images)):
            pixels.append(self._image(path, kind == C.IMAGE_GEN_PLACEHOLDER, where, k, len(kinds)))
        if kinds:
            t = torch.ones(len(kinds))
            gen = torch.tensor([k == C.IMAGE_GEN_PLACEHOLDER for k in kinds])
            if gen.any():
                t[gen] = self.draw_t(int(gen.sum()), g)
            pixel_values = torch.stack(pixels)
        else:
            t = torch.zeros(1)
            pixel_values = torch.zeros(1, 3, r, r)
        return Sample(
            input_ids=input_ids,
            labels=labels,
            pixel_values=pixel_values,
            t=t,
            id=parsed.id,
            where=where,
            source=record.source,
            cfg_dropped=dropped,
        )

    def _image(self, path: Path, generate: bool, where: str, k: int, n: int) -> torch.Tensor:
        role = "image to generate" if generate else "image"
        try:
            if not path.exists():
                raise DataError(where, f"{role} {k + 1}/{n} not found: {path}")
            try:
                img = load_image(path, max_pixels=self.max_pixels)
            except ImageError as err:
                raise DataError(where, f"{role} {k + 1}/{n} unusable: {err}") from None
        except DataError as err:
            if self.bad_image == "error":
                raise
            self.black_images += 1
            logger.warning("%s; using a black picture", err)
            return torch.zeros(3, self.resolution, self.resolution)
        if generate:
            return preprocess_generation(img, self.resolution)
        return preprocess_understanding(img, self.resolution)


class SampleStream:
    """Built samples from a source, with the bad-sample policy applied.

    `on_bad_sample="error"` raises the `DataError`; `"skip"` logs it (with file:line and cause), counts it in
    `skipped` and keeps the last `keep_skipped` messages in `skipped_samples`. `max_consecutive_bad` bad records
    in a row raise anyway (a broken dataset must not spin forever).
    """

    def __init__(
        self,
        source: Any,
        builder: SampleBuilder,
        on_bad_sample: str = "error",
        max_consecutive_bad: int = 1000,
        keep_skipped: int = 1000,
    ):
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        self.source = source
        self.builder = builder
        self.on_bad_sample = on_bad_sample
        self.max_consecutive_bad = int(max_consecutive_bad)
        self.keep_skipped = int(keep_skipped)
        self.drawn = 0  # records taken from the source (index of the next record's random generator)
        self.built = 0
        self.skipped = 0
        self.skipped_samples: list[str] = []

    def __iter__(self) -> "SampleStream":
        return self

    def __next__(self) -> Sample:
        bad_run = 0
        while True:
            record = next(self.source)
            index = self.drawn
            self.drawn += 1
            try:
                sample = self.builder.build(record, index)
            except DataError as err:
                if self.on_bad_sample == "error":
                    raise
                self.skipped += 1
                self.skipped_samples.append(str(err))
                del self.skipped_samples[: -self.keep_skipped or None]
                logger.warning("skipping bad sample %s", err)
                bad_run += 1
                if bad_run >= self.max_consecutive_bad:
                    raise DataError(err.where, f"{bad_run} bad samples in a row; last: {err.cause}") from None
                continue
            self.built += 1
            return sample

    def batches(self, batch_size: int, pad_id: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches of `batch_size` samples (the last one may be smaller when the source ends)."""
        pad = self.builder.token_ids.pad if pad_id is None else pad_id
        while True:
            samples = []
            for _ in range(batch_size):
                try:
                    samples.append(next(self))
                except StopIteration:
                    break
            if not samples:
                return
            yield collate(samples, pad)
            if len(samples) < batch_size:
                return

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "samples",
            "source": self.source.state_dict(),
            "drawn": self.drawn,
            "built": self.built,
            "skipped": self.skipped,
            "skipped_samples": list(self.skipped_samples),
            "black_images": self.builder.black_images,
            "seed": self.builder.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "samples":
            raise ValueError(f"not a SampleStream state: kind={state.get('kind')!r}")
        if state["seed"] != self.builder.seed:
            raise ValueError(f"state saved with builder seed {state['seed']}, builder has {self.builder.seed}")
        self.source.load_state_dict(state["source"])
        self.drawn = int(state["drawn"])
        self.built = int(state["built"])
        self.skipped = int(state["skipped"])
        self.skipped_samples = list(state.get("skipped_samples", []))
        self.builder.black_images = int(state.get("black_images", 0))


# ---- batching -----------------------------------------------------------------------------------------------------


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into the model's batch:

    * `input_ids` [B, L] long (pad_id after the end), `attention_mask` [B, L] long (1 = real token),
      `labels` [B, L] long (-100 on padding);
    * `pixel_values` [N_img, 3, R, R]: the images of row 0 in textual order, then row 1, ...; a row without
      placeholder contributes exactly its one dummy image; `t` [N_img].
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    for k, s in enumerate(samples):
        n_ph = s.num_placeholders
        want = max(n_ph, 1)
        if s.pixel_values.dim() != 4 or s.pixel_values.shape[0] != want or s.t.shape != (want,):
            raise ValueError(
                f"sample {k} ({s.where or s.id}): {n_ph} placeholder(s) need {want} image(s) and t values, "
                f"got pixel_values {tuple(s.pixel_values.shape)} and t {tuple(s.t.shape)}"
            )
        if s.labels.shape != s.input_ids.shape:
            raise ValueError(f"sample {k} ({s.where or s.id}): labels {tuple(s.labels.shape)} != ids {tuple(s.input_ids.shape)}")
    shapes = {tuple(s.pixel_values.shape[1:]) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples have images of different sizes: {sorted(shapes)}")
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    input_ids = torch.nn.utils.rnn.pad_sequence([s.input_ids for s in samples], batch_first=True, padding_value=pad_id)
    labels = torch.nn.utils.rnn.pad_sequence(
        [s.labels for s in samples], batch_first=True, padding_value=C.IGNORE_INDEX
    )
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return {
        "input_ids": input_ids.long(),
        "attention_mask": attention_mask,
        "labels": labels.long(),
        "pixel_values": torch.cat([s.pixel_values for s in samples]).float(),
        "t": torch.cat([s.t for s in samples]).float(),
    }
