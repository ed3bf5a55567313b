"""Detector: accuracy on held-out clean renders, robustness to perturbations, garbage rejection, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage

from cheers.eval import detector as DT
from cheers.eval import judge as J
from cheers.shapes import samples as SM
from cheers.shapes import world as W

# floors asserted below (the measured accuracies are printed with -s)
CLEAN_FLOOR = 0.99
PERTURBED_FLOOR = 0.95
PERTURBATIONS = {  # at 64 px: Gaussian blur radius 1 px, additive noise sigma 0.05, slight colour shift
    "blur1": dict(blur=1.0),
    "noise0.05": dict(noise=0.05),
    "shift0.05": dict(shift=0.05),
    "blur+noise+shift": dict(blur=1.0, noise=0.05, shift=0.05),
}
IMAGE_KINDS = [k for k in SM.ALL_KINDS if k != SM.TEXT_KIND]


def heldout_scenes(n: int, seed: int = 2024) -> list[W.SceneSpec]:
    """Scenes of every sample kind of the eval split (1-5 objects), none of which the judge was trained on."""
    out = []
    for i in range(n):
        s = SM.make_sample(IMAGE_KINDS[i % len(IMAGE_KINDS)], seed, "eval", i // len(IMAGE_KINDS))
        out.append(s["scene"] if "scene" in s else (s["source"] if i % 2 else s["target"]))
    return out


def scene_accuracy(scenes, res: int, pert: dict | None = None) -> float:
    ok = 0
    for i, spec in enumerate(scenes):
        im = W.render_scene(spec, res)
        if pert:
            im = DT.perturb(im, np.random.default_rng([77, i]), **{k: v * (res / 64 if k == "blur" else 1)
                                                                   for k, v in pert.items()})
        ok += J.match_scene(DT.detect(im), spec)
    return ok / len(scenes)


def test_clean_accuracy_64():
    scenes = heldout_scenes(330)
    assert sum(len(s.objects) for s in scenes) > 600
    acc = scene_accuracy(scenes, 64)
    print(f"judge clean accuracy @64px on {len(scenes)} held-out scenes: {acc:.4f}")
    assert acc >= CLEAN_FLOOR


def test_clean_accuracy_128():
    scenes = heldout_scenes(90, seed=7)
    acc = scene_accuracy(scenes, 128)
    print(f"judge clean accuracy @128px on {len(scenes)} held-out scenes: {acc:.4f}")
    assert acc >= CLEAN_FLOOR


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_perturbation_robustness(name):
    scenes = heldout_scenes(150, seed=31)
    acc = scene_accuracy(scenes, 64, PERTURBATIONS[name])
    print(f"judge accuracy @64px under {name} on {len(scenes)} held-out scenes: {acc:.4f}")
    assert acc >= PERTURBED_FLOOR


def test_detection_details_are_right():
    spec = W.SceneSpec((W.ObjectSpec("star", "yellow", 0.3, 0.25, 0.25),
                        W.ObjectSpec("heart", "purple", 0.25, 0.75, 0.7),
                        W.ObjectSpec("triangle", "white", 0.2, 0.3, 0.75)), "umber", "checker", 5)
    dets = DT.detect(W.render_scene(spec, 64))
    assert sorted((d.shape, d.color) for d in dets) == [("heart", "purple"), ("star", "yellow"), ("triangle", "white")]
    for d in dets:
        o = next(o for o in spec.objects if o.shape == d.shape)
        assert np.allclose(d.box, W.object_box(o), atol=1.5 / 64)
        assert d.confidence > 0.9
    assert DT.detect(W.render_scene(W.SceneSpec((), "forest", "gradient", 1), 64)) == []
    # deterministic, and the same at another resolution
    assert DT.detect(W.render_scene(spec, 64)) == dets
    assert sorted((d.shape, d.color) for d in DT.detect(W.render_scene(spec, 200))) == \
        sorted((d.shape, d.color) for d in dets)


def test_touching_objects_of_different_colours_are_split():
    spec = W.SceneSpec((W.ObjectSpec("square", "red", 0.3, 0.35, 0.5), W.ObjectSpec("square", "blue", 0.3, 0.61, 0.5)))
    dets = DT.detect(W.render_scene(spec, 64))
    assert sorted((d.shape, d.color) for d in dets) == [("square", "blue"), ("square", "red")]


def test_classifier_training_is_deterministic():
    a, ya = DT._training_set(12)
    b, yb = DT._training_set(12)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)


def _smeared_noise(rng, res=64):
    """What an untrained generator draws: a smooth field of random palette colours plus noise."""
    k = int(rng.choice([6, 8, 12, 16]))
    pal = np.array(list(W.COLORS.values()) + [(15, 15, 15)] * 4, float)
    small = Image.fromarray(pal[rng.integers(0, len(pal), (k, k))].astype(np.uint8))
    a = np.asarray(small.resize((res, res), Image.Resampling.BICUBIC), float) + rng.normal(0, 20, (res, res, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _blobs(rng, res=64):
    """Irregular single-colour blobs on a ShapesWorld background: not one of the six shapes."""
    img = np.broadcast_to(np.array(list(W.BACKGROUNDS.values())[rng.integers(5)], float), (res, res, 3)).copy()
    for _ in range(int(rng.integers(1, 4))):
        f = ndimage.gaussian_filter(rng.normal(size=(res, res)), rng.uniform(3, 7))
        img[f > np.quantile(f, rng.uniform(0.9, 0.97))] = list(W.COLORS.values())[rng.integers(8)]
    return Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))


GARBAGE_CEILING = 0.10


def test_garbage_is_not_taken_for_objects():
    rng = np.random.default_rng(4321)
    for name, make in (("smeared noise", _smeared_noise), ("random blobs", _blobs)):
        passes, unknown = [], 0
        for _ in range(40):
            dets = DT.detect(make(rng))
            unknown += sum(d.shape == DT.UNKNOWN for d in dets)
            for shape in W.SHAPES:
                passes.append(J.score_geneval(dets, SM.geneval_metadata("single_object", [{"shape": shape}], ""))[0])
        rate = float(np.mean(passes))
        print(f"single_object pass rate on {name}: {rate:.3f} ({unknown} components judged unknown)")
        assert rate <= GARBAGE_CEILING and unknown > 40
