"""The seeded samples of ShapesWorld: prompts, questions, edits and text, each a pure function of its seed.

`make_sample(kind, seed, split, index)` draws sample `index` of one of four families:

* generation (text-to-image) in GenEval's six categories: single_object, two_object, counting (1-4), colors,
  position (left of / right of / above / below) and color_attr;
* understanding: caption, mcq (MMBench-like, options A-D, the answer is the letter), yesno (POPE-like, balanced),
  count, color and relation (left/right, above/below) questions;
* editing: recolor, move, add and remove an object (source scene, instruction, target scene);
* text: text-only questions about shapes and colours.

A sample is a dict with its scene spec(s) (`cheers.shapes.world`), text, answer and structured metadata (category,
GenEval metadata, options, edit...) that the judge (`cheers.eval.judge`) scores against. Randomness is a pure
function of (split, seed, kind, index): the train and eval splits draw from disjoint seed sequences, and the
(shape, colour) pairs of `HELDOUT_PAIRS` never appear in any train sample, so the eval split measures compositions
never seen in training. Evaluation samples are balanced (answers, relations and option letters cycle by index).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cheers.shapes.world import (
    COLORS,
    DIRECTIONS,
    HELDOUT_PAIRS,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    SceneSampler,
    SceneSpec,
    in_bounds,
    object_box,
    relative_position,
    round4,
    separated,
)

__all__ = [
    "GENERATION_CATEGORIES", "UNDERSTANDING_TYPES", "EDIT_KINDS", "TEXT_KIND", "ALL_KINDS", "SPLITS", "MCQ_SUFFIX",
    "sample_rng", "make_sample", "describe_scene", "list_phrase", "geneval_metadata",
]

GENERATION_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
UNDERSTANDING_TYPES = ("caption", "mcq", "yesno", "count", "color", "relation")
EDIT_KINDS = ("recolor", "move", "add", "remove")
TEXT_KIND = "text"
ALL_KINDS = GENERATION_CATEGORIES + UNDERSTANDING_TYPES + EDIT_KINDS + (TEXT_KIND,)
SPLITS = {"train": 0x5EED_7A1, "eval": 0xE7A1_0FF}  # first word of every seed sequence: the splits never share one


def sample_rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    """The generator of sample `index` of `kind`: a pure function of (split, seed, kind, index)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return np.random.default_rng([SPLITS[split], int(seed), ALL_KINDS.index(kind), int(index)])


# ---- phrasing -----------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(*words: str) -> str:
    phrase = " ".join(w for w in words if w)
    return f"{_article(phrase)} {phrase}"


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def _count_phrase(n: int, color: str, shape: str) -> str:
    if n == 1:
        return _a(color, shape)
    return " ".join(w for w in (NUMBER_WORDS[n], color, PLURALS[shape]) if w)


