"""What request parsing knows about the served model and the limits: its resolution, context and image tokens,
reserved-token checks, prompt lengths, and image decoding (uploads and data URLs)."""

from __future__ import annotations

import base64
import binascii
import re
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
        self.max_prompt = min(self.context, settings.max_prompt_tokens or self.context)
        self.tok = model.tokenizer
        self.model_id = settings.model_name or default_model_name(model)
        self.created = int(time.time())
        t = cfg.tokens
        self.reserved = {t.pad, t.chat_start, t.chat_end, t.image, t.image_gen, t.img_start, t.img_end, t.no_mean}

    def check_model(self, f: Fields) -> None:
        name = f.str("model", None)
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", type="invalid_request_error", code="model_not_found")

    def check_text(self, text: str, param: str) -> None:
        """Refuse the model's control tokens inside user text (they would forge image slots or turns)."""
        if not self.tok:
            return
        found = [i for i in self.tok.encode(text) if i < 0 or i in self.reserved]
        if found:
            names = sorted({(self.tok.id_to_token(i) if i >= 0 else "<image>") or str(i) for i in found})
            raise bad(f"'{param}' contains the reserved token(s) {', '.join(names)}; send images as image_url "
                      "parts and plain text otherwise", param, code="reserved_token")

    def positions(self, ids: list[int]) -> int:
        """Sequence positions of an encoded prompt: each image placeholder expands to the model's image tokens;
        prompts without an image carry one (the reference's noise picture)."""
        n_ph = sum(1 for x in ids if x < 0)
        return len(ids) - n_ph + self.image_tokens * max(n_ph, 1)

    def check_prompt_length(self, n: int, extra: int, param: str, extra_name: str) -> None:
        if n > self.max_prompt:
            limit = (f"exceeds the model's context of {self.context}" if self.max_prompt == self.context
                     else f"is over the limit of {self.max_prompt}")
            raise bad(f"'{param}' is {n} tokens (images included), which {limit} tokens; shorten it", param,
                      code="context_length_exceeded")
        if n + extra > self.context:
            raise bad(f"'{param}' is {n} tokens and {extra_name} adds {extra}: {n + extra} exceeds the model's "
                      f"context of {self.context} tokens; shorten the prompt or lower {extra_name}", param,
                      code="context_length_exceeded")

    def tokenizer(self) -> Any:
        """The model's tokenizer; 501 when the model directory has none."""
        if self.tok is None:
            raise ApiError(501, "this model directory has no tokenizer; text tasks are unavailable",
                           type="server_error", code="no_tokenizer")
        return self.tok

    def decode_image(self, data: bytes, param: str) -> Any:
        """An image file's bytes -> a PIL image, within the size and pixel limits."""
        from cheers.processor import ImageError, load_image

        if len(data) > self.settings.max_image_bytes:
            raise bad(f"'{param}': image is {len(data)} bytes, over the limit of {self.settings.max_image_bytes}",
                      param, code="image_too_large")
        if not data:
            raise bad(f"'{param}': empty image data", param, code="invalid_image")
        try:
            return load_image(bytes(data), max_pixels=self.settings.max_image_pixels)
        except ImageError as err:
            raise bad(f"'{param}' is not a usable image: {err.cause}", param, code="invalid_image") from None

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


def default_model_name(model: Any) -> str:
    """The model id /v1/models reports when none is given: the preset name or the model directory's name."""
    src = str(getattr(model, "source", "") or "")
    if src.startswith("preset:"):
        return src[len("preset:"):]
    name = Path(src).name if src and not src.startswith("<") else ""
    return name or "cheers"
