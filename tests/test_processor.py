import io

import numpy as np
import pytest
import torch
from PIL import Image

from cheers.processor import (
    ImageError,
    dummy_image,
    load_image,
    noise_picture,
    pil_to_tensor,
    preprocess_generation,
    preprocess_understanding,
    tensor_to_pil,
)


from tests.conftest import GOLDENS  # noqa: E402
needs_shared = pytest.mark.skipif(
    not (GOLDENS / "e_train_loss.safetensors").is_file(),
    reason=f"parity goldens not found at {GOLDENS} (set CHEERS_SHARED)",
)
R = 128


def golden(name):
    from safetensors.torch import load_file

    return load_file(str(GOLDENS / f"{name}.safetensors"))


def png_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


# ---- goldens -------------------------------------------------------------------------------------------------------


@needs_shared
def test_golden_a_understanding_pixels():
    a = golden("a_understanding")
    from_raw = preprocess_understanding(Image.fromarray(a["image_raw_uint8"].numpy()), R)
    assert torch.equal(from_raw, a["pixel_values"][0])
    assert torch.equal(preprocess_understanding(GOLDENS / "a_input_image.png", R), a["pixel_values"][0])


@needs_shared
def test_golden_b_dummy_noise():
    b = golden("b_text_only")
    assert np.array_equal(noise_picture(0), b["dummy_image_uint8"].numpy())
    assert torch.equal(dummy_image(R, "noise", seed=0), b["pixel_values"][0])


@needs_shared
def test_golden_e_training_pixels():
    e = golden("e_train_loss")
    p0 = preprocess_understanding(GOLDENS / "e_sample0_image.png", R)
    p1 = preprocess_generation(GOLDENS / "e_sample1_image.png", R)
    # the reference pipeline casts pixels to bfloat16
    assert torch.equal(p0.to(torch.bfloat16).float(), e["pixel_values"][0])
    assert torch.equal(p1.to(torch.bfloat16).float(), e["pixel_values"][1])


@needs_shared
def test_golden_f_generation_pixels_and_g_edit_source():
    f = golden("f_vae")
    assert torch.equal(preprocess_generation(GOLDENS / "a_input_image.png", R), f["pixel_values"][0])
    g = golden("g_edit")
    assert torch.equal(preprocess_understanding(Image.fromarray(g["image_raw_uint8"].numpy()), R), g["pixel_values"][0])


# ---- geometry -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(96, 80), (80, 96), (32, 32), (1, 1), (300, 7), (5, 301), (64, 64)])
def test_shapes_and_ranges(size):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(1, 256, (size[1], size[0], 3), dtype=np.uint8))
    for fn in (preprocess_understanding, preprocess_generation):
        x = fn(img, 32)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_letterbox_padding_is_black_and_centred():
    img = Image.new("RGB", (40, 20), (255, 255, 255))  # scale 0.8 -> 32 x 16, pad 8 on top / bottom
    x = preprocess_understanding(img, 32)
    assert torch.all(x[:, :8] == 0) and torch.all(x[:, 24:] == 0)
    assert torch.all(x[:, 8:24] == 1.0)
    img = Image.new("RGB", (20, 41), (255, 255, 255))  # 16 x 32 (round(15.6)), pad left 8, right 8
    x = preprocess_understanding(img, 32)
    assert torch.all(x[:, :, :8] == 0) and torch.all(x[:, :, 8:24] == 1.0) and torch.all(x[:, :, 24:] == 0)


def test_generation_centre_crop():
    a = np.zeros((20, 60, 3), np.uint8)  # wide: short side 20 -> 32, width 96, crop columns 32..64
    a[:, 20:40] = 255  # -> resized columns 32..64: exactly the crop
    x = preprocess_generation(Image.fromarray(a), 32)
    assert torch.all(x[:, :, 3:29] > 0.99)
    a = np.zeros((60, 20, 3), np.uint8)  # tall: rows 20..40 white, the rest black
    a[20:40] = 255
    a[:20, :, 0] = 255  # top third red (cropped away)
    x = preprocess_generation(Image.fromarray(a), 32)
    assert torch.all(x[:, 3:29] > 0.99)


