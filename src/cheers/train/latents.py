"""Cache of frozen-VAE latents (stages >= 1: the VAE never trains, so its encoding of an image never changes).

Key of an image = its preprocessing (understanding letterbox / generation centre-crop), the resolution and the
file identity (absolute path, size, modification time); black pictures (dummy images of text-only samples, missing
images replaced by black) share one key per resolution. Keys live under a fingerprint of the VAE encoder weights
and latent statistics, so a cache is never reused with a different VAE.

Every miss is encoded on its own (batch of one), so a cached latent does not depend on which other images happened
to share its batch: runs that resume, or that split the global batch over a different number of processes, read
bit-identical latents. Entries are kept in memory (bounded, least recently used dropped first) and, when a
directory is given, as one small safetensors file each (written to a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from cheers import constants as C

PREPROCESS_VERSION = "v1"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 over the encoder weights and the latent statistics (what `encode` depends on)."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith("decoder."):
            continue
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def image_key(path: str | os.PathLike | None, generate: bool, resolution: int) -> str:
    """Cache key of one image of a sample; `path=None` (or a missing file) = a black picture."""
    if path is None or not Path(path).exists():
        ident = f"black|{resolution}"
    else:
        p = Path(path).resolve()
        st = p.stat()
        mode = "generation" if generate else "understanding"
        ident = f"{mode}|{resolution}|{p}|{st.st_size}|{st.st_mtime_ns}|{PREPROCESS_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def black_key(resolution: int) -> str:
    return image_key(None, False, resolution)


def sample_image_keys(image_paths: Sequence[os.PathLike], placeholder_kinds: Sequence[int], resolution: int) -> list[str]:
    """Keys of a sample's images in textual order (one black key for a sample without placeholders)."""
    if not placeholder_kinds:
        return [black_key(resolution)]
    return [image_key(p, k == C.IMAGE_GEN_PLACEHOLDER, resolution) for p, k in zip(image_paths, placeholder_kinds)]


class LatentCache:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], fingerprint: str,
                 directory: str | os.PathLike | None = None, max_memory_items: int = 4096):
        self.encode = encode
        self.fingerprint = fingerprint
        self.dir = Path(directory) / fingerprint if directory else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.max_items = int(max_memory_items)
        self.mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.disk_hits = self.misses = 0

    def _file(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / key[:2] / f"{key}.safetensors"

    def _remember(self, key: str, value: torch.Tensor) -> None:
        self.mem[key] = value
        self.mem.move_to_end(key)
        while len(self.mem) > self.max_items:
            self.mem.popitem(last=False)

    def get(self, key: str, pixels: torch.Tensor) -> torch.Tensor:
        """Latent [c, g, g] (float32, CPU) of one image, encoding `pixels` [3, R, R] on a miss."""
        if key in self.mem:
            self.hits += 1
            self.mem.move_to_end(key)
            return self.mem[key]
        if self.dir is not None:
            f = self._file(key)
            if f.is_file():
                try:
                    value = load_file(str(f))["latent"]
                    self.disk_hits += 1
                    self._remember(key, value)
                    return value
                except Exception:  # a damaged entry is recomputed and rewritten
                    pass
        self.misses += 1
        with torch.no_grad():
            value = self.encode(pixels.unsqueeze(0))[0].detach().to("cpu", torch.float32).contiguous()
        if self.dir is not None:
            f = self._file(key)
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
            save_file({"latent": value}, str(tmp))
            os.replace(tmp, f)
        self._remember(key, value)
        return value

    def latents(self, keys: Sequence[str], pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, c, g, g] for the batch's images (keys and pixel_values in the same order)."""
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} cache keys for {pixel_values.shape[0]} images")
        return torch.stack([self.get(k, px) for k, px in zip(keys, pixel_values)])

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses, "items": len(self.mem)}
