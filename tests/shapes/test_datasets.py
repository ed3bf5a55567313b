"""ShapesWorld datasets: determinism, the official record format, the meta sidecar."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from cheers.shapes import datasets as DS
from cheers.shapes import samples as SM


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_is_deterministic(tmp_path):
    a = DS.make_dataset(tmp_path / "a", n_per_kind=3, seed=11, split="train")
    b = DS.make_dataset(tmp_path / "b", n_per_kind=3, seed=11, split="train")
    c = DS.make_dataset(tmp_path / "c", n_per_kind=3, seed=12, split="train")
    fa, fb, fc = _files(a.parent), _files(b.parent), _files(c.parent)
    assert fa == fb  # byte-identical jsonl and PNGs
    assert len(fa) == 1 + 3 * (len(SM.ALL_KINDS) - 1) + 3 * len(SM.EDIT_KINDS)  # edits have 2 images, text none
    assert fa["train.jsonl"] != fc["train.jsonl"]
    differing = [k for k in fa if k.endswith(".png") and fa[k] != fc.get(k)]
    assert len(differing) >= 0.9 * (len(fa) - 1)


def test_records_follow_the_official_format(tmp_path):
    path = DS.make_dataset(tmp_path, n_per_kind=2, seed=0, split="eval", resolution=32)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 2 * len(SM.ALL_KINDS)
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
    path = DS.make_dataset(tmp_path, n_per_kind={"colors": 2, "yesno": 2, "move": 1}, seed=0, meta="sidecar")
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    metas = [json.loads(x) for x in (tmp_path / "train.meta.jsonl").read_text().splitlines()]
    assert len(recs) == len(metas) == 5
    assert all(set(r) <= {"id", "image", "conversations"} for r in recs)
    assert [m["id"] for m in metas] == [r["id"] for r in recs]
    assert metas[0]["meta"]["category"] == "colors"
