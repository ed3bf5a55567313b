"""ShapesWorld scenes: palette, rendering, spec round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cheers.shapes import samples as SM
from cheers.shapes import world as W


def test_palette_is_far_apart_and_far_from_backgrounds():
    cols = np.array(list(W.COLORS.values()), float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert len(W.COLORS) >= 8 and len(W.SHAPES) >= 6
    assert d[~np.eye(len(cols), dtype=bool)].min() >= 90
    bgs = np.array(list(W.BACKGROUNDS.values()), float)
    assert np.linalg.norm(cols[:, None] - bgs[None], axis=-1).min() >= 140


@pytest.mark.parametrize("res", [64, 128])
def test_render_draws_the_spec(res):
    spec = W.SceneSpec((W.ObjectSpec("circle", "red", 0.3, 0.25, 0.3), W.ObjectSpec("square", "cyan", 0.3, 0.7, 0.7)),
                       "navy", "noise", 3)
    im = W.render_scene(spec, res)
    assert im.size == (res, res) and im.mode == "RGB"
    a = np.asarray(im).astype(int)
    assert np.abs(a[int(0.3 * res), int(0.25 * res)] - W.COLORS["red"]).max() <= 3
    assert np.abs(a[int(0.7 * res), int(0.7 * res)] - W.COLORS["cyan"]).max() <= 3
    assert np.abs(a[2, 2] - W.BACKGROUNDS["navy"]).max() <= 16  # lightly textured background
    # the square's drawn box matches object_box to a pixel
    ys, xs = np.nonzero(np.abs(a - W.COLORS["cyan"]).sum(-1) < 60)
    x0, y0, x1, y1 = W.object_box(spec.objects[1])
    assert abs(xs.min() - x0 * res) <= 1.5 and abs(xs.max() + 1 - x1 * res) <= 1.5
    assert abs(ys.min() - y0 * res) <= 1.5 and abs(ys.max() + 1 - y1 * res) <= 1.5


def test_spec_round_trip():
    s = SM.make_sample("color_attr", 3, "train", 0)["scene"]
    assert W.SceneSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError):
        W.ObjectSpec("hexagon", "red", 0.2, 0.5, 0.5)


def test_a_wide_canvas_scales_each_axis():
    spec = W.SceneSpec((W.ObjectSpec("square", "red", 0.5, 0.5, 0.5),), "black")
    im = W.render_scene(spec, (96, 48))
    assert im.size == (96, 48)
    ys, xs = np.nonzero(np.abs(np.asarray(im).astype(int) - W.COLORS["red"]).sum(-1) < 60)
    x0, y0, x1, y1 = W.object_box(spec.objects[0])  # fractions: the square becomes a 2:1 rectangle
    assert abs(xs.min() - x0 * 96) <= 1.5 and abs(xs.max() + 1 - x1 * 96) <= 1.5
    assert abs(ys.min() - y0 * 48) <= 1.5 and abs(ys.max() + 1 - y1 * 48) <= 1.5
    assert W.render_scene(spec, (64, 64)).tobytes() == W.render_scene(spec, 64).tobytes()
    with pytest.raises(ValueError, match="resolution must be >= 8, got"):
        W.render_scene(spec, (64, 4))


def test_a_look_decides_the_pixels():
    look = W.Look({"red": (200, 0, 0)}, {"black": (0, 0, 9)}, {"square": np.array([[-.5, -.5], [.5, -.5], [.5, .5],
                                                                                   [-.5, .5]])})
    spec = W.SceneSpec((W.ObjectSpec("square", "red", 0.5, 0.5, 0.5),), "black")
    a = np.asarray(W.render_scene(spec, 32, supersample=1, look=look))
    red = (a == (200, 0, 0)).all(-1)
    assert red[8:25, 8:25].all() and red.sum() == 17 * 17  # drawn flat, corners included
    assert (a[~red] == (0, 0, 9)).all()
    with pytest.raises(ValueError, match="the look draws no blue, star"):
        W.render_scene(spec.replace_objects([W.ObjectSpec("star", "blue", 0.3, 0.5, 0.5)]), 32, look=look)
