"""Harness: oracle fakes score 1.0, wrong fakes score low; reports, files, batching and determinism."""

from __future__ import annotations

import json

from PIL import Image

from cheers.eval.harness import evaluate_digits, evaluate_shapes, generation_sharpness, make_grid, model_resolution
from cheers.shapes import samples as SM

from .fakes import DigitOracle, OracleShapes, WrongShapes

N = 4


def test_oracle_scores_perfectly(tmp_path, capsys):
    model = OracleShapes(seed=3, n=N, resolution=64)
    rep = evaluate_shapes(model, n=N, seed=3, out_dir=tmp_path / "run", batch_size=5)
    g, u, e = rep["generation"], rep["understanding"], rep["editing"]
    assert set(g["categories"]) == set(SM.GENERATION_CATEGORIES)
    assert all(v["score"] == 1.0 and v["n"] == N for v in g["categories"].values())
    assert g["overall"] == 1.0 and g["heldout_compositions"]["score"] == 1.0 and g["heldout_compositions"]["n"] >= N
    p = g["partial"]
    assert p["shape_present"] == p["colour_present"] == p["object_count"] == 1.0
    # one object per single_object / colors prompt, two for two_object / position / color_attr, 1-4 when counting
    assert 1.5 < p["recognised_objects_per_image"] < 3.0
    assert set(u["types"]) == set(SM.UNDERSTANDING_TYPES) | {"text"}
    assert all(v["accuracy"] == 1.0 for v in u["types"].values()) and u["overall"] == 1.0
    assert u["yesno"]["yes_ratio"] == 0.5 and u["yesno"]["f1"] == 1.0 and u["yesno"]["unparsed"] == 0
    assert e["score"] == e["applied"] == e["preserved"] == 1.0 and set(e["kinds"]) == set(SM.EDIT_KINDS)
    # batching: at most 5 per call, image seeds = seed + index of the first item of the batch
    gen_calls = [c for c in model.calls if c[0] == "generate_image"]
    assert [c[1] for c in gen_calls] == [5, 5, 5, 5, 4] and [c[2] for c in gen_calls] == [3, 8, 13, 18, 23]
    assert max(c[1] for c in model.calls) <= 5
    out = tmp_path / "run"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    details = [json.loads(x) for x in (out / "details.jsonl").read_text().splitlines()]
    assert len(details) == 6 * N + 7 * N + 4 * N and all(d["correct"] for d in details)
    for name in ("generation_grid.png", "understanding_grid.png", "editing_grid.png"):
        with Image.open(out / name) as im:
            assert im.width >= 256 and im.height >= 128
    assert len(list((out / "generation").glob("*.png"))) == 6 * N
    # the saved pictures are the real renders of the prompts: exactly as sharp as them
    assert generation_sharpness(out, N, 3, 64)["ratio"] == 1.0
    table = capsys.readouterr().out
    assert "color_attr" in table and "overall" in table and "yes-ratio" in table
    # deterministic for a given seed
    evaluate_shapes(OracleShapes(seed=3, n=N), n=N, seed=3, out_dir=tmp_path / "again", batch_size=3, verbose=False)
    assert (tmp_path / "again" / "report.json").read_bytes() == (out / "report.json").read_bytes()
    assert (tmp_path / "again" / "details.jsonl").read_bytes() == (out / "details.jsonl").read_bytes()


def test_wrong_model_scores_low(tmp_path):
    rep = evaluate_shapes(WrongShapes(seed=1, n=N), n=N, seed=1, out_dir=tmp_path, batch_size=8, verbose=False)
    assert rep["generation"]["overall"] == 0.0
    assert all(v["score"] == 0.0 for v in rep["generation"]["categories"].values())
    # every object drawn, each with the next shape and colour: counts right, asked colours absent; a shape asked
    # for may still appear as the wrong-shaped stand-in of another object (two-object prompts)
    p = rep["generation"]["partial"]
    assert p["object_count"] == 1.0 and p["colour_present"] < 0.3 and p["shape_present"] < 0.4
    u = rep["understanding"]
    assert u["yesno"]["yes_ratio"] == 1.0 and u["types"]["yesno"]["accuracy"] == 0.5
    assert u["types"]["mcq"]["accuracy"] == 0.25  # always "A", letters balanced
    assert u["types"]["caption"]["accuracy"] == 0.0 and u["overall"] < 0.15
    # unchanged sources: nothing applied, the rest of the scene preserved
    assert rep["editing"]["score"] == 0.0 and rep["editing"]["applied"] == 0.0 and rep["editing"]["preserved"] == 1.0


def test_blank_model_and_partial_tasks(tmp_path):
    class Blank:
        resolution = 48

        def generate_image(self, prompts, seed=0, **kw):
            return [Image.new("RGB", (48, 48)) for _ in prompts]

    rep = evaluate_shapes(Blank(), n=2, seed=0, out_dir=tmp_path, tasks=("generation",), verbose=False)
    assert rep["resolution"] == 48 and rep["generation"]["overall"] == 0.0
    assert "understanding" not in rep and "editing" not in rep
    sharp = generation_sharpness(tmp_path, 2, 0, 48)  # flat pictures carry no high-frequency energy
    assert sharp["generated"] == 0.0 and sharp["real"] > 0.01 and sharp["ratio"] == 0.0
    assert model_resolution(object()) == 64


def test_digits_oracle_and_wrong(tmp_path):
    rep = evaluate_digits(DigitOracle(seed=2, n=20), n=20, seed=2, out_dir=tmp_path / "ok", batch_size=6,
                          verbose=False)
    assert rep["judge_heldout_accuracy"] >= 0.95
    assert rep["generation"]["accuracy"] >= 0.95 and rep["understanding"]["accuracy"] == 1.0
    assert set(rep["generation"]["by_digit"]) == {str(d) for d in range(10)}
    assert (tmp_path / "ok" / "generation_grid.png").exists() and (tmp_path / "ok" / "report.json").exists()
    bad = evaluate_digits(DigitOracle(seed=2, n=20, offset=1), n=20, seed=2, out_dir=tmp_path / "bad",
                          verbose=False)
    assert bad["generation"]["accuracy"] <= 0.1 and bad["understanding"]["accuracy"] == 0.0


def test_make_grid_layout():
    ims = [Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(10)]
    g = make_grid(ims, [f"caption {i}" for i in range(10)], cols=4, cell=32, caption_lines=2)
    assert g.width == 4 * 32 and g.height == 3 * (32 + 2 * 11 + 4)
    assert g.getpixel((32 * 1 + 5, 5)) == (20, 0, 0)
    wide = make_grid([Image.new("RGB", (48, 16))] * 3, cols=3, cell=96)  # aspect kept: 96 x 32 tiles
    assert wide.size == (3 * 96, 32)