def list_phrase(parts: Sequence[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_scene(spec: SceneSpec) -> str:
    """'a red circle, two blue squares and a yellow star': groups of equal (colour, shape), left to right."""
    groups: dict[tuple[str, str], list[ObjectSpec]] = {}
    for o in sorted(spec.objects, key=lambda o: (o.cx, o.cy)):
        groups.setdefault((o.color, o.shape), []).append(o)
    parts = [_count_phrase(len(v), c, s) for (c, s), v in groups.items()]
    if not parts:
        return "nothing"
    return list_phrase(parts)


def _unique_desc(spec: SceneSpec, i: int) -> str | None:
    """Shortest description ('the star' / 'the red star') that names only object i, or None."""
    o = spec.objects[i]
    if sum(p.shape == o.shape for p in spec.objects) == 1:
        return o.shape
    if sum((p.shape, p.color) == (o.shape, o.color) for p in spec.objects) == 1:
        return f"{o.color} {o.shape}"
    return None


# ---- generation samples (GenEval categories) ----------------------------------------------------------------------

GEN_TEMPLATES = {
    "single_object": ["a photo of {a}", "{a}", "an image of {a}", "a picture of {a}", "draw {a}"],
    "two_object": ["a photo of {a} and {b}", "{a} and {b}", "an image with {a} and {b}",
                   "a picture showing {a} and {b}", "{a} together with {b}"],
    "counting": ["a photo of {n}", "{n}", "an image of {n}", "a picture with exactly {n}"],
    "colors": ["a photo of {a}", "{a}", "an image of {a}", "a picture of {a}"],
    "color_attr": ["a photo of {a} and {b}", "{a} and {b}", "an image of {a} and {b}",
                   "a picture with {a} and {b}"],
}
POSITION_PHRASES = {
    "left of": ["left of", "to the left of", "on the left of"],
    "right of": ["right of", "to the right of", "on the right of"],
    "above": ["above", "over", "on top of"],
    "below": ["below", "under", "beneath"],
}
POSITION_TEMPLATES = ["a photo of {a} {rel} {b}", "{a} {rel} {b}", "an image of {a} {rel} {b}"]


def geneval_metadata(category: str, objects: Sequence[Mapping[str, Any]], prompt: str,
                     relation: str | None = None) -> dict[str, Any]:
    """GenEval's evaluation metadata for a prompt; `objects` = [{"shape", "color"?, "count"?}]."""
    inc: list[dict[str, Any]] = []
    exc: list[dict[str, Any]] = []
    if category == "counting":
        o = objects[0]
        inc.append({"class": o["shape"], "count": int(o["count"])})
        exc.append({"class": o["shape"], "count": int(o["count"]) + 1})
    elif category == "position":
        a, b = objects
        inc = [{"class": b["shape"], "count": 1}, {"class": a["shape"], "count": 1, "position": [relation, 0]}]
    else:
        for o in objects:
            d: dict[str, Any] = {"class": o["shape"], "count": 1}
            if category in ("colors", "color_attr"):
                d["color"] = o["color"]
            inc.append(d)
    meta: dict[str, Any] = {"tag": category, "include": inc, "prompt": prompt}
    if exc:
        meta["exclude"] = exc
    return meta


def _gen_sample(kind: str, sc: SceneSampler, index: int, force_heldout: bool, balanced: bool) -> dict[str, Any]:
    rng = sc.rng
    for _ in range(100):
        heldout = False
        if kind == "single_object":
            shape = sc.choice(SHAPES)
            objs = sc.place([(shape, sc.color_for(shape))])
            text = sc.choice(GEN_TEMPLATES[kind]).format(a=_a(shape))
            gmeta = [{"shape": shape}]
        elif kind == "two_object":
            s1, s2 = sc.shapes(2)
            objs = sc.place([(s1, sc.color_for(s1)), (s2, sc.color_for(s2))])
            text = sc.choice(GEN_TEMPLATES[kind]).format(a=_a(s1), b=_a(s2))
            gmeta = [{"shape": s1}, {"shape": s2}]
        elif kind == "counting":
            shape = sc.choice(SHAPES)
            n = int(rng.integers(1, 5))
            same = rng.random() < 0.5
            c0 = sc.color_for(shape)
            objs = sc.place([(shape, c0 if same else sc.color_for(shape)) for _ in range(n)])
            text = sc.choice(GEN_TEMPLATES[kind]).format(n=_count_phrase(n, "", shape))
            gmeta = [{"shape": shape, "count": n}]
        elif kind == "colors":
            if force_heldout:
                shape, color = sorted(HELDOUT_PAIRS)[int(rng.integers(len(HELDOUT_PAIRS)))]
            else:
                shape = sc.choice(SHAPES)
                color = sc.color_for(shape)
            heldout = (shape, color) in HELDOUT_PAIRS
            objs = sc.place([(shape, color)])
            text = sc.choice(GEN_TEMPLATES[kind]).format(a=_a(color, shape))
            gmeta = [{"shape": shape, "color": color}]
        elif kind == "color_attr":
            s1, s2 = sc.shapes(2)
            if force_heldout:
                s1 = sorted(HELDOUT_PAIRS)[int(rng.integers(len(HELDOUT_PAIRS)))][0]
                s2 = sc.choice([s for s in SHAPES if s != s1])
                c1 = dict(HELDOUT_PAIRS)[s1]
            else:
                c1 = sc.color_for(s1)
            c2 = sc.color_for(s2, exclude=[c1])
            if rng.random() < 0.5 and force_heldout:
                (s1, c1), (s2, c2) = (s2, c2), (s1, c1)
            heldout = (s1, c1) in HELDOUT_PAIRS or (s2, c2) in HELDOUT_PAIRS
            objs = sc.place([(s1, c1), (s2, c2)])
            text = sc.choice(GEN_TEMPLATES[kind]).format(a=_a(c1, s1), b=_a(c2, s2))
            gmeta = [{"shape": s1, "color": c1}, {"shape": s2, "color": c2}]
        elif kind == "position":
            s1, s2 = sc.shapes(2)
            rel = RELATIONS[index % 4] if balanced else RELATIONS[int(rng.integers(4))]
            objs = sc.place([(s1, sc.color_for(s1)), (s2, sc.color_for(s2))])
            if objs is None or not _clear_relation(objs[0], objs[1], rel):
                continue
            text = sc.choice(POSITION_TEMPLATES).format(a=_a(s1), b=_a(s2), rel=sc.choice(POSITION_PHRASES[rel]))
            gmeta = [{"shape": s1}, {"shape": s2}]
        else:
            raise ValueError(kind)
        if objs is None:
            continue
        prompt = _sentence(text)
        return {"category": kind, "prompt": prompt, "scene": sc.scene(objs), "heldout": heldout,
                "geneval": geneval_metadata(kind, gmeta, prompt, rel if kind == "position" else None)}
    raise RuntimeError(f"could not sample a {kind} scene")


def _clear_relation(a: ObjectSpec, b: ObjectSpec, rel: str) -> bool:
    """A `rel` B holds, and clearly: GenEval's test passes even with twice its threshold."""
    ba, bb = object_box(a), object_box(b)
    return relative_position(ba, bb, 0.2) == {rel} and relative_position(ba, bb) == {rel}


# ---- understanding samples ----------------------------------------------------------------------------------------

CAPTION_QUESTIONS = ["What is this?", "Describe the image.", "What is in the picture?",
                     "Describe this image briefly.", "What do you see?"]
CAPTION_TEMPLATES = ["{d}", "The image shows {d}", "There is {d} on a dark background", "In this picture: {d}"]
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
YESNO_TEMPLATES = ["Is there {a} in the image?", "Does the image contain {a}?", "Can you see {a} here?",
                   "Is there {a}?"]
COUNT_TEMPLATES = ["How many {p} are there?", "How many {p} are in the image?", "Count the {p}.",
                   "How many {p} can you see?"]
COLOR_TEMPLATES = ["What color is the {s}?", "What colour is the {s}?", "Which color does the {s} have?",
                   "What is the color of the {s}?"]
POSITION_LR = ["Is the {a} to the left or to the right of the {b}?", "Is the {a} left or right of the {b}?"]
POSITION_AB = ["Is the {a} above or below the {b}?", "Is the {a} over or under the {b}?"]


def _random_scene(sc: SceneSampler, k: int, unique_shapes: bool = False) -> list[ObjectSpec] | None:
    shapes = sc.shapes(k) if unique_shapes else [sc.choice(SHAPES) for _ in range(k)]
    pairs: list[tuple[str, str]] = []
    for s in shapes:  # distinct (shape, colour) identities, so every object can be named
        used = [c for t, c in pairs if t == s]
        pairs.append((s, sc.color_for(s, exclude=used)))
    return sc.place(pairs)


def _options(sc: SceneSampler, correct: str, pool: Sequence[str], index: int, balanced: bool) -> tuple[dict[str, str], str]:
    others = [p for p in pool if p != correct]
    picks = [others[i] for i in sc.rng.permutation(len(others))[:3]]
    pos = index % 4 if balanced else int(sc.rng.integers(4))
    picks.insert(pos, correct)
    return dict(zip("ABCD", picks)), "ABCD"[pos]


def _und_sample(kind: str, sc: SceneSampler, index: int, balanced: bool) -> dict[str, Any]:
    rng = sc.rng
    for _ in range(200):
        if kind == "caption":
            objs = _random_scene(sc, int(rng.integers(1, 4)))
            if objs is None:
                continue
            spec = sc.scene(objs)
            return {"qtype": kind, "question": sc.choice(CAPTION_QUESTIONS), "answer_type": "caption",
                    "answer": _sentence(sc.choice(CAPTION_TEMPLATES).format(d=describe_scene(spec))), "scene": spec}
        if kind == "mcq":
            sub = ["shape", "color", "count", "position"][index % 4 if balanced else int(rng.integers(4))]
            if sub == "count":
                shape = sc.choice(SHAPES)
                n = int(rng.integers(1, 5))
                c = sc.color_for(shape)
                objs = sc.place([(shape, c)] * n, sizes=[sc.size("medium") for _ in range(n)])
                if objs is None:
                    continue
                q = f"How many {PLURALS[shape]} are in the image?"
                correct, pool = str(n), ["1", "2", "3", "4"]
            elif sub == "position":
                s1, s2 = sc.shapes(2)
                rel = RELATIONS[int(rng.integers(4))]
                objs = sc.place([(s1, sc.color_for(s1)), (s2, sc.color_for(s2))])
                if objs is None or not _clear_relation(objs[0], objs[1], rel):
                    continue
                q = f"Where is the {s1} relative to the {s2}?"
                word = {"left of": "left", "right of": "right", "above": "above", "below": "below"}[rel]
                correct, pool = word, ["left", "right", "above", "below"]
            else:
                objs = _random_scene(sc, int(rng.integers(1, 3)), unique_shapes=True)
                if objs is None or len({o.color for o in objs}) != len(objs):
                    continue
                o = objs[int(rng.integers(len(objs)))]
                if sub == "shape":
                    q = f"What shape is the {o.color} object?" if len(objs) > 1 else "What shape is shown?"
                    correct, pool = o.shape, list(SHAPES)
                else:
                    q = f"What color is the {o.shape}?"
                    correct, pool = o.color, list(COLORS)
            options, letter = _options(sc, correct, pool, index + index // 4, balanced)  # latin square
            text = q + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items()) + "\n" + MCQ_SUFFIX
            return {"qtype": kind, "subtype": sub, "question": text, "answer": letter, "answer_type": "letter",
                    "options": options, "scene": sc.scene(objs)}
        if kind == "yesno":
            objs = _random_scene(sc, int(rng.integers(1, 4)))
            if objs is None:
                continue
            yes = (index % 2 == 0) if balanced else bool(rng.random() < 0.5)
            present = {(o.shape, o.color) for o in objs}
            shape_only = rng.random() < 0.25
            if yes:
                o = objs[int(rng.integers(len(objs)))]
                a = _a(o.shape) if shape_only else _a(o.color, o.shape)
            elif shape_only:
                absent = [s for s in SHAPES if s not in {o.shape for o in objs}]
                a = _a(sc.choice(absent))
            else:
                if rng.random() < 0.5:  # adversarial: a present shape in another colour, or a present colour
                    o = objs[int(rng.integers(len(objs)))]
                    cands = [(o.shape, c) for c in COLORS] + [(s, o.color) for s in SHAPES]
                else:
                    cands = [(s, c) for s in SHAPES for c in COLORS]
                cands = [p for p in cands if p not in present and sc.allowed(*p)]
                s, c = cands[int(rng.integers(len(cands)))]
                a = _a(c, s)
            return {"qtype": kind, "question": sc.choice(YESNO_TEMPLATES).format(a=a),
                    "answer": "Yes" if yes else "No", "answer_type": "yesno", "scene": sc.scene(objs)}
        if kind == "count":
            shape = sc.choice(SHAPES)
            n = int(rng.integers(1, 5))
            pairs = [(shape, sc.color_for(shape)) for _ in range(n)]
            others = [s for s in SHAPES if s != shape]
            for _ in range(int(rng.integers(0, 3)) if n < 4 else 0):
                s = sc.choice(others)
                pairs.append((s, sc.color_for(s)))
            objs = sc.place(pairs, sizes=[sc.size("medium") for _ in pairs])
            if objs is None:
                continue
            return {"qtype": kind, "question": sc.choice(COUNT_TEMPLATES).format(p=PLURALS[shape]),
                    "answer": str(n), "answer_type": "number", "scene": sc.scene(objs)}
        if kind == "color":
            objs = _random_scene(sc, int(rng.integers(1, 4)), unique_shapes=True)
            if objs is None:
                continue
            o = objs[int(rng.integers(len(objs)))]
            return {"qtype": kind, "question": sc.choice(COLOR_TEMPLATES).format(s=o.shape), "answer": o.color,
                    "answer_type": "color", "scene": sc.scene(objs)}
        if kind == "relation":
            rel = RELATIONS[index % 4] if balanced else RELATIONS[int(rng.integers(4))]
            objs = _random_scene(sc, 2)
            if objs is None or not _clear_relation(objs[0], objs[1], rel):
                continue
            da, db = _unique_desc(SceneSpec(objs), 0), _unique_desc(SceneSpec(objs), 1)
            if da is None or db is None:
                continue
            tpl = POSITION_LR if rel in ("left of", "right of") else POSITION_AB
            word = {"left of": "left", "right of": "right", "above": "above", "below": "below"}[rel]
            return {"qtype": kind, "question": sc.choice(tpl).format(a=da, b=db), "answer": word,
                    "answer_type": "position", "scene": sc.scene(objs)}
        raise ValueError(kind)
    raise RuntimeError(f"could not sample a {kind} question")


# ---- editing samples ----------------------------------------------------------------------------------------------

RECOLOR_TEMPLATES = ["Change the color of the {d} to {c}.", "Make the {d} {c}.", "Paint the {d} {c}.",
                     "Turn the {d} {c}."]
MOVE_TEMPLATES = ["Move the {d} {dir}.", "Shift the {d} {dir}.", "Push the {d} {dir}."]
MOVE_WORDS = {"left": ["left", "to the left"], "right": ["right", "to the right"], "up": ["up", "upwards"],
              "down": ["down", "downwards"]}
ADD_TEMPLATES = ["Add {a}.", "Put {a} in the image.", "Insert {a}.", "Draw {a} as well."]
REMOVE_TEMPLATES = ["Remove the {d}.", "Delete the {d}.", "Take away the {d}.", "Erase the {d}."]


def _edit_sample(kind: str, sc: SceneSampler) -> dict[str, Any]:
    rng = sc.rng
    for _ in range(200):
        k = int(rng.integers(2, 4)) if kind == "remove" else int(rng.integers(1, 4))
        objs = _random_scene(sc, k)
        if objs is None:
            continue
        src = sc.scene(objs)
        i = int(rng.integers(len(objs)))
        d = _unique_desc(src, i)
        if d is None:
            continue
        o = objs[i]
        new = list(objs)
        if kind == "recolor":
            used = [p.color for p in objs if p.shape == o.shape]
            c = sc.color_for(o.shape, exclude=used)
            new[i] = o.recolored(c)
            text = sc.choice(RECOLOR_TEMPLATES).format(d=d, c=c)
            edit = {"index": i, "from": o.color, "to": c}
        elif kind == "move":
            direction = sc.choice(list(DIRECTIONS))
            dist = round4(rng.uniform(0.22, 0.36))
            ux, uy = DIRECTIONS[direction]
            m = o.moved(round4(o.cx + ux * dist), round4(o.cy + uy * dist))
            if not in_bounds(m) or not all(separated(m, p) for j, p in enumerate(objs) if j != i):
                continue
            new[i] = m
            text = sc.choice(MOVE_TEMPLATES).format(d=d, dir=sc.choice(MOVE_WORDS[direction]))
            edit = {"index": i, "direction": direction, "distance": dist}
        elif kind == "add":
            if len(objs) >= 3:
                continue
            s = sc.choice(SHAPES)
            used = [p.color for p in objs if p.shape == s]
            c = sc.color_for(s, exclude=used)
            extra = sc.place([(s, c)], fixed=objs)
            if extra is None:
                continue
            new.append(extra[0])
            i = len(new) - 1
            text = sc.choice(ADD_TEMPLATES).format(a=_a(c, s))
            edit = {"index": i, "shape": s, "color": c}
        elif kind == "remove":
            del new[i]
            text = sc.choice(REMOVE_TEMPLATES).format(d=d)
            edit = {"index": i, "shape": o.shape, "color": o.color}
        else:
            raise ValueError(kind)
        edit["kind"] = kind
        return {"kind": kind, "instruction": text, "source": src, "target": src.replace_objects(new), "edit": edit}
    raise RuntimeError(f"could not sample a {kind} edit")


# ---- text-only samples --------------------------------------------------------------------------------------------

MIXES = [(("red", "yellow"), "orange"), (("blue", "yellow"), "green"), (("red", "blue"), "purple"),
         (("red", "white"), "pink"), (("black", "white"), "gray")]
THINGS = {"a banana": "yellow", "grass": "green", "the sky": "blue", "snow": "white", "a strawberry": "red",
          "a tomato": "red", "a lemon": "yellow", "a leaf": "green", "a pumpkin": "orange", "an eggplant": "purple",
          "a fire truck": "red", "a cloud": "white", "milk": "white", "a carrot": "orange", "the sea": "blue"}
SHAPE_FACTS = [("Which shape has three sides?", "triangle"), ("Which shape has four equal sides?", "square"),
               ("Which shape is perfectly round?", "circle"), ("Which shape is a symbol of love?", "heart"),
               ("Which shape has five points?", "star"), ("Which shape looks like a plus sign?", "cross"),
               ("Which shape has no corners?", "circle")]
SIDE_FACTS = [("How many sides does a triangle have?", 3), ("How many sides does a square have?", 4),
              ("How many corners does a square have?", 4), ("How many corners does a triangle have?", 3),
              ("How many points does a star have?", 5), ("How many arms does a cross have?", 4),
              ("How many corners does a circle have?", 0)]


def _text_sample(sc: SceneSampler) -> dict[str, Any]:
    rng = sc.rng
    sub = ["mix", "thing", "shape", "sides", "arith", "list"][int(rng.integers(6))]
    if sub == "mix":
        (a, b), ans = MIXES[int(rng.integers(len(MIXES)))]
        if rng.random() < 0.5:
            a, b = b, a
        q = sc.choice(["What color do you get when you mix {a} and {b}?",
                       "What colour do you get if you mix {a} paint with {b} paint?",
                       "If you mix {a} and {b}, which color do you get?"]).format(a=a, b=b)
        return {"question": q, "answer": ans, "answer_type": "color", "subtype": sub}
    if sub == "thing":
        thing = sc.choice(sorted(THINGS))
        q = sc.choice(["What color is {t}?", "What colour is {t} usually?", "Which color is {t}?"]).format(t=thing)
        return {"question": q, "answer": THINGS[thing], "answer_type": "color", "subtype": sub}
    if sub == "shape":
        q, ans = SHAPE_FACTS[int(rng.integers(len(SHAPE_FACTS)))]
        return {"question": q, "answer": ans, "answer_type": "shape", "subtype": sub}
    if sub == "sides":
        q, ans = SIDE_FACTS[int(rng.integers(len(SIDE_FACTS)))]
        return {"question": q, "answer": str(ans), "answer_type": "number", "subtype": sub}
    if sub == "arith":
        shape = sc.choice(SHAPES)
        a = int(rng.integers(1, 6))
        b = int(rng.integers(1, 5))
        if rng.random() < 0.5:
            q = f"I have {_count_phrase(a, '', shape)} and add {b} more. How many {PLURALS[shape]} do I have now?"
            ans = a + b
        else:
            a = a + b
            q = f"There are {a} {PLURALS[shape]}. If {b} are removed, how many are left?"
            ans = a - b
        return {"question": q, "answer": str(ans), "answer_type": "number", "subtype": sub}
    k = int(rng.integers(2, 6))
    items = [sc.choice(SHAPES) for _ in range(k)]
    q = f"How many shapes are in this list: {', '.join(items)}?"
    return {"question": q, "answer": str(k), "answer_type": "number", "subtype": sub}


# ---- samples ------------------------------------------------------------------------------------------------------


def make_sample(kind: str, seed: int, split: str, index: int) -> dict[str, Any]:
    """Sample `index` of `kind` (a pure function of the arguments): a dict with the spec(s), text and answer."""
    rng = sample_rng(seed, split, kind, index)
    sc = SceneSampler(rng, heldout_ok=(split == "eval"))
    evaluation = split == "eval"
    if kind in GENERATION_CATEGORIES:
        force = evaluation and kind in ("colors", "color_attr") and index % 2 == 0
        s = _gen_sample(kind, sc, index, force_heldout=force, balanced=evaluation)
        s["family"] = "generation"
    elif kind in UNDERSTANDING_TYPES:
        s = _und_sample(kind, sc, index, balanced=evaluation)
        s["family"] = "understanding"
    elif kind in EDIT_KINDS:
        s = _edit_sample(kind, sc)
        s["family"] = "editing"
    elif kind == TEXT_KIND:
        s = _text_sample(sc)
        s["qtype"] = TEXT_KIND
        s["family"] = "text"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    s["kind"] = kind
    return s
