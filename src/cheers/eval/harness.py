"""Model-agnostic evaluation on ShapesWorld and Digits.

The model is any object with (the `cheers.pipeline.Cheers` API)::

    generate_image(prompts: list[str], seed: int, **kw) -> list[PIL.Image]   # image i uses seed + i
    answer(images: list[PIL.Image | list], questions: list[str], **kw) -> list[str]   # []: a text-only question
    edit(images: list[PIL.Image], instructions: list[str], seed: int, **kw) -> list[PIL.Image]

`evaluate_shapes` and `evaluate_digits` run it in batches on the seeded evaluation items, score every output with
the automatic judges, print a table, and write to `out_dir`: report.json (the returned report), details.jsonl
(one line per item: input, truth, output, verdict), the generated/edited PNGs and PNG grids of samples for a human
to look at. Scores depend only on the model outputs and the seed.

Scores: generation = GenEval's rule per category (single_object, two_object, counting, colors, position,
color_attr), overall = mean of the six; understanding = accuracy per question type (+ yes/no balance: yes ratio,
precision, recall, F1), overall = mean of the types; editing = fraction of edits with the change applied AND the
rest of the scene preserved (+ both parts separately), per kind and overall.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from cheers.eval import judge as J
from cheers.eval.shapes import eval_prompts
from cheers.eval.sharpness import sharpness_ratio
from cheers.shapes.samples import EDIT_KINDS, GENERATION_CATEGORIES, TEXT_KIND, UNDERSTANDING_TYPES
from cheers.shapes.world import render_scene

__all__ = ["evaluate_shapes", "evaluate_digits", "generation_sharpness", "make_grid", "model_resolution",
           "batched_generate", "batched_answer", "batched_edit", "format_shapes_table", "format_digits_table"]


# ---- calling the model in batches ---------------------------------------------------------------------------------


def model_resolution(model: Any, default: int = 64) -> int:
    """The model's image resolution (`model.config.resolution` or `model.resolution`), else `default`."""
    for obj in (getattr(model, "config", None), model):
        r = getattr(obj, "resolution", None)
        if isinstance(r, int) and r > 0:
            return r
    return default


def _check(out: Sequence[Any], n: int, what: str) -> list:
    out = list(out)
    if len(out) != n:
        raise RuntimeError(f"model.{what} returned {len(out)} outputs for {n} inputs")
    return out


def batched_generate(model: Any, prompts: Sequence[str], seed: int, batch_size: int, **kw: Any) -> list[Image.Image]:
    """`model.generate_image` over `prompts` in batches; prompt i is generated with seed + i."""
    out: list[Image.Image] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo:lo + batch_size])
        out += [im.convert("RGB") for im in _check(model.generate_image(chunk, seed=seed + lo, **kw), len(chunk),
                                                    "generate_image")]
    return out


def batched_answer(model: Any, images: Sequence[Image.Image | None], questions: Sequence[str], batch_size: int,
                   **kw: Any) -> list[str]:
    """`model.answer` over (image, question) pairs in batches; a question without image (None) is passed with an
    empty image list, as `Cheers.answer` takes one image or a list of images per question."""
    out: list[str] = []
    for lo in range(0, len(questions), batch_size):
        qs = list(questions[lo:lo + batch_size])
        ims = [[] if im is None else im for im in images[lo:lo + batch_size]]
        out += [str(a) for a in _check(model.answer(ims, qs, **kw), len(qs), "answer")]
    return out


def batched_edit(model: Any, images: Sequence[Image.Image], instructions: Sequence[str], seed: int, batch_size: int,
                 **kw: Any) -> list[Image.Image]:
    out: list[Image.Image] = []
    for lo in range(0, len(instructions), batch_size):
        ins = list(instructions[lo:lo + batch_size])
        ims = model.edit(list(images[lo:lo + batch_size]), ins, seed=seed + lo, **kw)
        out += [im.convert("RGB") for im in _check(ims, len(ins), "edit")]
    return out


# ---- grids --------------------------------------------------------------------------------------------------------


def _wrap(text: str, width: int, lines: int) -> list[str]:
    words, out, cur = str(text).replace("\n", " ").split(), [], ""
    for w in words:
        if len(cur) + len(w) + (1 if cur else 0) <= width:
            cur = f"{cur} {w}" if cur else w
        else:
            if cur:
                out.append(cur)
            cur = w[:width]
    if cur:
        out.append(cur)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: max(0, width - 2)] + ".."
    return out


