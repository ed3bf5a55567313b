"""Writers for external benchmarks' evaluators (the model is any object with the `cheers.pipeline.Cheers` API).

* `geneval_write`: images in the folder layout GenEval's `evaluate_images.py` reads:
  `out_dir/00000/metadata.jsonl` (the prompt's metadata line), `out_dir/00000/samples/0000.png ...`, `grid.png`;
  `geneval_score` scores such a folder with the ShapesWorld judge (for ShapesWorld-class metadata, e.g. from
  `write_geneval_metadata`), GenEval-style: per-tag accuracy over images, overall = mean of the tags;
* `dpg_write`: DPG-Bench: one `<name>.txt` prompt per file -> `out_dir/<name>.png`, a grid of the prompt's
  samples (2x2 for the conventional 4);
* `mcq_answer`: answers an MMBench-format TSV (index, question, hint, A-D, answer?, category, image as base64) and
  writes the predictions (TSV, or CSV when `out` ends in .csv) plus `<out stem>_summary.json` with the accuracy
  overall and per category when answers are given.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from cheers.eval import judge as J
from cheers.eval.harness import batched_answer, batched_generate
from cheers.eval.shapes import eval_prompts
from cheers.shapes.datasets import GEN_SUFFIX
from cheers.shapes.samples import MCQ_SUFFIX

__all__ = ["GEN_TEMPLATE", "RAW_TEMPLATE", "EVAL_PRESETS", "BenchmarkPreset", "MCQ_SUFFIX", "geneval_write", "geneval_score", "write_geneval_metadata", "dpg_write",
           "mcq_answer", "sample_grid", "read_mmbench_tsv"]

GEN_TEMPLATE = "{prompt}" + GEN_SUFFIX  # the training format of ShapesWorld / the official t2i samples
RAW_TEMPLATE = "{prompt}"


@dataclass(frozen=True)
class BenchmarkPreset:
    """How the reference's evaluation scripts sample a benchmark (its GenEval script passes no shift, so the
    `generate` default of 1.0 applies; prompts go in as written, with guidance at every Euler step)."""

    steps: int
    cfg_scale: float
    shift: float
    prompt_template: str = RAW_TEMPLATE
    sampler: str = "euler"
    cfg_interval: tuple[float, float] = (0.0, 1.0)

    def sampling(self) -> dict[str, Any]:
        return {"steps": self.steps, "cfg_scale": self.cfg_scale, "shift": self.shift, "sampler": self.sampler,
                "cfg_interval": self.cfg_interval, "prompt_template": self.prompt_template}


EVAL_PRESETS = {
    "geneval": BenchmarkPreset(steps=80, cfg_scale=9.5, shift=1.0),
    "dpg": BenchmarkPreset(steps=250, cfg_scale=9.5, shift=0.5),
}


def sample_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images (same size) tiled in a near-square grid without gaps: 4 -> 2x2."""
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def _read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def geneval_write(model: Any, metadata_jsonl: str | os.PathLike, out_dir: str | os.PathLike, n_samples: int = 4,
                  seed: int = 0, batch_size: int = 8, prompt_template: str = GEN_TEMPLATE, grid: bool = True,
                  **gen_kw: Any) -> Path:
    """Generate `n_samples` images per line of GenEval's `evaluation_metadata.jsonl` (needs "prompt") into
    `out_dir/{i:05d}/samples/{k:04d}.png` with the line in `out_dir/{i:05d}/metadata.jsonl`. Image k of prompt i
    uses seed + i * n_samples + k. Returns out_dir."""
    metas = _read_jsonl(metadata_jsonl)
    out = Path(out_dir)
    prompts = [prompt_template.format(prompt=m["prompt"]) for m in metas for _ in range(n_samples)]
    images = batched_generate(model, prompts, seed, batch_size, **gen_kw)
    for i, m in enumerate(metas):
        folder = out / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
            json.dump(m, f)
        ims = images[i * n_samples:(i + 1) * n_samples]
        for k, im in enumerate(ims):
            im.save(folder / "samples" / f"{k:04d}.png")
        if grid and ims:
            sample_grid(ims).save(folder / "grid.png")
    return out


