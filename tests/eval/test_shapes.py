"""ShapesWorld eval items: balanced and varied, and their specs satisfy their metadata and answers."""

from __future__ import annotations

from collections import Counter

from cheers.eval import judge as J
from cheers.eval import shapes as S
from cheers.shapes import datasets as DS
from cheers.shapes import samples as SM
from cheers.shapes import world as W


def test_eval_items_are_balanced_and_varied():
    items = S.eval_prompts(seed=4, n=16, resolution=48)
    gens, qas, eds = items["generation"], items["understanding"], items["editing"]
    assert Counter(g.category for g in gens) == {c: 16 for c in SM.GENERATION_CATEGORIES}
    assert Counter(q.qtype for q in qas) == {t: 16 for t in SM.UNDERSTANDING_TYPES + ("text",)}
    assert Counter(e.kind for e in eds) == {k: 16 for k in SM.EDIT_KINDS}
    yn = [q.answer for q in qas if q.qtype == "yesno"]
    assert yn.count("Yes") == yn.count("No") == 8
    assert Counter(q.answer for q in qas if q.qtype == "mcq") == {"A": 4, "B": 4, "C": 4, "D": 4}
    assert Counter(g.geneval["include"][1]["position"][0] for g in gens if g.category == "position") == \
        {r: 4 for r in W.RELATIONS}
    for cat in SM.GENERATION_CATEGORIES:  # several phrasings per meaning
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
    return [J.Detection(o.shape, o.color, 1.0, W.object_box(o), 0.01) for o in spec.objects]


def test_specs_satisfy_their_geneval_metadata_and_answers():
    items = S.eval_prompts(seed=9, n=30, resolution=32)
    for g in items["generation"]:
        ok, why = J.score_geneval(_truth_detections(g.spec), g.geneval)
        assert ok, (g.prompt, why)
        assert g.geneval["prompt"] == g.prompt and g.text == g.prompt + DS.GEN_SUFFIX
    for q in items["understanding"]:  # the stored answer scores as right against the spec
        assert J.score_answer(q.answer, q.answer, q.answer_type, q.options, q.spec), q
        if q.qtype == "count":
            shape = J.normalize_shape(q.question)
            assert sum(o.shape == shape for o in q.spec.objects) == int(q.answer)
        if q.qtype == "caption":
            assert J.parse_caption(q.answer) == Counter((o.color, o.shape) for o in q.spec.objects)
    for e in items["editing"]:
        assert len(e.target.objects) == len(e.source.objects) + {"add": 1, "remove": -1}.get(e.kind, 0)