def make_grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, cols: int = 8,
              cell: int = 128, caption_lines: int = 3) -> Image.Image:
    """Tiles of `images`, `cols` per row, each resized to `cell` px wide (aspect of the first image kept), with
    optional wrapped captions under each."""
    n = max(1, len(images))
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    tile_h = max(1, round(cell * images[0].height / images[0].width)) if images else cell
    font = ImageFont.load_default()
    line_h = 11
    cap_h = (caption_lines * line_h + 4) if captions else 0
    grid = Image.new("RGB", (cols * cell, rows * (tile_h + cap_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (tile_h + cap_h)
        filt = Image.Resampling.NEAREST if im.width < cell else Image.Resampling.LANCZOS
        grid.paste(im.convert("RGB").resize((cell, tile_h), filt), (x, y))
        if captions:
            for k, line in enumerate(_wrap(captions[i], max(8, cell // 6), caption_lines)):
                draw.text((x + 2, y + tile_h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def _hstack(images: Sequence[Image.Image]) -> Image.Image:
    h = max(im.height for im in images)
    out = Image.new("RGB", (sum(im.width for im in images), h), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return out


# ---- ShapesWorld --------------------------------------------------------------------------------------------------


def _yesno_stats(truth: Sequence[str], pred: Sequence[str | None]) -> dict[str, Any]:
    tp = sum(t == "yes" and p == "yes" for t, p in zip(truth, pred))
    fp = sum(t == "no" and p == "yes" for t, p in zip(truth, pred))
    fn = sum(t == "yes" and p != "yes" for t, p in zip(truth, pred))
    n = len(truth)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"n": n, "n_yes": sum(t == "yes" for t in truth), "n_no": sum(t == "no" for t in truth),
            "accuracy": sum(t == p for t, p in zip(truth, pred)) / n if n else 0.0,
            "yes_ratio": sum(p == "yes" for p in pred) / n if n else 0.0,
            "unparsed": sum(p is None for p in pred), "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_report(out: Path, report: dict[str, Any], details: list[dict[str, Any]]) -> None:
    """report.json (with the list of files written) and one details.jsonl line per item."""
    report["files"] = sorted(p.name for p in out.glob("*_grid.png")) + ["details.jsonl", "report.json"]
    _write_json(out / "report.json", report)
    with open(out / "details.jsonl", "w", encoding="utf-8") as f:
        for d in details:
            f.write(json.dumps(d, sort_keys=True) + "\n")


def evaluate_shapes(model: Any, n: int = 10, seed: int = 0, out_dir: str | os.PathLike = "eval-shapes",
                    batch_size: int = 8, resolution: int | None = None, gen_kw: dict | None = None,
                    answer_kw: dict | None = None, edit_kw: dict | None = None,
                    tasks: Sequence[str] = ("generation", "understanding", "editing"), verbose: bool = True,
                    save_images: bool = True) -> dict[str, Any]:
    """Evaluate `model` on ShapesWorld: `n` prompts per generation category, `n` questions per understanding type
    (+ `n` text-only questions), `n` edits per edit kind, all from the eval split of `seed`. Returns the report
    (also written to out_dir/report.json)."""
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = resolution or model_resolution(model)
    fams = [f for f in ("generation", "understanding", "editing") if f in tasks]
    items = eval_prompts(seed, n, res, families=tuple(fams) + (("text",) if "understanding" in tasks else ()))
    report: dict[str, Any] = {"benchmark": "shapesworld", "seed": seed, "n": n, "resolution": res}
    details: list[dict[str, Any]] = []
    timing: dict[str, float] = {}

    if "generation" in tasks:
        t0 = time.time()
        gens = items["generation"]
        images = batched_generate(model, [g.text for g in gens], seed, batch_size, **(gen_kw or {}))
        by_cat: dict[str, list[float]] = defaultdict(list)
        held: dict[bool, list[float]] = defaultdict(list)
        partial: dict[str, list[float]] = defaultdict(list)
        captions = []
        for g, im in zip(gens, images):
            r = J.score_generation(im, g.geneval)
            by_cat[g.category].append(float(r["correct"]))
            for key, v in r["partial"].items():
                if v is not None:
                    partial[key].append(v)
            partial["recognised"].append(sum(d["confidence"] >= J.MIN_CONFIDENCE for d in r["detections"]))
            if g.category in ("colors", "color_attr"):
                held[g.heldout].append(float(r["correct"]))
            if save_images:
                (out / "generation").mkdir(exist_ok=True)
                im.save(out / "generation" / f"{g.id}.png")
            details.append({"family": "generation", "id": g.id, "category": g.category, "prompt": g.prompt,
                            "heldout": g.heldout, "correct": r["correct"], "reason": r["reason"],
                            "detections": r["detections"]})
            captions.append(("OK " if r["correct"] else "X ") + g.prompt)
        cats = {c: {"score": _mean(by_cat[c]), "n": len(by_cat[c])} for c in GENERATION_CATEGORIES if by_cat[c]}
        report["generation"] = {
            "overall": _mean([v["score"] for v in cats.values()]), "categories": cats,
            "heldout_compositions": {"score": _mean(held[True]), "n": len(held[True])},
            "seen_compositions": {"score": _mean(held[False]), "n": len(held[False])},
            # partial credit (judge.partial_credit): progress the all-or-nothing GenEval rule does not show
            "partial": {"shape_present": _mean(partial["shape"]), "colour_present": _mean(partial["colour"]),
                        "object_count": _mean(partial["count"]),
                        "recognised_objects_per_image": _mean(partial["recognised"])},
        }
        order = [i for k in range(n) for i in range(k, len(gens), n)]  # one row per index, one column per category
        make_grid([images[i] for i in order], [captions[i] for i in order], cols=len(GENERATION_CATEGORIES)) \
            .save(out / "generation_grid.png")
        timing["generation"] = time.time() - t0

    if "understanding" in tasks:
        t0 = time.time()
        qas = items["understanding"]
        preds = batched_answer(model, [q.image for q in qas], [q.question for q in qas], batch_size,
                               **(answer_kw or {}))
        by_type: dict[str, list[float]] = defaultdict(list)
        by_sub: dict[str, list[float]] = defaultdict(list)
        yn_truth, yn_pred = [], []
        for q, p in zip(qas, preds):
            ok = J.score_answer(p, q.answer, q.answer_type, q.options, q.spec)
            by_type[q.qtype].append(float(ok))
            if q.subtype:
                by_sub[f"{q.qtype}/{q.subtype}"].append(float(ok))
            if q.qtype == "yesno":
                yn_truth.append(J.normalize_yesno(q.answer))
                yn_pred.append(J.normalize_yesno(p))
            details.append({"family": "understanding", "id": q.id, "qtype": q.qtype, "subtype": q.subtype,
                            "question": q.question, "answer": q.answer, "prediction": p, "correct": ok})
        types = {t: {"accuracy": _mean(by_type[t]), "n": len(by_type[t])}
                 for t in UNDERSTANDING_TYPES + (TEXT_KIND,) if by_type[t]}
        report["understanding"] = {
            "overall": _mean([v["accuracy"] for v in types.values()]), "types": types,
            "subtypes": {k: {"accuracy": _mean(v), "n": len(v)} for k, v in sorted(by_sub.items())},
            "yesno": _yesno_stats(yn_truth, yn_pred),
        }
        per = max(1, min(4, n))
        shown = [i for t in UNDERSTANDING_TYPES
                 for i in [j for j, q in enumerate(qas) if q.qtype == t and q.image is not None][:per]]
        if shown:
            make_grid([qas[i].image for i in shown],
                      [f"{qas[i].question.splitlines()[0]} -> {preds[i]!r} (truth {qas[i].answer})" for i in shown],
                      cols=per, caption_lines=4, cell=160).save(out / "understanding_grid.png")
        timing["understanding"] = time.time() - t0

    if "editing" in tasks:
        t0 = time.time()
        eds = items["editing"]
        edited = batched_edit(model, [e.source_image for e in eds], [e.instruction for e in eds], seed, batch_size,
                              **(edit_kw or {}))
        by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
        tiles, caps = [], []
        for e, im in zip(eds, edited):
            r = J.score_edit(im, e)
            by_kind[e.kind].append(r)
            if save_images:
                (out / "editing").mkdir(exist_ok=True)
                im.save(out / "editing" / f"{e.id}.png")
            details.append({"family": "editing", "id": e.id, "kind": e.kind, "instruction": e.instruction,
                            "correct": r["correct"], "applied": r["applied"], "preserved": r["preserved"],
                            "detections": r["detections"]})
            tiles.append(_hstack([e.source_image, im.resize(e.source_image.size),
                                  render_scene(e.target, e.source_image.width)]))
            caps.append(("OK " if r["correct"] else "X ") + e.instruction)
        kinds = {k: {"score": _mean([float(r["correct"]) for r in v]),
                     "applied": _mean([float(r["applied"]) for r in v]),
                     "preserved": _mean([float(r["preserved"]) for r in v]), "n": len(v)}
                 for k, v in by_kind.items()}
        kinds = {k: kinds[k] for k in EDIT_KINDS if k in kinds}
        report["editing"] = {"score": _mean([v["score"] for v in kinds.values()]),
                             "applied": _mean([v["applied"] for v in kinds.values()]),
                             "preserved": _mean([v["preserved"] for v in kinds.values()]), "kinds": kinds}
        per = max(1, min(4, n))
        shown = [i for k in EDIT_KINDS for i in [j for j, e in enumerate(eds) if e.kind == k][:per]]
        if shown:  # source | model output | expected
            grid = make_grid([tiles[i] for i in shown], [caps[i] for i in shown], cols=per, cell=3 * 96,
                             caption_lines=2)
            grid.save(out / "editing_grid.png")
        timing["editing"] = time.time() - t0

    _write_report(out, report, details)
    if verbose:
        print(format_shapes_table(report))
        print(f"({time.time() - t_start:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items())
              + f"; written to {out})")
    return report


def generation_sharpness(out_dir: str | os.PathLike, n: int, seed: int, resolution: int) -> dict[str, float]:
    """`sharpness_ratio` of the pictures an `evaluate_shapes(..., n, seed)` run saved in out_dir/generation against
    real renders of scenes satisfying the same prompts."""
    gens = eval_prompts(seed=seed, n=n, resolution=resolution, families=("generation",))["generation"]
    made = [Image.open(Path(out_dir) / "generation" / f"{g.id}.png").convert("RGB") for g in gens]
    return sharpness_ratio(made, [render_scene(g.spec, resolution) for g in gens])


def format_shapes_table(report: dict[str, Any]) -> str:
    lines = [f"ShapesWorld  seed {report['seed']}  n {report['n']} per category  {report['resolution']} px"]
    g = report.get("generation")
    if g:
        lines.append(f"{'generation (GenEval rules)':<30}{'score':>8}{'n':>6}")
        for c, v in g["categories"].items():
            lines.append(f"  {c:<28}{v['score']:>8.3f}{v['n']:>6d}")
        lines.append(f"  {'overall':<28}{g['overall']:>8.3f}")
        h, s = g["heldout_compositions"], g["seen_compositions"]
        lines.append(f"  {'held-out compositions':<28}{h['score']:>8.3f}{h['n']:>6d}")
        lines.append(f"  {'seen compositions':<28}{s['score']:>8.3f}{s['n']:>6d}")
        if "partial" in g:
            p = g["partial"]
            lines.append(f"  partial: shape {p['shape_present']:.3f}  colour {p['colour_present']:.3f}  "
                         f"count {p['object_count']:.3f}  recognised/img {p['recognised_objects_per_image']:.2f}")
    u = report.get("understanding")
    if u:
        lines.append(f"{'understanding':<30}{'acc':>8}{'n':>6}")
        for t, v in u["types"].items():
            lines.append(f"  {t:<28}{v['accuracy']:>8.3f}{v['n']:>6d}")
        lines.append(f"  {'overall':<28}{u['overall']:>8.3f}")
        y = u["yesno"]
        lines.append(f"  yes/no: yes-ratio {y['yes_ratio']:.2f} (truth {y['n_yes']}/{y['n']}), precision "
                     f"{y['precision']:.2f}, recall {y['recall']:.2f}, F1 {y['f1']:.2f}, unparsed {y['unparsed']}")
    e = report.get("editing")
    if e:
        lines.append(f"{'editing':<30}{'score':>8}{'applied':>9}{'kept':>7}{'n':>6}")
        for k, v in e["kinds"].items():
            lines.append(f"  {k:<28}{v['score']:>8.3f}{v['applied']:>9.3f}{v['preserved']:>7.3f}{v['n']:>6d}")
        lines.append(f"  {'overall':<28}{e['score']:>8.3f}{e['applied']:>9.3f}{e['preserved']:>7.3f}")
    return "\n".join(lines)


# ---- Digits -------------------------------------------------------------------------------------------------------


def evaluate_digits(model: Any, n: int = 50, seed: int = 0, out_dir: str | os.PathLike = "eval-digits",
                    batch_size: int = 8, resolution: int | None = None, gen_kw: dict | None = None,
                    answer_kw: dict | None = None, tasks: Sequence[str] = ("generation", "understanding"),
                    verbose: bool = True, save_images: bool = True) -> dict[str, Any]:
    """Evaluate `model` on real digits: `n` generation prompts ("Draw the digit 7.", labels cycling 0-9) judged by
    the digit classifier, and `n` "which digit is this?" questions on held-out real digits."""
    from cheers.eval import digits as D

    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = resolution or model_resolution(model)
    items = D.digit_eval_items(seed, n, res)
    judge = D.digit_judge(res)
    report: dict[str, Any] = {"benchmark": "digits", "seed": seed, "n": n, "resolution": res,
                              "judge_heldout_accuracy": judge.heldout_accuracy}
    details: list[dict[str, Any]] = []
    if "generation" in tasks:
        gens = items["generation"]
        images = batched_generate(model, [g.text for g in gens], seed, batch_size, **(gen_kw or {}))
        pred = judge.predict(images)
        per: dict[int, list[float]] = defaultdict(list)
        for g, im, p in zip(gens, images, pred):
            per[g.label].append(float(p == g.label))
            if save_images:
                (out / "generation").mkdir(exist_ok=True)
                im.save(out / "generation" / f"{g.id}.png")
            details.append({"family": "generation", "id": g.id, "prompt": g.prompt, "label": g.label,
                            "judged": p, "correct": p == g.label})
        report["generation"] = {"accuracy": _mean([float(p == g.label) for g, p in zip(gens, pred)]),
                                "by_digit": {str(d): _mean(per[d]) for d in range(10) if per[d]}}
        caps = [f"{'OK' if p == g.label else 'X'} {g.label}: judged {p}" for g, p in zip(gens, pred)]
        make_grid(images[:40], caps[:40], cols=10, caption_lines=1).save(out / "generation_grid.png")
    if "understanding" in tasks:
        qas = items["understanding"]
        answers = batched_answer(model, [q.image for q in qas], [q.question for q in qas], batch_size,
                                 **(answer_kw or {}))
        oks = []
        for q, a in zip(qas, answers):
            ok = J.normalize_number(a) == q.label
            oks.append(float(ok))
            details.append({"family": "understanding", "id": q.id, "question": q.question, "label": q.label,
                            "prediction": a, "correct": ok})
        report["understanding"] = {"accuracy": _mean(oks), "n": len(oks)}
        make_grid([q.image for q in qas[:40]], [f"{q.label}: {a!r}" for q, a in zip(qas, answers)][:40], cols=10,
                  caption_lines=1).save(out / "understanding_grid.png")
    _write_report(out, report, details)
    if verbose:
        print(format_digits_table(report))
        print(f"({time.time() - t_start:.1f} s; written to {out})")
    return report


def format_digits_table(report: dict[str, Any]) -> str:
    lines = [f"Digits  seed {report['seed']}  n {report['n']}  {report['resolution']} px  "
             f"(judge held-out accuracy {report['judge_heldout_accuracy']:.3f})"]
    g = report.get("generation")
    if g:
        lines.append(f"  {'generation accuracy':<28}{g['accuracy']:>8.3f}")
        lines.append("    by digit: " + " ".join(f"{d}:{v:.2f}" for d, v in g["by_digit"].items()))
    u = report.get("understanding")
    if u:
        lines.append(f"  {'understanding accuracy':<28}{u['accuracy']:>8.3f}")
    return "\n".join(lines)
