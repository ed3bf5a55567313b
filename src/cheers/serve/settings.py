"""Server limits and batching parameters, and the byte sizes the command line accepts for them."""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ServeSettings:
    """Server limits and batching parameters (all configurable from the command line)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no key (then Host and Origin are checked); never empty
    allowed_hosts: tuple[str, ...] = ()  # host names accepted without a key besides IP addresses and localhost
    model_name: str | None = None
    max_batch: int = 16  # images per model call; conversations joining the running text batch per step
    max_running: int = 64  # replies decoding together in the running text batch (continuous batching)
    max_wait_ms: float = 20.0  # how long the oldest queued job waits for companions
    max_queue: int = 64  # queued + running images/conversations before 503
    max_queue_bytes: int = 2**30  # memory held by queued + running requests (their images) before 503
    decode_slots: int = 1  # images decoded at the same time (a large one takes several times its pixels)
    max_body_bytes: int = 25 * 2**20
    max_image_bytes: int = 16 * 2**20  # one decoded image file
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # images in one chat request
    max_tokens: int = 1024  # upper bound of max_tokens
    max_prompt_tokens: int | None = None  # default: the model's context
    max_n: int = 8  # images / choices per request
    max_steps: int = 250
    threads: int | None = None  # torch intra-op threads of the model thread (default: torch's, one per core)
    warmup: bool = True
    shutdown_grace_s: float = 10.0  # on SIGTERM: how long queued and running requests get to finish
    log_level: str = "info"
    access_log: bool = True  # one JSON line per request on stderr

    def public(self) -> dict[str, Any]:
        """The settings without the API key (only whether one is required)."""
        d = asdict(self)
        d.pop("api_key")
        d["api_key_required"] = bool(self.api_key)
        return d


def parse_size(text: str | int) -> int:
    """'25MB', '512KB', '1GB', '1000' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", str(text), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 25MB, 512KB or a number of bytes)")
    unit = (m.group(2) or "b").lower()[:1]
    return int(float(m.group(1)) * {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit])
