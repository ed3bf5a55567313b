"""The public API: `Cheers.from_pretrained(path)` then `generate_image`, `answer`, `chat`, `edit`.

Every task is batched: prompts are left-padded into one prefill, text-to-image and editing run their conditional
and unconditional rows in one forward per step with the image read once, and text decoding shares one KV cache.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from cheers import sampling as S
from cheers.adapters import PipelineAdapters
from cheers.checkpoint import CheckpointError, load_model, save_model
from cheers.config import PRESETS, CheersConfig, preset
from cheers.decoding import OutputHead
from cheers.defaults import (DType, ImageDefaults, TextDefaults, check_edit_start, read_defaults, resolve_dtype,
                             stored_dtype, write_defaults)
from cheers.hub import push_to_hub, resolve_model_dir
from cheers.model.cheers import CheersModel
from cheers.processor import dummy_image, load_image, preprocess_understanding, tensor_to_pil
from cheers.quantize import QuantSpec, footprint
from cheers.quantize import parse_spec as parse_quantize
from cheers.quantize import random_model as random_quantized
from cheers.samplers import evaluations, get_sampler
from cheers.tokenizer import CheersTokenizer

ImageLike = Image.Image | str | os.PathLike | bytes
Message = Mapping[str, Any]
Progress = bool | Callable[[int], None]  # a progress bar, or a per-step callback that may raise to abort

# Where the embedded default model lives (trained by our own trainer; see recipes/cheers-shapes).
EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "cheers-shapes"


OUTPUT_TYPES = ("pil", "latent")


def check_output_type(value: Any) -> str:
    if value not in OUTPUT_TYPES:
        raise ValueError(f"output_type {value!r}: expected one of {', '.join(OUTPUT_TYPES)}")
    return value


def _join(batches: list, output_type: str) -> list[Image.Image] | torch.Tensor:
    return torch.cat(batches) if output_type == "latent" else [im for b in batches for im in b]


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Cheers(PipelineAdapters):
    """A loaded Cheers model with its tokenizer, ready for the four tasks (LoRA adapters: `PipelineAdapters`)."""

    def __init__(self, model: CheersModel, tokenizer: CheersTokenizer | None, device: str | torch.device = "cpu",
                 dtype: DType = None, image_defaults: ImageDefaults | None = None,
                 text_defaults: TextDefaults | None = None, source: str = "<memory>") -> None:
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device, model.config.torch_dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.device.type == "cuda" and self.dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 on a GPU: TF32 tensor cores for the matmuls
            torch.backends.cudnn.allow_tf32 = True
        if self.device.type == "cpu":
            self.model.channels_last_()
        self.head = OutputHead(self.model)  # the output head's fast inference paths (compiled by `compile`)
        self.tokenizer = tokenizer
        self.config: CheersConfig = model.config
        self.image_defaults = image_defaults or ImageDefaults()
        self.text_defaults = text_defaults or TextDefaults()
        self.source = source
        if tokenizer is not None and tokenizer.token_ids != self.config.tokens:
            raise CheckpointError(
                f"{source}: tokenizer special ids {tokenizer.token_ids} differ from config.json's {self.config.tokens}"
            )

    # ---- loading --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        dtype: DType = "auto", tokenizer: str | os.PathLike | None = None, compile: bool = False,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, token: str | bool | None = None,
                        adapter: str | os.PathLike | None = None,
                        quantize: str | QuantSpec | None = None) -> "Cheers":
        """Load a model: a local directory (official format + tokenizer files), a Hugging Face Hub repo id
        (e.g. "ai9stars/Cheers"; downloads only the files the model needs, into the HF cache), the embedded
        default (None), or a named preset with random weights (for benchmarks and tests; text tasks then need
        `tokenizer`). An existing local directory wins over a repo id of the same name.

        `dtype`: "auto" (the checkpoint's dtype on CUDA, float32 on CPU), "float32", "bfloat16" or "float16":
        the weights are held in it, with no float32 copy. `compile=True`: `OutputHead.compile` (faster decoding
        after a one-time compile). `revision`, `cache_dir`, `local_files_only`, `token`: as in huggingface_hub
        (HF_HOME, HF_HUB_OFFLINE and HF_TOKEN are honoured). `adapter`: a PEFT LoRA adapter (directory or repo
        id) applied on top, as the active adapter "default" (`load_adapter` adds more). `quantize`: "int8",
        "int8-weight", "int4-weight" or "fp8" (optionally with module patterns, see `cheers.quantize.parse_spec`):
        the linear layers are quantized as they load; a quantized checkpoint loads as stored."""
        device = torch.device(device)
        if name_or_path is None:
            if not (EMBEDDED_DIR / "config.json").exists():
                raise CheckpointError(f"the embedded model is missing from {EMBEDDED_DIR}; pass --model DIR")
            name_or_path = EMBEDDED_DIR
        if isinstance(name_or_path, str) and name_or_path in PRESETS and not Path(name_or_path).exists():
            spec = parse_quantize(quantize)
            model = random_quantized(preset(name_or_path), spec, device) if spec else CheersModel(preset(name_or_path))
            tok = CheersTokenizer.from_dir(tokenizer) if tokenizer else None
            pipe = cls(model, tok, device, dtype, source=f"preset:{name_or_path}")
        else:
            path = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir,
                                     local_files_only=local_files_only, token=token)
            stored = stored_dtype(path)
            model = load_model(path, dtype=resolve_dtype(dtype, device, stored), device=device, quantize=quantize)
            tok_dir = Path(tokenizer) if tokenizer else path
            tok = CheersTokenizer.from_dir(tok_dir) if _has_tokenizer(tok_dir) else None
            img_d, txt_d = read_defaults(path, model.config)
            pipe = cls(model, tok, device, dtype, img_d, txt_d, source=str(path))
        if adapter is not None:
            pipe.load_adapter(adapter, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        if compile:
            pipe.head.compile()
        return pipe

    def save_pretrained(self, directory: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3,
                        dtype: DType = None) -> Path:
        """Write a complete model directory that `from_pretrained` reloads with identical outputs: config.json
        (with the weights' real `torch_dtype`), sharded safetensors + index, tokenizer files,
        generation_config.json and preprocessor_config.json. `dtype` casts the stored weights (default: as held)."""
        self._require_no_adapters("save_pretrained")
        directory = Path(directory)
        store = self.dtype if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
        save_model(self.model, directory, max_shard_bytes=max_shard_bytes, dtype=store)
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        write_defaults(directory, self.image_defaults, self.text_defaults, self.config)
        return directory

    def push_to_hub(self, repo_id: str, token: str | None = None, revision: str | None = None,
                    private: bool | None = None, commit_message: str = "Upload Cheers model") -> Any:
        """`save_pretrained` into a temporary directory, then upload it with huggingface_hub (creating the repo,
        and the branch `revision`, when missing); returns huggingface_hub's `CommitInfo`."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_to_hub(tmp, repo_id, token=token, revision=revision, private=private,
                               commit_message=commit_message)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _tok(self) -> CheersTokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: this model has no tokenizer files; pass tokenizer=DIR to from_pretrained")
        return self.tokenizer

    def _latents(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(pixels).to(self.device, self.dtype)
        return self.model.encode_images(batch)

    def _read_images(self, images: Sequence[ImageLike]) -> list[torch.Tensor]:
        R = self.config.resolution
        return [preprocess_understanding(load_image(im) if not isinstance(im, Image.Image) else im, R) for im in images]

    def _check_length(self, rows: list[list[int]], extra: int, what: str) -> None:
        n_img = self.config.num_image_tokens
        limit = self.config.text.max_position_embeddings
        for i, r in enumerate(rows):
            n_ph = sum(1 for x in r if x < 0)
            length = len(r) - n_ph + n_img * max(n_ph, 1) + extra
            if length > limit:
                raise ValueError(
                    f"{what} {i}: {length} positions (prompt {len(r)} ids, images {n_img} each, +{extra} to "
                    f"generate) exceed the model's {limit}; shorten the prompt or lower max_new_tokens"
                )

    def _prefill(self, rows: list[list[int]], latents: torch.Tensor) -> S.Prefix:
        ids, mask = S.left_pad(rows, self.config.tokens.pad, self.device)
        return S.prefill(self.model, ids, mask, latents)

    # ---- text-to-image --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_image(self, prompts: str | Sequence[str], seed: int | Sequence[int] = 0, steps: int | None = None,
                       cfg_scale: float | None = None, shift: float | None = None, sampler: str | None = None,
                       batch_size: int = 16, progress: Progress = False, noise: torch.Tensor | None = None,
                       cfg_interval: tuple[float, float] | None = None,
                       output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        """One image per prompt. `seed` is an int (image i uses seed + i) or one seed per prompt; it draws the
        initial latent noise (unless `noise` [N, c_lat, g, g] is given) and the prompt's dummy noise picture.
        `output_type`: "pil" (images) or "latent" (the final latents [N, c_lat, g, g], float32). `progress`: True for
        a progress bar, or a callable called with each denoising step's index (it may raise to abort the call)."""
        check_output_type(output_type)
        prompts = _as_list(prompts)
        seeds = self._seeds(seed, len(prompts))
        tok = self._tok()
        rows = [tok.encode_prompt(p, task="t2i") for p in prompts]
        self._check_length(rows, self.config.num_image_tokens + 1, "prompt")
        out: list = []
        for lo in range(0, len(rows), batch_size):
            sl = slice(lo, lo + batch_size)
            lat = self._latents(self._row_images(rows[sl], seeds[sl]))
            x = self._noise(seeds[sl], noise, sl)
            out.append(self._sample(rows[sl], lat, x, seeds[sl], t0=0.0, steps=steps, cfg_scale=cfg_scale,
                                    shift=shift, sampler=sampler, progress=progress, cfg_interval=cfg_interval,
                                    output_type=output_type))
        return _join(out, output_type)

    def _noise(self, seeds: list[int], given: torch.Tensor | None, sl: slice) -> torch.Tensor:
        """Initial noise in float32 (the ODE state stays float32 whatever the weights' dtype: cheap, and more
        accurate than the reference's bf16 state)."""
        if given is None:
            return S.noise(self._latent_shape(), seeds, self.device)
        return given[sl].to(self.device, torch.float32)

    def _latent_shape(self) -> tuple[int, int, int]:
        g = self.config.grid
        return (self.config.latent_channels, g, g)

    def _seeds(self, seed: int | Sequence[int], n: int) -> list[int]:
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise ValueError(f"{n} prompts but {len(seed)} seeds")
            return [int(s) for s in seed]
        return [int(seed) + i for i in range(n)]

    def _sample(self, rows: list[list[int]], latents: torch.Tensor, x: torch.Tensor, seeds: list[int], t0: float,
                steps: int | None, cfg_scale: float | None, shift: float | None, sampler: str | None,
                progress: Progress, edit: bool = False, cfg_interval: tuple[float, float] | None = None,
                output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        d = self.image_defaults
        interval = S.guidance_interval(d.cfg_interval if cfg_interval is None else cfg_interval)  # before prefill
        steps = d.steps if steps is None else int(steps)
        cfg_scale = d.cfg_scale if cfg_scale is None else float(cfg_scale)
        shift = d.shift if shift is None else float(shift)
        sampler = sampler or d.sampler
        get_sampler(sampler)  # an unknown name fails before any model work
        if edit:
            steps = max(1, math.floor((1 - t0) * steps))  # the reference runs floor(0.9 N) steps from t0 = 0.1
        tk = self.config.tokens
        guided = cfg_scale != 1.0
        all_rows = rows + (S.cfg_rows(rows, {tk.img_start, tk.img_end}, tk.no_mean) if guided else [])
        all_lat = torch.cat([latents, latents]) if guided else latents
        prefix = self._prefill(all_rows, all_lat)
        velocity = S.GuidedVelocity(self.model, prefix, cfg_scale, guided, interval=interval)
        grid = S.time_grid(steps, shift, t0=t0)
        bar = None
        if progress is True:
            from tqdm import tqdm

            n_evals = evaluations(sampler, len(grid))
            bar = tqdm(total=len(grid), desc=f"denoising ({n_evals} evaluations)", leave=False)
        x = S.integrate(velocity, x, grid, sampler,
                        progress=progress if callable(progress) else (lambda i: bar.update(1)) if bar else None,
                        seeds=seeds)
        if bar:
            bar.close()
        if output_type == "latent":
            return x.float()
        pixels = self.model.decode_latents(x.to(self.dtype)).float()
        return [tensor_to_pil(p) for p in pixels]

    # ---- editing --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, images: ImageLike | Sequence[ImageLike], instructions: str | Sequence[str],
             seed: int | Sequence[int] = 0, steps: int | None = None, cfg_scale: float | None = None,
             shift: float | None = None, sampler: str | None = None, batch_size: int = 16,
             progress: Progress = False, noise: torch.Tensor | None = None,
             cfg_interval: tuple[float, float] | None = None, edit_start: float | None = None,
             output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        """Edit each source image by its instruction (spec §E.3): sampling starts at t0 from t0 z + (1 - t0) noise
        and runs floor((1 - t0) N) steps. t0 = `edit_start` (default: the model's, the reference's 0.1); a larger t0
        keeps more of the source picture (layout, colours) and leaves the instruction less room. `output_type` as in
        `generate_image`."""
        check_output_type(output_type)
        t0 = self.image_defaults.edit_start if edit_start is None else check_edit_start(edit_start)
        images, instructions = _as_list(images), _as_list(instructions)
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        seeds = self._seeds(seed, len(images))
        tok = self._tok()
        rows = [tok.encode_prompt(f"<im_start><image><im_end>\n{ins}", task="edit") for ins in instructions]
        self._check_length(rows, self.config.num_image_tokens + 1, "instruction")
        pixels = self._read_images(images)
        out: list = []
        for lo in range(0, len(rows), batch_size):
            sl = slice(lo, lo + batch_size)
            z = self._latents(pixels[sl])
            x = t0 * z.float() + (1 - t0) * self._noise(seeds[sl], noise, sl)
            out.append(self._sample(rows[sl], z, x, seeds[sl], t0=t0, steps=steps, cfg_scale=cfg_scale,
                                    shift=shift, sampler=sampler, progress=progress, edit=True,
                                    cfg_interval=cfg_interval, output_type=output_type))
        return _join(out, output_type)

    # ---- text -----------------------------------------------------------------------------------------------
    def _sampling(self, kw: dict[str, Any]) -> tuple[S.TextSampling, list[str]]:
        d = self.text_defaults
        stop = _as_list(kw.pop("stop", None) or [])
        unknown = set(kw) - {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                             "speculate"}
        if unknown:
            raise TypeError(f"unknown text sampling option(s): {', '.join(sorted(unknown))}")
        s = S.TextSampling(
            max_new_tokens=int(kw.get("max_new_tokens", d.max_new_tokens)),
            temperature=float(kw.get("temperature", d.temperature)),
            top_k=int(kw.get("top_k", d.top_k)),
            top_p=float(kw.get("top_p", d.top_p)),
            repetition_penalty=float(kw.get("repetition_penalty", d.repetition_penalty)),
            stop_ids=tuple(dict.fromkeys((self.config.tokens.chat_end, *d.stop_ids))),
            seed=kw.get("seed", 0),
            speculate=None if kw.get("speculate") is None else int(kw["speculate"]),
        )
        if not 0 < s.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
        if s.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
        return s, [str(x) for x in stop]

    def _text_rows(self, conversations: list[list[Message]]) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Ids and image pixels of each conversation. A message may carry `images` (PIL/paths), placed before its
        text as `<im_start><image><im_end>\\n` groups (spec §C.2)."""
        tok = self._tok()
        rows, pixels = [], []
        for conv in conversations:
            msgs = []
            for m in conv:
                if m.get("role") not in ("system", "user", "assistant"):
                    raise ValueError(f"message role must be system/user/assistant, got {m.get('role')!r}")
                ims = _as_list(m.get("images") or [])
                content = "".join("<im_start><image><im_end>\n" for _ in ims) + str(m.get("content", ""))
                pixels += self._read_images(ims)
                msgs.append({"role": m["role"], "content": content})
            rows.append(tok.encode_prompt(msgs, task="chat"))
        return rows, pixels

    def _row_images(self, rows: list[list[int]], seeds: list[int],
                    pixels: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Pixels for every image the rows need, in row order: `pixels` fill the placeholders, and a row without one
        carries the reference's noise picture drawn with its seed."""
        images: list[torch.Tensor] = []
        it = iter(pixels)
        for r, sd in zip(rows, seeds):
            n = sum(1 for x in r if x < 0)
            images += [next(it) for _ in range(n)] if n else [dummy_image(self.config.resolution, "noise", sd)]
        return images

    @torch.no_grad()
    def next_token_logits(self, messages: Sequence[Sequence[Message]]) -> torch.Tensor:
        """[B, V] float32 logits of the first reply token of each conversation (greedy decoding picks their argmax):
        for scoring fixed answers, e.g. the Yes - No margin of a question, without sampling. Text-only rows carry the
        noise pictures `chat` gives them with its default seed, so the argmax is greedy `chat`'s first token."""
        rows, pixels = self._text_rows([list(m) for m in messages])
        self._check_length(rows, 1, "prompt")
        prefix = self._prefill(rows, self._latents(self._row_images(rows, [0] * len(rows), pixels)))
        return self.head.logits(prefix.last_hidden).float()

    @torch.no_grad()
    def _generate_text(self, rows: list[list[int]], pixels: list[torch.Tensor], s: S.TextSampling,
                       stops: list[str], seeds: list[int]) -> Iterator[list[str]]:
        """Yield the full decoded text of every row after each step (stop strings applied)."""
        tok = self._tok()
        self._check_length(rows, s.max_new_tokens, "prompt")
        prefix = self._prefill(rows, self._latents(self._row_images(rows, seeds, pixels)))
        ids, _ = S.left_pad(rows, self.config.tokens.pad, self.device)
        generated: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        texts = [""] * len(rows)
        steps = S.decode_tokens(self.model, prefix, s, prompt_ids=ids, head=self.head)
        for step in _to_host(steps, every=1 if self.device.type == "cpu" else 8):
            for i, tkn in enumerate(step):
                if done[i]:
                    continue
                if tkn in s.stop_ids:
                    done[i] = True
                    continue
                generated[i].append(tkn)
                text = tok.decode(generated[i], skip_special_tokens=True)
                cut = min((text.find(x) for x in stops if x in text), default=-1)
                if cut >= 0:
                    text, done[i] = text[:cut], True
                texts[i] = text
            yield list(texts)
            if all(done):
                return

    def answer(self, images: ImageLike | Sequence[ImageLike | Sequence[ImageLike]], questions: str | Sequence[str],
               stream: bool = False, **sampling: Any) -> list[str] | Iterator[str]:
        """Answer each question about its image(s). `stream=True` (one question) yields text pieces."""
        images, questions = _as_list(images), _as_list(questions)
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        convs = [[{"role": "user", "content": q, "images": _as_list(im)}] for im, q in zip(images, questions)]
        return self.chat(convs, stream=stream, **sampling)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]], stream: bool = False,
             **sampling: Any) -> Any:
        """Reply to one conversation (a list of {"role", "content"[, "images"]}) -> str, or to a batch of
        conversations -> list[str]. `stream=True` (one conversation) returns an iterator of text pieces."""
        single = bool(messages) and isinstance(messages[0], Mapping)
        convs = [list(messages)] if single else [list(c) for c in messages]
        s, stops = self._sampling(dict(sampling))
        rows, pixels = self._text_rows(convs)
        # every text-only row carries the same noise picture, so a reply does not depend on its place in the batch
        seeds = [int(s.seed or 0)] * len(rows)
        steps = self._generate_text(rows, pixels, s, stops, seeds)
        if stream:
            if len(rows) != 1:
                raise ValueError("stream=True takes one conversation")
            return _pieces(steps)
        final = [""] * len(rows)
        with torch.no_grad():
            for texts in steps:
                final = texts
        return final[0] if single else final

    # ---- introspection --------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return describe(self.model, self.source, self.image_defaults, self.text_defaults)


