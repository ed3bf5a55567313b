"""Digits: real data split, rendering, dataset format and the judge classifier."""

from __future__ import annotations

import json

import numpy as np

from cheers.eval import digits as D
from cheers.eval import judge as J

JUDGE_FLOOR = 0.95


def test_split_is_fixed_stratified_and_disjoint():
    x8, y = D.load_real_digits()
    assert x8.shape == (1797, 8, 8) and 0 <= x8.min() and x8.max() <= 1
    tr, ho = D.digit_split()
    assert len(tr) + len(ho) == 1797 and not set(tr) & set(ho)
    assert 430 <= len(ho) <= 470
    for c in range(10):
        frac = (y[ho] == c).sum() / (y == c).sum()
        assert abs(frac - 0.25) < 0.02
    assert np.array_equal(ho, np.sort(ho)) and ho[:5].tolist() == D.digit_split()[1][:5].tolist()


def test_render_and_features():
    x8, y = D.load_real_digits()
    im = D.render_digit(x8[0], 64)
    assert im.size == (64, 64) and im.mode == "RGB"
    a = np.asarray(im)
    assert a[0, 0].max() < 20 and a.max() > 200  # white on black
    inv = D.render_digit(x8[0], 64, "black_on_white")
    assert np.asarray(inv)[0, 0].min() > 235
    f, g = D.digit_features(im), D.digit_features(inv)
    assert f.shape == (64,) and np.abs(f - g).max() < 1.0  # polarity normalised
    assert np.corrcoef(f, x8[0].ravel())[0, 1] > 0.9  # the features recover the real 8x8 digit


def test_judge_heldout_accuracy():
    j = D.digit_judge(64)
    print(f"digit judge held-out accuracy: {j.heldout_accuracy:.4f}")
    assert j.heldout_accuracy >= JUDGE_FLOOR
    x8, y = D.load_real_digits()
    _, ho = D.digit_split()
    ims = [D.render_digit(x8[i], 64, "black_on_white") for i in ho[:100]]
    acc = np.mean(np.array(j.predict(ims)) == y[ho[:100]])
    assert acc >= JUDGE_FLOOR  # black-on-white renders are classified as well
    big = [D.render_digit(x8[i], 128) for i in ho[:100]]  # other resolutions too
    assert np.mean(np.array(j.predict(big)) == y[ho[:100]]) >= JUDGE_FLOOR


def test_dataset_format_and_determinism(tmp_path):
    p1 = D.make_digits_dataset(tmp_path / "a", seed=1, split="train", n_gen=6, n_und=5, resolution=32)
    p2 = D.make_digits_dataset(tmp_path / "b", seed=1, split="train", n_gen=6, n_und=5, resolution=32)
    assert p1.read_bytes() == p2.read_bytes()
    recs = [json.loads(x) for x in p1.read_text().splitlines()]
    assert len(recs) == 11
    tr, ho = D.digit_split()
    for r in recs:
        m = r["meta"]
        assert (tmp_path / "a" / r["image"]).exists() and m["source_index"] in set(tr.tolist())
        human, gpt = r["conversations"]
        if m["family"] == "generation":
            assert human["value"].endswith("\nBased on the above description, generate an image.")
            assert (str(m["label"]) in human["value"]) or (J.normalize_number(human["value"]) == m["label"])
            assert gpt["value"] == "<im_start><image_gen><im_end>"
        else:
            assert human["value"].startswith("<im_start><image><im_end>\n") and gpt["value"] == str(m["label"])
    ev = [json.loads(x) for x in D.make_digits_dataset(tmp_path / "c", split="eval", n_gen=20, n_und=20,
                                                       resolution=32).read_text().splitlines()]
    assert all(r["meta"]["source_index"] in set(ho.tolist()) for r in ev)
    full = D.make_digits_dataset(tmp_path / "d", split="eval", resolution=16, meta="none")
    assert len(full.read_text().splitlines()) == 2 * len(ho)


def test_eval_items():
    items = D.digit_eval_items(seed=0, n=30, resolution=64)
    assert [g.label for g in items["generation"]] == [i % 10 for i in range(30)]
    assert len({g.prompt.split()[0] for g in items["generation"]}) >= 3  # several phrasings
    _, ho = D.digit_split()
    x8, y = D.load_real_digits()
    assert all(q.source_index in set(ho.tolist()) and y[q.source_index] == q.label for q in items["understanding"])
    again = D.digit_eval_items(seed=0, n=30, resolution=64)
    assert [q.source_index for q in again["understanding"]] == [q.source_index for q in items["understanding"]]
