"""Answer scoring: normalisation of letters, yes/no, numbers, colours, shapes, positions and captions."""

from __future__ import annotations

from collections import Counter

import pytest

from cheers.eval import answers as A
from cheers.shapes import world as W


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("B.", "B"), ("(C) heart", "C"), ("D: star", "D"), ("The answer is A.", "A"), ("Option C", "C"),
    ("answer: d", "D"), ("A", "A"), ("a", "A"), ("triangle", "B"), ("It is a red circle", "A"),
    ("a circle or a star", None), ("hexagon", None), ("", None),
])
def test_normalize_letter(text, expected):
    assert A.normalize_letter(text, {"A": "circle", "B": "triangle", "C": "heart", "D": "star"}) == expected


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, there is a red circle.", "yes"), ("No", "no"), ("no, there isn't", "no"),
    ("There is no star in the image.", "no"), ("True", "yes"), ("maybe", None), ("", None),
])
def test_normalize_yesno(text, expected):
    assert A.normalize_yesno(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("3", 3), ("There are 3.", 3), ("three", 3), ("Four stars.", 4), ("I count two of them", 2), ("none", 0),
    ("zero", 0), ("12", 12), ("many", None),
])
def test_normalize_number(text, expected):
    assert A.normalize_number(text) == expected


def test_normalize_words_and_captions():
    assert A.normalize_color("It is red.") == "red"
    assert A.normalize_color("grey") == "gray" and A.normalize_color("Violet!") == "purple"
    assert A.normalize_color("The star is orange and big") == "orange"
    assert A.normalize_color("no idea") is None
    assert A.normalize_shape("Triangles.") == "triangle" and A.normalize_shape("a plus sign") == "cross"
    assert A.normalize_position("It is to the left.") == "left" and A.normalize_position("under it") == "below"
    assert A.parse_caption("The image shows a red circle, two blue squares and a yellow star.") == \
        Counter({("red", "circle"): 1, ("blue", "square"): 2, ("yellow", "star"): 1})
    assert A.parse_caption("3 green hearts") == Counter({("green", "heart"): 3})
    spec = W.SceneSpec((W.ObjectSpec("circle", "red", 0.2, 0.3, 0.3), W.ObjectSpec("circle", "red", 0.2, 0.7, 0.7)))
    assert A.score_answer("Two red circles.", "", "caption", spec=spec)
    assert not A.score_answer("A red circle.", "", "caption", spec=spec)
    assert A.score_answer("It's 4", "4", "number") and not A.score_answer("It's 5", "4", "number")
