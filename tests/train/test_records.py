"""Records: parsing a jsonl line into turns and image paths, and the one-line errors for bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cheers.train.records import DataError, Record, check_turns, parse_record


def _record(obj, root: Path = Path("/data"), where: str = "f.jsonl:7") -> Record:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return Record(raw, where, root)


def test_a_record_parses_into_roles_and_resolved_image_paths(tmp_path):
    rec = _record({"id": 12, "image": "a.png, /abs/b.png", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nEdit."},
        {"from": "gpt", "value": "<image_gen>"}]}, tmp_path)
    parsed = parse_record(rec)
    assert parsed.id == "12" and parsed.where == "f.jsonl:7"
    assert parsed.turns == [("system", "Be brief."), ("user", "<image>\nEdit."), ("assistant", "<image_gen>")]
    assert parsed.images == [tmp_path / "a.png", Path("/abs/b.png")]
    listed = parse_record(_record({"image": ["x.png"], "conversations": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, tmp_path))
    assert listed.id == "" and listed.images == [tmp_path / "x.png"]
    assert listed.turns == [("user", "q"), ("assistant", "a")]  # the {role, content} message form
    assert parse_record(_record(b"\xef\xbb\xbf" + json.dumps({"conversations": listed_turns()}).encode())).images == []


def listed_turns() -> list[dict[str, str]]:
    return [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]


@pytest.mark.parametrize("obj,cause", [
    (b"\xff", "line is not valid UTF-8 (invalid start byte at byte 0)"),
    (b"{", "malformed JSON (Expecting property name enclosed in double quotes at column 2)"),
    ({"id": True, "conversations": []}, "'id' must be a string or an integer, got bool"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "conversation must end with a gpt turn (nothing to learn "
                                                         "otherwise)"),
    ({"image": "", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "x": 1},
     "unknown key(s) ['x']; allowed: id, image, conversations"),
])
def test_bad_records_fail_with_where_and_cause(obj, cause):
    with pytest.raises(DataError) as info:
        parse_record(_record(obj))
    assert (info.value.where, info.value.cause) == ("f.jsonl:7", cause)
    assert str(info.value) == f"f.jsonl:7: {cause}"


def test_check_turns_keeps_the_order_and_maps_the_roles():
    assert check_turns([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                        {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]) == \
        [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    with pytest.raises(ValueError, match="roles must alternate human/gpt: turn 2 is 'gpt', expected 'human'"):
        check_turns([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}])
