"""Judge: accuracy on held-out clean renders, robustness to perturbations, GenEval rules, edits, answers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage

from cheers.eval import judge as J
from cheers.eval import shapes as S

# floors asserted below (measured accuracies are printed with -s; at the time of writing all were 1.000)
CLEAN_FLOOR = 0.99
PERTURBED_FLOOR = 0.95
PERTURBATIONS = {  # at 64 px: Gaussian blur radius 1 px, additive noise sigma 0.05, slight colour shift
    "blur1": dict(blur=1.0),
    "noise0.05": dict(noise=0.05),
    "shift0.05": dict(shift=0.05),
    "blur+noise+shift": dict(blur=1.0, noise=0.05, shift=0.05),
}
IMAGE_KINDS = [k for k in S.ALL_KINDS if k != S.TEXT_KIND]


def heldout_scenes(n: int, seed: int = 2024) -> list[S.SceneSpec]:
    """Scenes of every sample kind of the eval split (1-5 objects), none of which the judge was trained on."""
    out = []
    for i in range(n):
        s = S.make_sample(IMAGE_KINDS[i % len(IMAGE_KINDS)], seed, "eval", i // len(IMAGE_KINDS))
        out.append(s["scene"] if "scene" in s else (s["source"] if i % 2 else s["target"]))
    return out


def scene_accuracy(scenes, res: int, pert: dict | None = None) -> float:
    ok = 0
    for i, spec in enumerate(scenes):
        im = S.render_scene(spec, res)
        if pert:
            im = J.perturb(im, np.random.default_rng([77, i]), **{k: v * (res / 64 if k == "blur" else 1)
                                                                   for k, v in pert.items()})
        ok += J.match_scene(J.detect(im), spec)
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
    spec = S.SceneSpec((S.ObjectSpec("star", "yellow", 0.3, 0.25, 0.25),
                        S.ObjectSpec("heart", "purple", 0.25, 0.75, 0.7),
                        S.ObjectSpec("triangle", "white", 0.2, 0.3, 0.75)), "umber", "checker", 5)
    dets = J.detect(S.render_scene(spec, 64))
    assert sorted((d.shape, d.color) for d in dets) == [("heart", "purple"), ("star", "yellow"), ("triangle", "white")]
    for d in dets:
        o = next(o for o in spec.objects if o.shape == d.shape)
        assert np.allclose(d.box, S.object_box(o), atol=1.5 / 64)
        assert d.confidence > 0.9
    assert J.detect(S.render_scene(S.SceneSpec((), "forest", "gradient", 1), 64)) == []
    # deterministic, and the same at another resolution
    assert J.detect(S.render_scene(spec, 64)) == dets
    assert sorted((d.shape, d.color) for d in J.detect(S.render_scene(spec, 200))) == \
        sorted((d.shape, d.color) for d in dets)


def test_touching_objects_of_different_colours_are_split():
    spec = S.SceneSpec((S.ObjectSpec("square", "red", 0.3, 0.35, 0.5), S.ObjectSpec("square", "blue", 0.3, 0.61, 0.5)))
    dets = J.detect(S.render_scene(spec, 64))
    assert sorted((d.shape, d.color) for d in dets) == [("square", "blue"), ("square", "red")]


def test_classifier_training_is_deterministic():
    a, ya = J._training_set(12)
    b, yb = J._training_set(12)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)


def D(shape, color, box, conf=0.99):
    return J.Detection(shape, color, conf, box, 0.01)


def test_geneval_rules():
    left, right = (0.1, 0.4, 0.3, 0.6), (0.7, 0.4, 0.9, 0.6)
    top, bottom = (0.4, 0.05, 0.6, 0.25), (0.4, 0.7, 0.6, 0.9)
    meta = lambda cat, objs, rel=None: S.geneval_metadata(cat, objs, "p", rel)  # noqa: E731
    assert J.score_geneval([D("circle", "red", left)], meta("single_object", [{"shape": "circle"}]))[0]
    assert not J.score_geneval([D("square", "red", left)], meta("single_object", [{"shape": "circle"}]))[0]
    two = meta("two_object", [{"shape": "circle"}, {"shape": "star"}])
    assert J.score_geneval([D("circle", "red", left), D("star", "red", right)], two)[0]
    assert not J.score_geneval([D("circle", "red", left), D("circle", "red", right)], two)[0]
    cnt = meta("counting", [{"shape": "heart", "count": 2}])
    assert J.score_geneval([D("heart", "red", left), D("heart", "blue", right)], cnt)[0]
    assert not J.score_geneval([D("heart", "red", left)], cnt)[0]
    three = [D("heart", "red", left), D("heart", "blue", right), D("heart", "red", top)]
    ok, why = J.score_geneval(three, cnt)
    assert not ok and "heart<3" in why  # exact count: the exclude rule
    col = meta("colors", [{"shape": "cross", "color": "green"}])
    assert J.score_geneval([D("cross", "green", left)], col)[0]
    assert not J.score_geneval([D("cross", "blue", left)], col)[0]
    # the most confident cross decides, as in GenEval
    assert not J.score_geneval([D("cross", "blue", left, 0.9), D("cross", "green", right, 0.8)], col)[0]
    pos = meta("position", [{"shape": "circle"}, {"shape": "square"}], "left of")
    assert J.score_geneval([D("circle", "red", left), D("square", "red", right)], pos)[0]
    assert not J.score_geneval([D("circle", "red", right), D("square", "red", left)], pos)[0]
    assert not J.score_geneval([D("circle", "red", left)], pos)[0]
    above = meta("position", [{"shape": "circle"}, {"shape": "square"}], "above")
    assert J.score_geneval([D("circle", "red", top), D("square", "red", bottom)], above)[0]
    assert not J.score_geneval([D("circle", "red", left), D("square", "red", right)], above)[0]
    ca = meta("color_attr", [{"shape": "circle", "color": "red"}, {"shape": "star", "color": "blue"}])
    assert J.score_geneval([D("circle", "red", left), D("star", "blue", right)], ca)[0]
    assert not J.score_geneval([D("circle", "blue", left), D("star", "red", right)], ca)[0]
    # below GenEval's confidence threshold an object is not seen
    assert not J.score_geneval([D("circle", "red", left, 0.2)], meta("single_object", [{"shape": "circle"}]))[0]
    assert S.relative_position(left, right) == {"left of"} and S.relative_position(top, bottom) == {"above"}
    assert S.relative_position(left, left) == set()


def test_edit_scoring():
    items = S.eval_prompts(seed=3, n=6, resolution=64, families=("editing",))["editing"]
    for e in items:
        good = J.score_edit(S.render_scene(e.target, 64), e)
        assert good == {**good, "correct": True, "applied": True, "preserved": True}, e.instruction
        same = J.score_edit(e.source_image, e)
        assert not same["correct"] and not same["applied"], e.instruction
    e = next(e for e in items if e.kind == "recolor")  # recolouring the wrong object: applied, not preserved
    others = [i for i in range(len(e.target.objects)) if i != e.edit["index"]]
    if others:
        objs = list(e.target.objects)
        j = others[0]
        new = next(c for c in S.COLORS if c != objs[j].color and (objs[j].shape, c) not in e.target.pairs())
        objs[j] = objs[j].recolored(new)
        r = J.score_edit(S.render_scene(e.target.replace_objects(objs), 64), e)
        assert r["applied"] and not r["preserved"] and not r["correct"]
    m = next(e for e in items if e.kind == "move")  # moved the wrong way: not applied
    i = m.edit["index"]
    o = m.source.objects[i]
    ux, uy = S.DIRECTIONS[m.edit["direction"]]
    back = list(m.source.objects)
    back[i] = o.moved(min(max(o.cx - 0.1 * ux, 0.2), 0.8), min(max(o.cy - 0.1 * uy, 0.2), 0.8))
    assert not J.score_edit(S.render_scene(m.source.replace_objects(back), 64), m)["applied"]


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("B.", "B"), ("(C) heart", "C"), ("D: star", "D"), ("The answer is A.", "A"), ("Option C", "C"),
    ("answer: d", "D"), ("A", "A"), ("a", "A"), ("triangle", "B"), ("It is a red circle", "A"),
    ("a circle or a star", None), ("hexagon", None), ("", None),
])
def test_normalize_letter(text, expected):
    assert J.normalize_letter(text, {"A": "circle", "B": "triangle", "C": "heart", "D": "star"}) == expected


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, there is a red circle.", "yes"), ("No", "no"), ("no, there isn't", "no"),
    ("There is no star in the image.", "no"), ("True", "yes"), ("maybe", None), ("", None),
])
def test_normalize_yesno(text, expected):
    assert J.normalize_yesno(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("3", 3), ("There are 3.", 3), ("three", 3), ("Four stars.", 4), ("I count two of them", 2), ("none", 0),
    ("zero", 0), ("12", 12), ("many", None),
])
def test_normalize_number(text, expected):
    assert J.normalize_number(text) == expected


def test_normalize_words_and_captions():
    assert J.normalize_color("It is red.") == "red"
    assert J.normalize_color("grey") == "gray" and J.normalize_color("Violet!") == "purple"
    assert J.normalize_color("The star is orange and big") == "orange"
    assert J.normalize_color("no idea") is None
    assert J.normalize_shape("Triangles.") == "triangle" and J.normalize_shape("a plus sign") == "cross"
    assert J.normalize_position("It is to the left.") == "left" and J.normalize_position("under it") == "below"
    assert J.parse_caption("The image shows a red circle, two blue squares and a yellow star.") == \
        Counter({("red", "circle"): 1, ("blue", "square"): 2, ("yellow", "star"): 1})
    assert J.parse_caption("3 green hearts") == Counter({("green", "heart"): 3})
    spec = S.SceneSpec((S.ObjectSpec("circle", "red", 0.2, 0.3, 0.3), S.ObjectSpec("circle", "red", 0.2, 0.7, 0.7)))
    assert J.score_answer("Two red circles.", "", "caption", spec=spec)
    assert not J.score_answer("A red circle.", "", "caption", spec=spec)
    assert J.score_answer("It's 4", "4", "number") and not J.score_answer("It's 5", "4", "number")


def _smeared_noise(rng, res=64):
    """What an untrained generator draws: a smooth field of random palette colours plus noise."""
    k = int(rng.choice([6, 8, 12, 16]))
    pal = np.array(list(S.COLORS.values()) + [(15, 15, 15)] * 4, float)
    small = Image.fromarray(pal[rng.integers(0, len(pal), (k, k))].astype(np.uint8))
    a = np.asarray(small.resize((res, res), Image.Resampling.BICUBIC), float) + rng.normal(0, 20, (res, res, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _blobs(rng, res=64):
    """Irregular single-colour blobs on a ShapesWorld background: not one of the six shapes."""
    img = np.broadcast_to(np.array(list(S.BACKGROUNDS.values())[rng.integers(5)], float), (res, res, 3)).copy()
    for _ in range(int(rng.integers(1, 4))):
        f = ndimage.gaussian_filter(rng.normal(size=(res, res)), rng.uniform(3, 7))
        img[f > np.quantile(f, rng.uniform(0.9, 0.97))] = list(S.COLORS.values())[rng.integers(8)]
    return Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))


GARBAGE_CEILING = 0.10


def test_garbage_is_not_taken_for_objects():
    rng = np.random.default_rng(4321)
    for name, make in (("smeared noise", _smeared_noise), ("random blobs", _blobs)):
        passes, unknown = [], 0
        for _ in range(40):
            dets = J.detect(make(rng))
            unknown += sum(d.shape == J.UNKNOWN for d in dets)
            for shape in S.SHAPES:
                passes.append(J.score_geneval(dets, S.geneval_metadata("single_object", [{"shape": shape}], ""))[0])
        rate = float(np.mean(passes))
        print(f"single_object pass rate on {name}: {rate:.3f} ({unknown} components judged unknown)")
        assert rate <= GARBAGE_CEILING and unknown > 40
