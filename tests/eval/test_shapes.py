"""ShapesWorld generator: rendering, determinism, record format, splits and held-out compositions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cheers.eval import judge as J
from cheers.eval import shapes as S


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_palette_is_far_apart_and_far_from_backgrounds():
    cols = np.array(list(S.COLORS.values()), float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert len(S.COLORS) >= 8 and len(S.SHAPES) >= 6
    assert d[~np.eye(len(cols), dtype=bool)].min() >= 90
    bgs = np.array(list(S.BACKGROUNDS.values()), float)
    assert np.linalg.norm(cols[:, None] - bgs[None], axis=-1).min() >= 140


@pytest.mark.parametrize("res", [64, 128])
def test_render_draws_the_spec(res):
    spec = S.SceneSpec((S.ObjectSpec("circle", "red", 0.3, 0.25, 0.3), S.ObjectSpec("square", "cyan", 0.3, 0.7, 0.7)),
                       "navy", "noise", 3)
    im = S.render_scene(spec, res)
    assert im.size == (res, res) and im.mode == "RGB"
    a = np.asarray(im).astype(int)
    assert np.abs(a[int(0.3 * res), int(0.25 * res)] - S.COLORS["red"]).max() <= 3
    assert np.abs(a[int(0.7 * res), int(0.7 * res)] - S.COLORS["cyan"]).max() <= 3
    assert np.abs(a[2, 2] - S.BACKGROUNDS["navy"]).max() <= 16  # lightly textured background
    # the square's drawn box matches object_box to a pixel
    ys, xs = np.nonzero(np.abs(a - S.COLORS["cyan"]).sum(-1) < 60)
    x0, y0, x1, y1 = S.object_box(spec.objects[1])
    assert abs(xs.min() - x0 * res) <= 1.5 and abs(xs.max() + 1 - x1 * res) <= 1.5
    assert abs(ys.min() - y0 * res) <= 1.5 and abs(ys.max() + 1 - y1 * res) <= 1.5


def test_spec_round_trip():
    s = S.make_sample("color_attr", 3, "train", 0)["scene"]
    assert S.SceneSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError):
        S.ObjectSpec("hexagon", "red", 0.2, 0.5, 0.5)


def test_dataset_is_deterministic(tmp_path):
    a = S.make_dataset(tmp_path / "a", n_per_kind=3, seed=11, split="train")
    b = S.make_dataset(tmp_path / "b", n_per_kind=3, seed=11, split="train")
    c = S.make_dataset(tmp_path / "c", n_per_kind=3, seed=12, split="train")
    fa, fb, fc = _files(a.parent), _files(b.parent), _files(c.parent)
    assert fa == fb  # byte-identical jsonl and PNGs
    assert len(fa) == 1 + 3 * (len(S.ALL_KINDS) - 1) + 3 * len(S.EDIT_KINDS)  # edits have 2 images, text none
    assert fa["train.jsonl"] != fc["train.jsonl"]
    differing = [k for k in fa if k.endswith(".png") and fa[k] != fc.get(k)]
    assert len(differing) >= 0.9 * (len(fa) - 1)


def test_records_follow_the_official_format(tmp_path):
    path = S.make_dataset(tmp_path, n_per_kind=2, seed=0, split="eval", resolution=32)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 2 * len(S.ALL_KINDS)
    fams = Counter()
    for r in recs:
        assert set(r) <= {"id", "image", "conversations", "meta"}
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        fam = r["meta"]["family"]
        fams[fam] += 1
        paths = [p.strip() for p in r.get("image", "").split(",") if p.strip()]
        for p in paths:
            assert not Path(p).is_absolute() and (tmp_path / p).exists()
        if fam == "generation":
            assert human["value"].endswith("\nBased on the above description, generate an image.")
            assert gpt["value"] == "<im_start><image_gen><im_end>" and len(paths) == 1
            assert r["meta"]["geneval"]["tag"] == r["meta"]["category"]
        elif fam == "understanding":
            assert human["value"].startswith("<im_start><image><im_end>\n") and len(paths) == 1
            assert gpt["value"] == r["meta"]["answer"]
        elif fam == "editing":
            assert human["value"].startswith("<im_start><image><im_end>\n") and len(paths) == 2
            assert r["image"].count(",") == 1 and gpt["value"] == "<im_start><image_gen><im_end>"
            assert r["meta"]["source"] != r["meta"]["target"]
        else:
            assert "image" not in r and "<im" not in human["value"]
        if paths:
            from PIL import Image

            with Image.open(tmp_path / paths[0]) as im:
                assert im.size == (32, 32)
    assert fams == {"generation": 12, "understanding": 12, "editing": 8, "text": 2}


def test_meta_sidecar_keeps_records_official(tmp_path):
    path = S.make_dataset(tmp_path, n_per_kind={"colors": 2, "yesno": 2, "move": 1}, seed=0, meta="sidecar")
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    metas = [json.loads(x) for x in (tmp_path / "train.meta.jsonl").read_text().splitlines()]
    assert len(recs) == len(metas) == 5
    assert all(set(r) <= {"id", "image", "conversations"} for r in recs)
    assert [m["id"] for m in metas] == [r["id"] for r in recs]
    assert metas[0]["meta"]["category"] == "colors"


def _pairs_of(sample) -> set[tuple[str, str]]:
    out = set()
    for key in ("scene", "source", "target"):
        if key in sample:
            out |= set(sample[key].pairs())
    return out


def test_splits_are_disjoint_and_heldout_pairs_never_trained():
    seen_train, train_scenes, heldout_hits = set(), set(), 0
    for kind in S.ALL_KINDS:
        for i in range(60):
            s = S.make_sample(kind, 0, "train", i)
            seen_train |= _pairs_of(s)
            text = " ".join(str(s.get(k, "")) for k in ("prompt", "question", "instruction", "answer"))
            for shape, color in S.HELDOUT_PAIRS:
                assert f"{color} {shape}" not in text
            for key in ("scene", "source"):
                if key in s:
                    train_scenes.add(json.dumps(s[key].to_dict(), sort_keys=True))
    assert not seen_train & S.HELDOUT_PAIRS
    assert len(seen_train) == len(S.SHAPES) * len(S.COLORS) - len(S.HELDOUT_PAIRS)  # everything else is seen
    eval_pairs = set()
    for kind in S.ALL_KINDS:
        for i in range(60):
            s = S.make_sample(kind, 0, "eval", i)  # same seed, eval split: other seed sequences
            eval_pairs |= _pairs_of(s)
            for key in ("scene", "source"):
                if key in s:
                    assert json.dumps(s[key].to_dict(), sort_keys=True) not in train_scenes
            if kind in ("colors", "color_attr"):
                heldout_hits += bool(s["heldout"])
                assert s["heldout"] == bool(_pairs_of(s) & S.HELDOUT_PAIRS)
    assert S.HELDOUT_PAIRS <= eval_pairs
    assert heldout_hits >= 60  # every even index of both categories uses a held-out composition


def test_eval_items_are_balanced_and_varied():
    items = S.eval_prompts(seed=4, n=16, resolution=48)
    gens, qas, eds = items["generation"], items["understanding"], items["editing"]
    assert Counter(g.category for g in gens) == {c: 16 for c in S.GENERATION_CATEGORIES}
    assert Counter(q.qtype for q in qas) == {t: 16 for t in S.UNDERSTANDING_TYPES + ("text",)}
    assert Counter(e.kind for e in eds) == {k: 16 for k in S.EDIT_KINDS}
    yn = [q.answer for q in qas if q.qtype == "yesno"]
    assert yn.count("Yes") == yn.count("No") == 8
    assert Counter(q.answer for q in qas if q.qtype == "mcq") == {"A": 4, "B": 4, "C": 4, "D": 4}
    assert Counter(g.geneval["include"][1]["position"][0] for g in gens if g.category == "position") == \
        {r: 4 for r in S.RELATIONS}
    for cat in S.GENERATION_CATEGORIES:  # several phrasings per meaning
        firsts = {" ".join(g.prompt.split()[:2]) for g in gens if g.category == cat}
        assert len(firsts) >= 3, (cat, firsts)
    assert all(q.image is not None and q.image.size == (48, 48) for q in qas if q.qtype != "text")
    assert all(q.image is None for q in qas if q.qtype == "text")
    for q in qas:
        if q.qtype == "mcq":
            assert all(f"\n{k}. {v}" in q.question for k, v in q.options.items()) and len(q.options) == 4
    again = S.eval_prompts(seed=4, n=16, resolution=48)
    assert [g.text for g in again["generation"]] == [g.text for g in gens]
    assert [q.question for q in again["understanding"]] == [q.question for q in qas]
    other = S.eval_prompts(seed=5, n=16, resolution=48)
    assert sum(a.spec != b.spec for a, b in zip(other["generation"], gens)) >= 0.9 * len(gens)


def _truth_detections(spec):
    return [J.Detection(o.shape, o.color, 1.0, S.object_box(o), 0.01) for o in spec.objects]


def test_specs_satisfy_their_geneval_metadata_and_answers():
    items = S.eval_prompts(seed=9, n=30, resolution=32)
    for g in items["generation"]:
        ok, why = J.score_geneval(_truth_detections(g.spec), g.geneval)
        assert ok, (g.prompt, why)
        assert g.geneval["prompt"] == g.prompt and g.text == g.prompt + S.GEN_SUFFIX
    for q in items["understanding"]:  # the stored answer scores as right against the spec
        assert J.score_answer(q.answer, q.answer, q.answer_type, q.options, q.spec), q
        if q.qtype == "count":
            shape = J.normalize_shape(q.question)
            assert sum(o.shape == shape for o in q.spec.objects) == int(q.answer)
        if q.qtype == "caption":
            assert J.parse_caption(q.answer) == Counter((o.color, o.shape) for o in q.spec.objects)
    for e in items["editing"]:
        assert len(e.target.objects) == len(e.source.objects) + {"add": 1, "remove": -1}.get(e.kind, 0)
