"""Adapters: GenEval folder layout, DPG-Bench grids, MMBench TSV answers, and the `eval` CLI."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import sys
import types

from PIL import Image

from cheers.eval import adapters as A
from cheers.eval import shapes as S
from cheers.eval.cli import add_eval_subcommands, run_eval
from cheers.shapes import datasets as DS
from cheers.shapes import samples as SM

from .fakes import FixedAnswers, OracleShapes, SolidColors


def test_geneval_layout_with_official_metadata(tmp_path):
    metas = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
             {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
              "prompt": "a photo of two cats"}]
    md = tmp_path / "evaluation_metadata.jsonl"
    md.write_text("".join(json.dumps(m) + "\n" for m in metas))
    model = SolidColors(32)
    out = A.geneval_write(model, md, tmp_path / "out", n_samples=3, seed=10, batch_size=4)
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for i, m in enumerate(metas):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == m
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
        for k in range(3):
            with Image.open(folder / "samples" / f"{k:04d}.png") as im:
                assert im.getpixel((0, 0)) == model.color(10 + 3 * i + k)  # seed + i * n_samples + k
        assert (folder / "grid.png").exists()
    assert model.prompts[0] == "a photo of a bench" + DS.GEN_SUFFIX and model.prompts[3].startswith("a photo of two")


def test_geneval_round_trip_with_shapes_metadata(tmp_path):
    md = A.write_geneval_metadata(tmp_path / "meta.jsonl", seed=5, n=2)
    lines = [json.loads(x) for x in md.read_text().splitlines()]
    assert len(lines) == 12 and {m["tag"] for m in lines} == set(SM.GENERATION_CATEGORIES)
    out = A.geneval_write(OracleShapes(seed=5, n=2), md, tmp_path / "gen", n_samples=2, seed=0, grid=False)
    summary = A.geneval_score(out)
    assert summary["overall"] == 1.0 and summary["n_images"] == 24
    assert set(summary["categories"]) == set(SM.GENERATION_CATEGORIES)
    assert len((out / "results.jsonl").read_text().splitlines()) == 24


def test_dpg_writes_a_2x2_grid_per_prompt(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name, text in [("b_scene", "A red circle."), ("a_scene", "Two stars.\n"), ("c", "A cross.")]:
        (prompts / f"{name}.txt").write_text(text)
    (prompts / "notes.md").write_text("not a prompt")
    model = SolidColors(24)
    paths = A.dpg_write(model, prompts, tmp_path / "out", seed=100)
    assert [p.name for p in paths] == ["a_scene.png", "b_scene.png", "c.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_scene.png", "b_scene.png", "c.png"]
    with Image.open(paths[1]) as im:  # second prompt in sorted order: seeds 104..107, row-major 2x2
        assert im.size == (48, 48)
        assert [im.getpixel((x, y)) for y in (5, 29) for x in (5, 29)] == [model.color(104 + k) for k in range(4)]
    assert model.prompts[0] == "Two stars." + DS.GEN_SUFFIX and len(model.prompts) == 12


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_fixture(tmp_path):
    qas = [q for q in S.eval_prompts(seed=8, n=4, resolution=32, families=("understanding",))["understanding"]
           if q.qtype == "mcq"]
    rows, table = [], {}
    for i, q in enumerate(qas):
        stem = q.question.split("\n")[0]
        hint = "Look at the shapes." if i == 0 else "nan"
        image = _b64(q.image) if i != 2 else "1000"  # row 2 reuses row 0's image by index (MMBench de-dup)
        rows.append({"index": 1000 + i, "question": stem, "hint": hint, **q.options, "answer": q.answer,
                     "category": "shapes" if i % 2 else "colours", "image": image})
    rows.append({"index": 2000, "question": "How many sides does a triangle have?", "hint": "", "A": "3",
                 "B": "4", "C": "", "D": "", "answer": "A", "category": "text", "image": ""})
    path = tmp_path / "mmbench.tsv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                          "image"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return rows, path


def _prompt(row):
    parts = ([row["hint"]] if row["hint"] not in ("", "nan") else []) + [row["question"]]
    parts += [f"{k}. {row[k]}" for k in "ABCD" if row[k]]
    return "\n".join(parts + [A.MCQ_SUFFIX])


def test_mcq_answer_right_and_wrong(tmp_path):
    rows, tsv = _mmbench_fixture(tmp_path)
    right = FixedAnswers({_prompt(r): f"The answer is {r['answer']}." for r in rows})
    summary = A.mcq_answer(right, tsv, tmp_path / "pred.tsv", batch_size=2)
    assert summary["accuracy"] == 1.0 and summary["n"] == len(rows) and summary["unparsed"] == 0
    assert summary["categories"] == {"colours": 1.0, "shapes": 1.0, "text": 1.0}
    with open(tmp_path / "pred.tsv", newline="") as f:
        out = list(csv.DictReader(f, delimiter="\t"))
    assert list(out[0]) == ["index", "prediction", "raw", "answer", "correct", "category"]
    assert [o["index"] for o in out] == [str(r["index"]) for r in rows]
    assert all(o["prediction"] == o["answer"] and o["correct"] == "1" for o in out)
    assert right.seen[2][1] == right.seen[0][1] == (32, 32) and right.seen[-1][1] is None
    assert json.loads((tmp_path / "pred_summary.json").read_text())["accuracy"] == 1.0
    # a model answering with the text of a wrong option, as CSV, without the answer column
    wrong = FixedAnswers({_prompt(r): next(r[k] for k in "ABCD" if r[k] and k != r["answer"]) for r in rows})
    s2 = A.mcq_answer(wrong, tsv, tmp_path / "wrong.csv")
    assert s2["accuracy"] == 0.0
    with open(tmp_path / "wrong.csv", newline="") as f:
        assert all(o["prediction"] not in ("", o["answer"]) for o in csv.DictReader(f))
    noans = tmp_path / "noans.tsv"
    lines = tsv.read_text().splitlines()
    hdr = lines[0].split("\t")
    keep = [i for i, h in enumerate(hdr) if h != "answer"]
    noans.write_text("\n".join("\t".join(line.split("\t")[i] for i in keep) for line in lines) + "\n")
    s3 = A.mcq_answer(right, noans, tmp_path / "noans_pred.tsv")
    assert "accuracy" not in s3
    with open(tmp_path / "noans_pred.tsv", newline="") as f:
        assert list(next(csv.reader(f, delimiter="\t"))) == ["index", "prediction", "raw", "category"]


def _parser():
    p = argparse.ArgumentParser(prog="cheers")
    add_eval_subcommands(p.add_subparsers(dest="command"))
    return p


def test_cli_registers_and_runs(tmp_path, monkeypatch, capsys):
    p = _parser()
    a = p.parse_args(["eval", "shapes", "--model", "m", "--n", "2", "--seed", "3", "--out", str(tmp_path / "s"),
                      "--batch", "4"])
    assert (a.eval_command, a.n, a.seed, a.batch, a.func) == ("shapes", 2, 3, 4, run_eval)
    for argv in (["eval", "geneval", "--metadata", "m.jsonl", "--out", "o"],
                 ["eval", "dpg", "--prompts", "d", "--out", "o"],
                 ["eval", "mcq", "--tsv", "x.tsv", "--out", "p.tsv"], ["eval", "digits", "--n", "5"]):
        assert p.parse_args(argv).func is run_eval
    # the model is loaded lazily through cheers.pipeline.Cheers.from_pretrained(args.model)
    loaded = []

    class FakeCheers:
        @staticmethod
        def from_pretrained(path, **kw):
            loaded.append(path)
            return OracleShapes(seed=3, n=2)

    monkeypatch.setitem(sys.modules, "cheers.pipeline", types.SimpleNamespace(Cheers=FakeCheers))
    assert a.func(a) == 0 and loaded == ["m"]
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["generation"]["overall"] == 1.0 and rep["n"] == 2
    assert "ShapesWorld" in capsys.readouterr().out
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "x.txt").write_text("A star.")
    a = p.parse_args(["eval", "dpg", "--prompts", str(prompts), "--out", str(tmp_path / "dpg")])
    assert run_eval(a, model=SolidColors(8)) == 0 and (tmp_path / "dpg" / "x.png").exists()


def _cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_eval_subcommands(p.add_subparsers())
    return p


class RecordingModel(SolidColors):
    def __init__(self):
        super().__init__(8)
        self.kw: list[dict] = []

    def generate_image(self, prompts, seed=0, **kw):
        self.kw.append(kw)
        return super().generate_image(prompts, seed=seed)


def test_geneval_and_dpg_sample_as_the_reference_scripts(tmp_path):
    """GenEval: raw prompts, cfg 9.5, 80 Euler steps, shift 1.0 (the `generate` default); DPG: 250 steps, shift 0.5;
    guidance at every step. Command-line flags override the preset."""
    md = tmp_path / "m.jsonl"
    md.write_text(json.dumps({"tag": "single_object", "prompt": "a photo of a bench"}) + "\n")
    model = RecordingModel()
    a = _cli().parse_args(["eval", "geneval", "--metadata", str(md), "--out", str(tmp_path / "g"), "--n-samples", "1"])
    assert run_eval(a, model=model) == 0
    assert model.prompts == ["a photo of a bench"]  # no instruction suffix added
    assert model.kw[-1] == {"steps": 80, "cfg_scale": 9.5, "shift": 1.0, "sampler": "euler", "cfg_interval": (0.0, 1.0)}
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "x.txt").write_text("A star.")
    a = _cli().parse_args(["eval", "dpg", "--prompts", str(prompts), "--out", str(tmp_path / "d"), "--n-samples", "1",
                           "--shift", "0.7", "--dtype", "bfloat16", "--device", "cpu"])
    assert (a.dtype, a.device) == ("bfloat16", "cpu")
    assert run_eval(a, model=model) == 0
    assert model.prompts[-1] == "A star."
    assert model.kw[-1] == {"steps": 250, "cfg_scale": 9.5, "shift": 0.7, "sampler": "euler", "cfg_interval": (0.0, 1.0)}
    a = _cli().parse_args(["eval", "dpg", "--prompts", str(prompts), "--out", str(tmp_path / "e"), "--n-samples", "1",
                           "--prompt-template", "{prompt} Draw it."])
    run_eval(a, model=model)
    assert model.prompts[-1] == "A star. Draw it."
