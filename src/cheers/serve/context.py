"""What request parsing knows about the served model and the limits: its resolution, context and image tokens,
reserved-token checks, prompt lengths, and image decoding (uploads and data URLs)."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import re
import threading
import time
from pathlib import Path
from typing import Any

from cheers.serve.errors import ApiError, bad, json_type
from cheers.serve.fields import Fields
from cheers.serve.settings import ServeSettings


class Context:
    """What request parsing needs to know about the model and the limits."""

    def __init__(self, model: Any, settings: ServeSettings):
        self.model = model
        self.settings = settings
        cfg = model.config
        self.resolution: int = int(cfg.resolution)
        self.image_tokens: int = int(cfg.num_image_tokens)
        self.context: int = int(cfg.text.max_position_embeddings)
        self.image_bytes = 3 * self.resolution**2  # a decoded image as requests hold it (R x R RGB)
        self.max_prompt = min(self.context, settings.max_prompt_tokens or self.context)
        self.tok = model.tokenizer
        self.model_id = settings.model_name or default_model_name(model)
        self.created = int(time.time())
        t = cfg.tokens
        self.reserved = {t.pad, t.chat_start, t.chat_end, t.image, t.image_gen, t.img_start, t.img_end, t.no_mean}
        # the tokenizer recognises its control tokens by their exact text, so a substring search finds every one a
        # text would produce without tokenizing it
        self.reserved_text = sorted({s for s in (self.tok.id_to_token(i) for i in self.reserved) if s}
                                    if self.tok else ())
        # no token spans more characters than the longest vocabulary entry (byte-level BPE: one character is at
        # least one byte), so len(text) / this is a lower bound of its token count, known without tokenizing
        self.max_token_chars = max(len(k) for k in self.tok.backend.get_vocab()) if self.tok else 1
        # decoding a large image takes several times its pixels in memory: a few at a time bound the peak
        self._decode_slots = threading.BoundedSemaphore(max(1, settings.decode_slots))

    def check_model(self, f: Fields) -> None:
        name = f.str("model", None)
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", type="invalid_request_error", code="model_not_found")

    def check_text(self, text: str, param: str) -> None:
        """Refuse the model's control tokens inside user text (they would forge image slots or turns)."""
        found = [name for name in self.reserved_text if name in text]
        if found:
            raise bad(f"'{param}' contains the reserved token(s) {', '.join(found)}; send images as image_url "
                      "parts and plain text otherwise", param, code="reserved_token")

    def check_chars(self, n_chars: int, n_images: int, extra: int, param: str, extra_name: str) -> None:
        """The length check by a lower bound of the token count, before tokenizing: a prompt of megabytes is
        refused at once instead of after seconds of tokenizing."""
        self.check_prompt_length(n_chars // self.max_token_chars + self.image_tokens * max(n_images, 1), extra,
                                 param, extra_name, at_least=True)

    def positions(self, ids: list[int]) -> int:
        """Sequence positions of an encoded prompt: each image placeholder expands to the model's image tokens;
        prompts without an image carry one (the reference's noise picture)."""
        n_ph = sum(1 for x in ids if x < 0)
        return len(ids) - n_ph + self.image_tokens * max(n_ph, 1)

    def check_prompt_length(self, n: int, extra: int, param: str, extra_name: str, at_least: bool = False) -> None:
        size = f"at least {n}" if at_least else str(n)
        if n > self.max_prompt:
            limit = (f"exceeds the model's context of {self.context}" if self.max_prompt == self.context
                     else f"is over the limit of {self.max_prompt}")
            raise bad(f"'{param}' is {size} tokens (images included), which {limit} tokens; shorten it", param,
                      code="context_length_exceeded")
        if n + extra > self.context:
            raise bad(f"'{param}' is {size} tokens and {extra_name} adds {extra}: {n + extra} exceeds the model's "
                      f"context of {self.context} tokens; shorten the prompt or lower {extra_name}", param,
                      code="context_length_exceeded")

    def tokenizer(self) -> Any:
        """The model's tokenizer; 501 when the model directory has none."""
        if self.tok is None:
            raise ApiError(501, "this model directory has no tokenizer; text tasks are unavailable",
                           type="server_error", code="no_tokenizer")
        return self.tok

    def decode_image(self, data: bytes, param: str) -> Any:
        """An image file's bytes -> the R x R PIL image the model reads of it (letterboxed as the pipeline does,
        which leaves it unchanged), within the size and pixel limits. A queued request holds R x R x 3 bytes per
        image, not the upload's full resolution."""
        from cheers.processor import ImageError, load_image, preprocess_understanding, tensor_to_pil

        if len(data) > self.settings.max_image_bytes:
            raise bad(f"'{param}': image is {len(data)} bytes, over the limit of {self.settings.max_image_bytes}",
                      param, code="image_too_large")
        if not data:
            raise bad(f"'{param}': empty image data", param, code="invalid_image")
        with self._decode_slots:
            try:
                full = load_image(bytes(data), max_pixels=self.settings.max_image_pixels)
            except ImageError as err:
                raise bad(f"'{param}' is not a usable image: {err.cause}", param, code="invalid_image") from None
            small = tensor_to_pil(preprocess_understanding(full, self.resolution))
            large = full.width * full.height > 4 * self.resolution**2
            del full
            if large:
                release_memory()
        return small

    def image_from_url(self, url: Any, param: str) -> Any:
        """A base64 data URL -> a PIL image (remote URLs are refused, not fetched)."""
        if not isinstance(url, str):
            raise bad(f"'{param}' must be a data URL string, got {json_type(url)}", param)
        if re.match(r"(?i)https?://", url):
            raise bad(f"'{param}': remote image URLs are not fetched; send the image inline as a data URL "
                      "(data:image/png;base64,...)", param, code="invalid_image_url")
        if not url.startswith("data:") or "," not in url:
            raise bad(f"'{param}' must be a data URL like data:image/png;base64,...", param,
                      code="invalid_image_url")
        header, payload = url[5:].split(",", 1)
        parts = header.split(";")
        media = parts[0].strip().lower()
        if media and not (media.startswith("image/") or media == "application/octet-stream"):
            raise bad(f"'{param}': media type '{media}' is not an image", param, code="invalid_image")
        if "base64" not in [p.strip().lower() for p in parts[1:]]:
            raise bad(f"'{param}': only base64 data URLs are accepted (data:image/png;base64,...)", param,
                      code="invalid_image_url")
        payload = re.sub(r"\s+", "", payload)
        if len(payload) * 3 // 4 > self.settings.max_image_bytes + 3:
            raise bad(f"'{param}': image is about {len(payload) * 3 // 4} bytes, over the limit of "
                      f"{self.settings.max_image_bytes}", param, code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"'{param}': the data URL is not valid base64", param, code="invalid_image") from None
        return self.decode_image(data, param)


def _libc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _libc_trim()


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc): the buffers of a decoded large image are otherwise
    kept by the allocator, and a burst of large uploads would leave the process that much bigger."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def default_model_name(model: Any) -> str:
    """The model id /v1/models reports when none is given: the preset name or the model directory's name."""
    src = str(getattr(model, "source", "") or "")
    if src.startswith("preset:"):
        return src[len("preset:"):]
    name = Path(src).name if src and not src.startswith("<") else ""
    return name or "cheers"