def write_geneval_metadata(path: str | os.PathLike, seed: int = 0, n: int = 10) -> Path:
    """ShapesWorld's eval generation prompts (`n` per category) as a GenEval `evaluation_metadata.jsonl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = eval_prompts(seed, n, families=("generation",))["generation"]
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.geneval) + "\n")
    return path


def geneval_score(out_dir: str | os.PathLike, write: bool = True) -> dict[str, Any]:
    """Score a GenEval folder (ShapesWorld classes) with the judge: {"categories": {tag: accuracy}, "overall",
    "n_images"}; per-image results go to out_dir/results.jsonl as GenEval's evaluator writes them."""
    out = Path(out_dir)
    per_tag: dict[str, list[float]] = defaultdict(list)
    results = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and (p / "metadata.jsonl").exists()):
        meta = json.loads((folder / "metadata.jsonl").read_text(encoding="utf-8"))
        for png in sorted((folder / "samples").glob("*.png")):
            with Image.open(png) as im:
                r = J.score_generation(im.convert("RGB"), meta)
            per_tag[meta["tag"]].append(float(r["correct"]))
            results.append({"filename": str(png), "tag": meta["tag"], "prompt": meta.get("prompt", ""),
                            "correct": r["correct"], "reason": r["reason"], "details": r["detections"]})
    cats = {t: sum(v) / len(v) for t, v in sorted(per_tag.items())}
    summary = {"categories": cats, "overall": sum(cats.values()) / len(cats) if cats else 0.0,
               "n_images": len(results)}
    if write:
        with open(out / "results.jsonl", "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return summary


def dpg_write(model: Any, prompts_dir: str | os.PathLike, out_dir: str | os.PathLike, n_samples: int = 4,
              seed: int = 0, batch_size: int = 8, prompt_template: str = GEN_TEMPLATE, **gen_kw: Any) -> list[Path]:
    """DPG-Bench: for each `prompts_dir/<name>.txt` (sorted), `n_samples` images tiled into `out_dir/<name>.png`
    (2x2 for 4 samples, each tile at the model's resolution). Image k of prompt i uses seed + i * n_samples + k."""
    files = sorted(Path(prompts_dir).glob("*.txt"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [f.read_text(encoding="utf-8").strip() for f in files]
    prompts = [prompt_template.format(prompt=t) for t in texts for _ in range(n_samples)]
    images = batched_generate(model, prompts, seed, batch_size, **gen_kw)
    paths = []
    for i, f in enumerate(files):
        p = out / f"{f.stem}.png"
        sample_grid(images[i * n_samples:(i + 1) * n_samples]).save(p)
        paths.append(p)
    return paths


_MISSING = {"", "nan", "none", "null"}


def _present(v: Any) -> bool:
    return v is not None and str(v).strip().lower() not in _MISSING


def read_mmbench_tsv(tsv: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of an MMBench-format TSV (base64 images can be large: no field size limit)."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 10
    with open(tsv, encoding="utf-8", newline="") as f:
        return [dict(r) for r in csv.DictReader(f, delimiter="\t")]


def _decode_image(value: str) -> Image.Image:
    raw = base64.b64decode(value)
    with Image.open(io.BytesIO(raw)) as im:
        return im.convert("RGB")


def mcq_answer(model: Any, tsv: str | os.PathLike, out: str | os.PathLike, batch_size: int = 8,
               suffix: str = MCQ_SUFFIX, **answer_kw: Any) -> dict[str, Any]:
    """Answer every row of an MMBench-format TSV; writes `out` (columns index, prediction, raw, and answer,
    correct, category when present) and `<out stem>_summary.json`. Returns the summary (accuracy when the TSV has
    answers, overall and per category). The prompt is `hint\\nquestion\\nA. ...\\nB. ...\\n<suffix>`; an image
    field holding a row index (MMBench's de-duplication) refers to that row's image."""
    rows = read_mmbench_tsv(tsv)
    by_index = {str(r.get("index", "")).strip(): r for r in rows}
    questions, images, options_l = [], [], []
    for r in rows:
        options = {k: str(r[k]).strip() for k in "ABCD" if _present(r.get(k))}
        parts = [str(r["hint"]).strip()] if _present(r.get("hint")) else []
        parts.append(str(r.get("question", "")).strip())
        parts += [f"{k}. {v}" for k, v in options.items()]
        parts.append(suffix)
        questions.append("\n".join(p for p in parts if p))
        img = str(r.get("image", "") or "").strip()
        if len(img) < 64 and img in by_index and by_index[img] is not r:
            img = str(by_index[img].get("image", "")).strip()
        images.append(_decode_image(img) if _present(img) else None)
        options_l.append(options)
    raw = batched_answer(model, images, questions, batch_size, **answer_kw)
    has_answer = any(_present(r.get("answer")) for r in rows)
    has_cat = any(_present(r.get("category")) for r in rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["index", "prediction", "raw"] + (["answer", "correct"] if has_answer else []) + \
        (["category"] if has_cat else [])
    per_cat: dict[str, list[float]] = defaultdict(list)
    oks: list[float] = []
    unparsed = 0
    with open(out, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="," if out.suffix.lower() == ".csv" else "\t", lineterminator="\n")
        w.writerow(cols)
        for r, a, opts in zip(rows, raw, options_l):
            letter = J.normalize_letter(a, opts)
            unparsed += letter is None
            line = [r.get("index", ""), letter or "", " ".join(a.split())]
            if has_answer:
                truth = str(r.get("answer", "")).strip().upper()
                ok = letter is not None and letter == truth
                oks.append(float(ok))
                line += [truth, int(ok)]
                if has_cat:
                    per_cat[str(r.get("category", "")).strip()].append(float(ok))
            if has_cat:
                line.append(str(r.get("category", "")).strip())
            w.writerow(line)
    summary: dict[str, Any] = {"n": len(rows), "unparsed": unparsed, "predictions": str(out)}
    if has_answer:
        summary["accuracy"] = sum(oks) / len(oks) if oks else 0.0
        if per_cat:
            summary["categories"] = {c: sum(v) / len(v) for c, v in sorted(per_cat.items())}
    (out.with_name(out.stem + "_summary.json")).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                                           encoding="utf-8")
    return summary