def describe(model: CheersModel, source: str, image_defaults: ImageDefaults | None = None,
             text_defaults: TextDefaults | None = None) -> dict[str, Any]:
    """Configuration summary and parameter counts per component (works on the meta device too)."""
    m, c = model.model, model.config
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    g = c.grid
    return {
        "source": source,
        "config": c.name,
        "resolution": c.resolution,
        "image_tokens": c.num_image_tokens,
        "latent": [c.latent_channels, g, g],
        "vocab": c.text.vocab_size,
        "parameters": {
            "total_unique": model.num_parameters(),
            "language_model": count(m.language_model),
            "vision_encoder": count(m.vision_representation),
            "vae": count(m.vae_model),
            "latent_to_pixel_decoder": count(m.vae_decoder_projector),
            "und_projector": count(m.und_projector),
            "flow_head_stage1": count(m.gen_projector),
            "high_frequency_gate": count(m.hi_gate),
            "flow_head_stage2": count(m.hi_projector),
            "time_embed": count(m.time_embed),
        },
        "memory": {part: footprint(mod) for part, mod in (
            ("total", model), ("language_model", m.language_model), ("output_head", model.lm_head),
            ("vision_encoder", m.vision_representation), ("vae", m.vae_model),
            ("latent_to_pixel_decoder", m.vae_decoder_projector), ("und_projector", m.und_projector),
            ("flow_head_stage1", m.gen_projector), ("high_frequency_gate", m.hi_gate),
            ("flow_head_stage2", m.hi_projector), ("time_embed", m.time_embed))},
        "quantization": (c.quantization or {}).get("mode"),
        "high_frequency_gate": c.head.high_frequency_gate,
        "image_defaults": vars(image_defaults or ImageDefaults()),
        "text_defaults": vars(text_defaults or TextDefaults()),
    }


def _to_host(steps: Iterator[torch.Tensor], every: int) -> Iterator[list[int]]:
    """Each step's ids as a list, copied from the device `every` steps at a time (one sync per copy: on a GPU a
    sync per token would stall the queue of kernels)."""
    pending: list[torch.Tensor] = []
    for step in steps:
        pending.append(step)
        if len(pending) == every:
            yield from torch.stack(pending).tolist()
            pending = []
    if pending:
        yield from torch.stack(pending).tolist()


@torch.no_grad()  # as a decorator it is scoped to each step: a suspended stream leaves the caller's mode alone
def _pieces(steps: Iterator[list[str]]) -> Iterator[str]:
    sent = ""
    for texts in steps:
        text = texts[0]
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            continue
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent):]
            sent = text


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or ((path / "vocab.json").exists() and (path / "merges.txt").exists())
