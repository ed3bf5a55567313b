import numpy as np
import pytest
from PIL import Image, ImageFilter

from cheers.eval.sharpness import high_frequency_energy, sharpness_ratio
from cheers.eval.shapes import eval_prompts
from cheers.shapes.world import render_scene


def _renders(n=12):
    items = eval_prompts(seed=3, n=2, resolution=64, families=("generation",))["generation"][:n]
    return [render_scene(it.spec, 64) for it in items]


def test_blur_lowers_and_noise_raises_high_frequency_energy():
    real = _renders()
    blurred = [im.filter(ImageFilter.GaussianBlur(1.5)) for im in real]
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + rng.normal(0, 25, (64, 64, 3)), 0, 255)
                             .astype(np.uint8)) for im in real]
    r_blur = sharpness_ratio(blurred, real)["ratio"]
    r_noise = sharpness_ratio(noisy, real)["ratio"]
    assert r_blur < 0.5, r_blur
    assert r_noise > 1.5, r_noise
    assert sharpness_ratio(real, real)["ratio"] == pytest.approx(1.0)


def test_constant_and_checkerboard_extremes():
    assert high_frequency_energy(Image.new("RGB", (32, 32), (200, 10, 10))) == 0.0
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    # a one-pixel checkerboard is all energy at the highest frequency
    assert high_frequency_energy(np.stack([checker] * 3, -1)) == pytest.approx(1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_energy(Image.new("RGB", (8, 8)), cutoff=1.5)
    with pytest.raises(ValueError, match="RGB"):
        high_frequency_energy(np.zeros((8, 8)))
