"""Record sources: jsonl epochs, shuffling, sharding and exact resume; weighted mixes, their ratio and exhaustion."""

from __future__ import annotations

import json

import pytest

from cheers.train.sources import JsonlSource, MixedSource

TEXT_TURNS = [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi!"}]


@pytest.fixture()
def root(tmp_path):
    return tmp_path


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def numbered(root, n=23):
    rows = []
    for i in range(n):
        rows.append({"id": i, "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]})
        if i % 5 == 2:
            rows.append("")  # blank lines are not records
    return write_jsonl(root / "num.jsonl", rows)


def ids_of(records, k):
    return [json.loads(next(records).raw)["id"] for _ in range(k)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_source_epochs_and_exact_resume(root, shuffle):
    path = numbered(root)
    src = JsonlSource(path, shuffle=shuffle, seed=5)
    first = ids_of(src, 23)
    assert sorted(first) == list(range(23))
    assert (first == list(range(23))) is (not shuffle)
    second = ids_of(src, 23)
    assert sorted(second) == list(range(23)) and src.epoch == 1
    if shuffle:
        assert second != first
    # save mid-epoch (also across an epoch boundary), restore into a fresh source, same continuation
    for k in (0, 7, 23, 30):
        a = JsonlSource(path, shuffle=shuffle, seed=5)
        ids_of(a, k)
        state = json.loads(json.dumps(a.state_dict()))
        want = ids_of(a, 40)
        b = JsonlSource(path, shuffle=shuffle, seed=5)
        b.load_state_dict(state)
        assert ids_of(b, 40) == want
    # line numbers count blank lines
    wheres = [r.where for r in JsonlSource(path, shuffle=False, loop=False)]
    assert wheres[3] == f"{path}:5"
    # one epoch only
    assert len(list(JsonlSource(path, shuffle=shuffle, loop=False))) == 23
    other = JsonlSource(path, shuffle=shuffle, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


@pytest.mark.parametrize("shuffle", [False, True])
def test_source_sharding(root, shuffle):
    path = numbered(root)
    parts = [[json.loads(r.raw)["id"] for r in JsonlSource(path, shuffle=shuffle, loop=False, rank=k, world_size=3)]
             for k in range(3)]
    assert sorted(sum(parts, [])) == list(range(23))
    assert [len(p) for p in parts] == [8, 8, 7]


def test_mixed_source_ratio_and_resume(root):
    def src(name, n):
        rows = [{"id": f"{name}{i}", "conversations": TEXT_TURNS} for i in range(n)]
        return JsonlSource(write_jsonl(root / f"{name}.jsonl", rows), shuffle=True, seed=1)

    def mix():
        return MixedSource({"und": (src("u", 7), 3), "gen": (src("g", 11), 6), "text": (src("t", 5), 1)}, seed=42)

    m = mix()
    names = [next(m).source for _ in range(3000)]
    for name, share in (("und", 0.3), ("gen", 0.6), ("text", 0.1)):
        assert abs(names.count(name) / 3000 - share) < 0.03, (name, names.count(name))
    assert m.counts == {n: names.count(n) for n in ("und", "gen", "text")}
    # exact resume
    a = mix()
    for _ in range(123):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    want = [next(a).raw for _ in range(50)]
    b = mix()
    b.load_state_dict(state)
    assert [next(b).raw for _ in range(50)] == want
    # determinism
    assert [next(mix()).raw for _ in range(1)] == [next(mix()).raw]


def test_mixed_source_exhaustion(root):
    rows = [{"id": i, "conversations": TEXT_TURNS} for i in range(3)]
    a = JsonlSource(write_jsonl(root / "a.jsonl", rows), shuffle=False, loop=False)
    b = JsonlSource(write_jsonl(root / "b.jsonl", rows[:2]), shuffle=False, loop=False)
    got = [r.source for r in MixedSource({"a": (a, 1), "b": (b, 5)}, seed=0)]
    assert sorted(got) == ["a", "a", "a", "b", "b"]
    with pytest.raises(ValueError, match="weight"):
        MixedSource({"a": (a, 0)})
