"""Judge: GenEval rules on detections, edit scoring."""

from __future__ import annotations

from cheers.eval import detector as DT
from cheers.eval import judge as J
from cheers.eval import shapes as S
from cheers.shapes import samples as SM
from cheers.shapes import world as W


def D(shape, color, box, conf=0.99):
    return DT.Detection(shape, color, conf, box, 0.01)


def test_geneval_rules():
    left, right = (0.1, 0.4, 0.3, 0.6), (0.7, 0.4, 0.9, 0.6)
    top, bottom = (0.4, 0.05, 0.6, 0.25), (0.4, 0.7, 0.6, 0.9)
    meta = lambda cat, objs, rel=None: SM.geneval_metadata(cat, objs, "p", rel)  # noqa: E731
    assert J.score_geneval([D("circle", "red", left)], meta("single_object", [{"shape": "circle"}]))[0]
    assert not J.score_geneval([D("square", "red", left)], meta("single_object", [{"shape": "circle"}]))[0]
    two = meta("two_object", [{"shape": "circle"}, {"shape": "star"}])
    assert J.score_geneval([D("circle", "red", left), D("star", "red", right)], two)[0]
    assert not J.score_geneval([D("circle", "red", left), D("circle", "red", right)], two)[0]
    cnt = meta("counting", [{"shape": "heart", "count": 2}])
    assert J.score_geneval([D("heart", "red", left), D("heart", "blue", right)], cnt)[0]
    assert not J.score_geneval([D("heart", "red", left)], cnt)[0]
    three = [D("heart", "red", left), D("heart", "blue", right), D("heart", "red", top)]
    ok, why = J.score_geneval(three, cnt)
    assert not ok and "heart<3" in why  # exact count: the exclude rule
    col = meta("colors", [{"shape": "cross", "color": "green"}])
    assert J.score_geneval([D("cross", "green", left)], col)[0]
    assert not J.score_geneval([D("cross", "blue", left)], col)[0]
    # the most confident cross decides, as in GenEval
    assert not J.score_geneval([D("cross", "blue", left, 0.9), D("cross", "green", right, 0.8)], col)[0]
    pos = meta("position", [{"shape": "circle"}, {"shape": "square"}], "left of")
    assert J.score_geneval([D("circle", "red", left), D("square", "red", right)], pos)[0]
    assert not J.score_geneval([D("circle", "red", right), D("square", "red", left)], pos)[0]
    assert not J.score_geneval([D("circle", "red", left)], pos)[0]
    above = meta("position", [{"shape": "circle"}, {"shape": "square"}], "above")
    assert J.score_geneval([D("circle", "red", top), D("square", "red", bottom)], above)[0]
    assert not J.score_geneval([D("circle", "red", left), D("square", "red", right)], above)[0]
    ca = meta("color_attr", [{"shape": "circle", "color": "red"}, {"shape": "star", "color": "blue"}])
    assert J.score_geneval([D("circle", "red", left), D("star", "blue", right)], ca)[0]
    assert not J.score_geneval([D("circle", "blue", left), D("star", "red", right)], ca)[0]
    # below GenEval's confidence threshold an object is not seen
    assert not J.score_geneval([D("circle", "red", left, 0.2)], meta("single_object", [{"shape": "circle"}]))[0]
    assert W.relative_position(left, right) == {"left of"} and W.relative_position(top, bottom) == {"above"}
    assert W.relative_position(left, left) == set()


def test_edit_scoring():
    items = S.eval_prompts(seed=3, n=6, resolution=64, families=("editing",))["editing"]
    for e in items:
        good = J.score_edit(W.render_scene(e.target, 64), e)
        assert good == {**good, "correct": True, "applied": True, "preserved": True}, e.instruction
        same = J.score_edit(e.source_image, e)
        assert not same["correct"] and not same["applied"], e.instruction
    e = next(e for e in items if e.kind == "recolor")  # recolouring the wrong object: applied, not preserved
    others = [i for i in range(len(e.target.objects)) if i != e.edit["index"]]
    if others:
        objs = list(e.target.objects)
        j = others[0]
        new = next(c for c in W.COLORS if c != objs[j].color and (objs[j].shape, c) not in e.target.pairs())
        objs[j] = objs[j].recolored(new)
        r = J.score_edit(W.render_scene(e.target.replace_objects(objs), 64), e)
        assert r["applied"] and not r["preserved"] and not r["correct"]
    m = next(e for e in items if e.kind == "move")  # moved the wrong way: not applied
    i = m.edit["index"]
    o = m.source.objects[i]
    ux, uy = W.DIRECTIONS[m.edit["direction"]]
    back = list(m.source.objects)
    back[i] = o.moved(min(max(o.cx - 0.1 * ux, 0.2), 0.8), min(max(o.cy - 0.1 * uy, 0.2), 0.8))
    assert not J.score_edit(W.render_scene(m.source.replace_objects(back), 64), m)["applied"]
