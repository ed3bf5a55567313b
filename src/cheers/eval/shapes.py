"""The ShapesWorld benchmark's evaluation items: seeded prompts, questions and edits of the eval split.

`eval_prompts(seed, n, resolution)` turns eval-split samples (`cheers.shapes.samples`) into `GenItem`s,
`QAItem`s and `EditItem`s with their pictures rendered. The world itself lives in `cheers.shapes`; its public
names are re-exported here because recipes and tests reach them through this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from cheers.shapes.datasets import GEN_SUFFIX, make_dataset, write_record
from cheers.shapes.samples import (
    ALL_KINDS,
    EDIT_KINDS,
    GENERATION_CATEGORIES,
    SPLITS,
    TEXT_KIND,
    UNDERSTANDING_TYPES,
    describe_scene,
    geneval_metadata,
    make_sample,
    sample_rng,
)
from cheers.shapes.world import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    PLURALS,
    SHAPES,
    SIZES,
    TEXTURES,
    ObjectSpec,
    SceneSpec,
    object_box,
    relative_position,
    render_scene,
)

__all__ = [
    "SHAPES", "PLURALS", "COLORS", "BACKGROUNDS", "TEXTURES", "SIZES", "HELDOUT_PAIRS", "GEN_SUFFIX",
    "GENERATION_CATEGORIES", "UNDERSTANDING_TYPES", "EDIT_KINDS", "TEXT_KIND", "ALL_KINDS", "SPLITS",
    "ObjectSpec", "SceneSpec", "GenItem", "QAItem", "EditItem",
    "render_scene", "object_box", "relative_position", "sample_rng", "make_sample", "write_record", "make_dataset",
    "eval_prompts", "describe_scene", "geneval_metadata",
]


@dataclass
class GenItem:
    """A text-to-image evaluation prompt: `text` is what the model receives (prompt + GEN_SUFFIX), `spec` one
    scene satisfying it (what an oracle would draw), `geneval` its GenEval-format metadata."""
    id: str
    category: str
    prompt: str
    text: str
    spec: SceneSpec
    geneval: dict[str, Any]
    heldout: bool = False


@dataclass
class QAItem:
    """An understanding question (qtype in UNDERSTANDING_TYPES) or a text-only one (qtype "text", image None)."""
    id: str
    qtype: str
    question: str
    answer: str
    answer_type: str  # letter | yesno | number | color | shape | position | caption
    spec: SceneSpec | None = None
    image: Image.Image | None = None
    options: dict[str, str] | None = None
    subtype: str = ""


@dataclass
class EditItem:
    """An edit: `instruction` turns the `source` scene (rendered as `source_image`) into the `target` scene."""
    id: str
    kind: str
    instruction: str
    source: SceneSpec
    target: SceneSpec
    edit: dict[str, Any] = field(default_factory=dict)
    source_image: Image.Image | None = None


def eval_prompts(seed: int = 0, n: int = 10, resolution: int = 64,
                 families: Sequence[str] = ("generation", "understanding", "editing", "text")) -> dict[str, list]:
    """Evaluation items of the eval split: `n` per generation category ("generation": list[GenItem]), per
    understanding type plus n text-only questions ("understanding": list[QAItem]) and per edit kind ("editing":
    list[EditItem]); images (questions, edit sources) rendered at `resolution`. Colors and color_attr items with
    an even index use a held-out (shape, colour) pair; yes/no answers alternate; mcq letters cycle A-D."""
    out: dict[str, list] = {"generation": [], "understanding": [], "editing": []}
    if "generation" in families:
        for kind in GENERATION_CATEGORIES:
            for i in range(n):
                s = make_sample(kind, seed, "eval", i)
                out["generation"].append(GenItem(f"{kind}_{i:04d}", kind, s["prompt"], s["prompt"] + GEN_SUFFIX,
                                                 s["scene"], s["geneval"], bool(s["heldout"])))
    und_kinds = (UNDERSTANDING_TYPES if "understanding" in families else ()) + \
        ((TEXT_KIND,) if "text" in families else ())
    for kind in und_kinds:
        for i in range(n):
            s = make_sample(kind, seed, "eval", i)
            spec = s.get("scene")
            out["understanding"].append(QAItem(
                f"{kind}_{i:04d}", s["qtype"], s["question"], s["answer"], s["answer_type"], spec,
                render_scene(spec, resolution) if spec is not None else None, s.get("options"), s.get("subtype", "")))
    if "editing" in families:
        for kind in EDIT_KINDS:
            for i in range(n):
                s = make_sample(kind, seed, "eval", i)
                out["editing"].append(EditItem(f"{kind}_{i:04d}", kind, s["instruction"], s["source"], s["target"],
                                               s["edit"], render_scene(s["source"], resolution)))
    return out
