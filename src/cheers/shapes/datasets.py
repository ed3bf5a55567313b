"""ShapesWorld datasets in the official jsonl format (spec §D.3), written from the seeded samples.

`make_dataset` writes `n_per_kind` samples of each kind (`cheers.shapes.samples`), their pictures as PNGs under
`images/` (paths relative to the data root) and one record per sample; every record can keep its structured spec
under "meta" (inline, or in a sidecar file for strict loaders). Identical arguments write identical bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from cheers import constants as C
from cheers.shapes.samples import ALL_KINDS, make_sample
from cheers.shapes.world import render_scene

__all__ = ["GEN_SUFFIX", "IMAGE_PREFIX", "GEN_ANSWER", "write_record", "make_dataset"]

# the conversation of a record: a prompt to draw ends with the generation instruction, a picture to read comes first
GEN_SUFFIX = "\n" + C.GENERATION_INSTRUCTION
IMAGE_PREFIX = "<im_start><image><im_end>\n"
GEN_ANSWER = "<im_start><image_gen><im_end>"


def _meta(s: Mapping[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {"family": s["family"], "kind": s["kind"]}
    for key in ("category", "prompt", "heldout", "geneval", "qtype", "subtype", "answer", "answer_type",
                "options", "instruction", "edit"):
        if key in s:
            m[key] = s[key]
    for key in ("scene", "source", "target"):
        if key in s:
            m[key] = s[key].to_dict()
    return m


def _record(s: Mapping[str, Any], rid: str, image_paths: Sequence[str]) -> dict[str, Any]:
    fam = s["family"]
    if fam == "generation":
        conv = [{"from": "human", "value": s["prompt"] + GEN_SUFFIX}, {"from": "gpt", "value": GEN_ANSWER}]
    elif fam == "understanding":
        conv = [{"from": "human", "value": IMAGE_PREFIX + s["question"]}, {"from": "gpt", "value": s["answer"]}]
    elif fam == "editing":
        conv = [{"from": "human", "value": IMAGE_PREFIX + s["instruction"]}, {"from": "gpt", "value": GEN_ANSWER}]
    else:
        conv = [{"from": "human", "value": s["question"]}, {"from": "gpt", "value": s["answer"]}]
    rec: dict[str, Any] = {"id": rid}
    if image_paths:
        rec["image"] = ", ".join(image_paths)
    rec["conversations"] = conv
    return rec


def _counts(n_per_kind: int | Mapping[str, int], kinds: Sequence[str] | None) -> dict[str, int]:
    kinds = list(ALL_KINDS if kinds is None else kinds)
    for k in kinds:
        if k not in ALL_KINDS:
            raise ValueError(f"unknown kind {k!r}; choose from {', '.join(ALL_KINDS)}")
    if isinstance(n_per_kind, Mapping):
        bad = set(n_per_kind) - set(ALL_KINDS)
        if bad:
            raise ValueError(f"unknown kind(s) {sorted(bad)}")
        return {k: int(n_per_kind.get(k, 0)) for k in kinds}
    return {k: int(n_per_kind) for k in kinds}


def write_record(out: Path, sample: Mapping[str, Any], rid: str, resolution: int = 64) -> dict[str, Any]:
    """Render a sample's picture(s) to `out/images/<rid>[_src|_tgt].png` and return its official-format record
    (image paths relative to `out`; `out/images` must exist)."""
    scenes = [("", sample["scene"])] if "scene" in sample else []
    if "source" in sample:
        scenes = [("_src", sample["source"]), ("_tgt", sample["target"])]
    images: list[str] = []
    for suffix, spec in scenes:
        rel = f"images/{rid}{suffix}.png"
        render_scene(spec, resolution).save(out / rel, format="PNG")
        images.append(rel)
    return _record(sample, rid, images)


def make_dataset(out_dir: str | os.PathLike, n_per_kind: int | Mapping[str, int] = 100, seed: int = 0,
                 split: str = "train", resolution: int = 64, kinds: Sequence[str] | None = None,
                 meta: str = "inline", name: str | None = None) -> Path:
    """Write `out_dir/<name or split>.jsonl` and its PNGs under `out_dir/images/` (paths relative to out_dir).

    `n_per_kind` is one count for every kind of `kinds` (default ALL_KINDS) or a {kind: count} mapping. `meta`:
    "inline" keeps each sample's structured spec under the record's "meta" key; "sidecar" writes the official
    keys only (what strict loaders such as `cheers.train.data` accept) and the metas, one per line in the same
    order with the record id, to `<name>.meta.jsonl`; "none" drops them. Returns the jsonl path.
    """
    if meta not in ("inline", "sidecar", "none"):
        raise ValueError(f"meta must be inline, sidecar or none, got {meta!r}")
    counts = _counts(n_per_kind, kinds)
    out = Path(out_dir)
    name = name or split
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    side = out / f"{name}.meta.jsonl"
    with open(path, "w", encoding="utf-8") as f, (open(side, "w", encoding="utf-8") if meta == "sidecar"
                                                  else open(os.devnull, "w")) as fm:
        for kind, n in counts.items():
            for i in range(n):
                s = make_sample(kind, seed, split, i)
                rid = f"{name}_{kind}_{i:06d}"
                rec = write_record(out, s, rid, resolution)
                m = _meta(s)
                m["resolution"] = resolution
                if meta == "inline":
                    rec["meta"] = m
                elif meta == "sidecar":
                    fm.write(json.dumps({"id": rid, "meta": m}, sort_keys=True) + "\n")
                f.write(json.dumps(rec) + "\n")
    return path