def test_dummy_black_and_errors():
    assert torch.equal(dummy_image(16, "black"), torch.zeros(3, 16, 16))
    assert dummy_image(16, "noise", 3).shape == (3, 16, 16)
    assert not torch.equal(dummy_image(16, "noise", 0), dummy_image(16, "noise", 1))
    with pytest.raises(ValueError, match="unknown dummy image kind"):
        dummy_image(16, "grey")


def test_tensor_to_pil_roundtrip():
    a = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = pil_to_tensor(Image.fromarray(a))
    assert np.array_equal(np.asarray(tensor_to_pil(x)), a)
    y = tensor_to_pil(torch.full((3, 2, 2), 2.0))
    assert np.asarray(y).min() == 255


# ---- modes ----------------------------------------------------------------------------------------------------------


def test_rgba_composited_on_black(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = [255, 0, 0, 255]  # opaque red
    a[0, 1] = [255, 255, 255, 128]  # half transparent white
    a[1, 0] = [0, 255, 0, 0]  # fully transparent green -> black
    a[1, 1] = [10, 20, 30, 255]
    p = tmp_path / "rgba.png"
    Image.fromarray(a).save(p)
    out = np.asarray(load_image(p))
    assert load_image(p).mode == "RGB"
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [128, 128, 128]
    assert out[1, 0].tolist() == [0, 0, 0]
    assert out[1, 1].tolist() == [10, 20, 30]


def test_la_palette_grayscale_and_16bit():
    la = Image.merge("LA", [Image.new("L", (2, 1), 200), Image.fromarray(np.array([[255, 0]], np.uint8))])
    assert np.asarray(load_image(png_bytes(la))).tolist() == [[[200] * 3, [0] * 3]]

    gray = Image.fromarray(np.array([[0, 77, 255]], np.uint8))
    assert np.asarray(load_image(png_bytes(gray))).tolist() == [[[0] * 3, [77] * 3, [255] * 3]]

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    assert np.asarray(load_image(png_bytes(pal))).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    # palette entry 1 transparent -> black
    assert np.asarray(load_image(png_bytes(pal, transparency=1))).tolist() == [[[255, 0, 0], [0, 0, 0]]]

    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    assert np.asarray(load_image(png_bytes(bw))).tolist() == [[[0] * 3, [255] * 3]]

    deep = Image.fromarray(np.array([[0, 65535, 257 * 100]], np.uint16))
    assert np.asarray(load_image(png_bytes(deep))).tolist() == [[[0] * 3, [255] * 3, [100] * 3]]

    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(load_image(cmyk)).tolist() == [[[255, 0, 0]]]


def test_exif_orientation_applied():
    a = np.zeros((2, 4, 3), np.uint8)  # 4 wide, 2 high; red at top-left
    a[0, 0] = [255, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = load_image(png_bytes(Image.fromarray(a), exif=exif))
    assert out.size == (2, 4)
    assert np.asarray(out)[0, 1].tolist() == [255, 0, 0]  # top-left moved to top-right
    assert preprocess_understanding(png_bytes(Image.fromarray(a), exif=exif), 8).shape == (3, 8, 8)


def test_inputs_path_bytes_fileobj_pil(tmp_path):
    img = Image.new("RGB", (3, 2), (1, 2, 3))
    p = tmp_path / "x.png"
    img.save(p)
    for src in (p, str(p), p.read_bytes(), io.BytesIO(p.read_bytes()), img):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (3, 2) and out.getpixel((0, 0)) == (1, 2, 3)


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match=r"garbage\.png: not a recognised image format"):
        load_image(bad)
    good = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    cut = tmp_path / "truncated.png"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match=r"truncated\.png: corrupt or truncated") as info:
        load_image(cut)
    assert info.value.source.endswith("truncated.png") and "truncated" in info.value.cause
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="bytes>: not a recognised"):
        load_image(b"\x89PNG\r\n\x1a\nrubbish")


def test_oversized_images(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(p)
    with pytest.raises(ImageError, match=r"big\.png: image too large: 40x30 = 1200 pixels > max_pixels 1000"):
        load_image(p, max_pixels=1000)
    assert load_image(p, max_pixels=1200).size == (40, 30)
    # PIL's decompression-bomb guard (warning range and error range) is reported the same way
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"big\.png: image too large \(decompression bomb"):
        load_image(p, max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    with pytest.raises(ImageError, match=r"big\.png: image too large \(decompression bomb"):
        load_image(p, max_pixels=None)
