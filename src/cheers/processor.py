"""Image preprocessing of Cheers (spec §F, parity README §2).

* `load_image` opens a path, bytes, a binary file object or a PIL image and returns an 8-bit RGB PIL image:
  EXIF orientation applied; transparency (RGBA, LA, PA, palette or RGB/L images with a transparent colour)
  composited on **black** — the colour of the letterbox padding, and what dropping the alpha channel gives for
  the usual fully transparent (0, 0, 0, 0) pixels; 16-bit and float images rescaled to 8 bits; other modes
  (grayscale, palette, CMYK, YCbCr, ...) converted to RGB. Unreadable, truncated or too large inputs raise
  `ImageError` naming the file and the cause.
* `preprocess_understanding(img, R)`: images to read, edit sources and the dummy prefix. Scale by
  `min(R/h, R/w)`, round the new size, PIL bicubic, pad with black to R x R (left = pad_w // 2, top = pad_h // 2).
* `preprocess_generation(img, R)`: training targets. Scale so the short side is R, bicubic, centre-crop R x R.
* Both return float32 tensors [3, R, R] with values byte / 255 in [0, 1] (no mean/std normalisation).
* `dummy_image(R, kind, seed)`: the picture carried by prompts without images. "noise" is the reference's random
  256 x 256 uint8 picture (`np.random.RandomState(seed).randint(0, 256, (256, 256, 3), dtype=np.uint8)`) put
  through the understanding preprocessing; "black" is all zeros (training samples without images).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageError",
    "ImageInput",
    "DEFAULT_MAX_PIXELS",
    "load_image",
    "pil_to_tensor",
    "tensor_to_pil",
    "preprocess_understanding",
    "preprocess_generation",
    "dummy_image",
    "noise_picture",
]

# Refuse images with more pixels than this (width * height) before decoding them: 64 megapixels.
DEFAULT_MAX_PIXELS = 1 << 26

ImageInput = Union[str, os.PathLike, bytes, bytearray, BinaryIO, Image.Image]


class ImageError(ValueError):
    """An image cannot be used: missing, unreadable, truncated, corrupt or too large. The message names the
    file (or `<bytes>` / `<image>`) and the cause."""

    def __init__(self, source: str, cause: str):
        self.source = source
        self.cause = cause
        super().__init__(f"{source}: {cause}")


def _describe(src: ImageInput) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or "<PIL image>"
    return getattr(src, "name", None) or "<file object>"


def load_image(src: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `src` and return a new RGB PIL image (see the module docstring for the conversions).

    Raises `ImageError("<file>: <cause>")` for a missing file, data that is not an image, truncated or corrupt
    data, and images above `max_pixels` (checked from the header, before decoding) or above PIL's
    decompression-bomb limit.
    """
    name = _describe(src)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat it as an error as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                return _decode(src, name, max_pixels)
            if isinstance(src, (str, os.PathLike)):
                p = Path(src)
                if not p.exists():
                    raise ImageError(name, "no such file")
                if p.is_dir():
                    raise ImageError(name, "is a directory, not an image")
                fp: ImageInput = p
            elif isinstance(src, (bytes, bytearray)):
                fp = io.BytesIO(bytes(src))
            else:
                fp = src
            with Image.open(fp) as img:
                return _decode(img, name, max_pixels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(name, f"image too large (decompression bomb check: {err})") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format (corrupt data or not an image)") from None
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        # PIL reports broken data as OSError ("image file is truncated ..."), SyntaxError, ValueError, ...
        raise ImageError(name, f"corrupt or truncated image data ({type(err).__name__}: {err})") from None


def _decode(img: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(name, f"empty image ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(name, f"image too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    img.load()  # decode now: truncated / corrupt data fails here, not later
    return _to_rgb(ImageOps.exif_transpose(img))


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        if "transparency" in img.info:
            return _composite_on_black(img.convert("RGBA"))
        return img.copy()
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        return _composite_on_black(img.convert("RGBA"))
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_black(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("L", "1"):
        if "transparency" in img.info:
            return _composite_on_black(img.convert("RGBA"))
        return img.convert("L").convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(img)
        if mode == "F":
            # float images: values taken as 0..1 when they fit, else as 0..255
            a = arr.astype(np.float64)
            if np.nanmax(a) <= 1.0:
                a = a * 255.0
        else:
            a = arr.astype(np.float64) / 257.0  # 16-bit range onto 8 bits
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def _composite_on_black(rgba: Image.Image) -> Image.Image:
    arr = np.asarray(rgba, dtype=np.uint16)
    rgb = arr[..., :3]
    alpha = arr[..., 3:4]
    out = (rgb * alpha + 127) // 255  # rounded rgb * alpha / 255
    return Image.fromarray(out.astype(np.uint8))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1] (byte / 255)."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float [3, H, W] image in [0, 1] -> RGB PIL image the way the reference writes PNGs:
    clamp to [0, 1], `x * 255 + 0.5`, truncate."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got {tuple(x.shape)}")
    arr = (x.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def _as_rgb(img: ImageInput) -> Image.Image:
    if isinstance(img, Image.Image) and img.mode == "RGB" and not img.info:
        return img  # an in-memory RGB picture: nothing to convert, no EXIF to apply
    return load_image(img)


def preprocess_understanding(img: ImageInput, resolution: int) -> torch.Tensor:
    """Letterbox `img` into a black `resolution` x `resolution` square -> float32 [3, R, R] in [0, 1]."""
    im = _as_rgb(img)
    r = int(resolution)
    w, h = im.size
    s = min(r / h, r / w)
    nw, nh = max(1, min(r, round(w * s))), max(1, min(r, round(h * s)))
    resized = im.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else im
    canvas = Image.new("RGB", (r, r), (0, 0, 0))
    canvas.paste(resized, ((r - nw) // 2, (r - nh) // 2))
    return pil_to_tensor(canvas)


def preprocess_generation(img: ImageInput, resolution: int) -> torch.Tensor:
    """Resize so the short side is `resolution` (bicubic), centre-crop a square -> float32 [3, R, R] in [0, 1]."""
    im = _as_rgb(img)
    r = int(resolution)
    w, h = im.size
    s = r / min(w, h)
    nw, nh = max(r, round(w * s)), max(r, round(h * s))
    resized = im.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else im
    left, top = (nw - r) // 2, (nh - r) // 2
    return pil_to_tensor(resized.crop((left, top, left + r, top + r)))


def noise_picture(seed: int = 0, size: int = 256) -> np.ndarray:
    """The reference's random picture: uint8 [size, size, 3] from `np.random.RandomState(seed)`."""
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)


def dummy_image(resolution: int, kind: str = "noise", seed: int = 0) -> torch.Tensor:
    """The image carried by prompts without images: "noise" (inference; the reference's random picture,
    letterboxed) or "black" (training samples without images). float32 [3, R, R]."""
    if kind == "noise":
        return preprocess_understanding(Image.fromarray(noise_picture(seed)), resolution)
    if kind == "black":
        return torch.zeros(3, int(resolution), int(resolution))
    raise ValueError(f"unknown dummy image kind '{kind}'; choose 'noise' or 'black'")
