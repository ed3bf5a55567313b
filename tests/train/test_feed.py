"""The record feed: the global batch does not depend on how it is split, and resuming with an added source."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_global_batch_does_not_depend_on_the_split(flow_config):
    """1 rank x micro 4, 2 ranks x micro 2 and 1 rank x micro 2 x accumulation 2 take the same records."""
    from cheers.train.feed import RecordFeed, slot_range

    cfg = flow_config(Path("/nonexistent"))
    layouts = {(1, 4, 1), (2, 2, 1), (1, 2, 2), (4, 1, 1)}
    seen = {}
    for world, micro, accum in layouts:
        recs = RecordFeed(cfg.data, 0).take(world * micro * accum)
        got = []
        for k in range(accum):
            for r in range(world):
                a, b = slot_range(k, r, world, micro)
                got += [(i, rec.where) for i, rec in recs[a:b]]
        seen[(world, micro, accum)] = sorted(got)
    assert len({tuple(v) for v in seen.values()}) == 1
    # alternate pairing: equal contiguous halves per global batch, in source order
    cfg.data.pairing = "alternate"
    cfg.data.sources = cfg.data.sources[:2]
    recs = RecordFeed(cfg.data, 0).take(4)
    assert [r.source for _, r in recs] == ["understanding", "understanding", "generation", "generation"]


def test_resume_with_an_added_source(flow_config):
    """data.add_sources_on_resume: the saved sources continue exactly, the appended one starts fresh; without the
    flag, or when a saved source is missing, resuming is refused with both source lists in the message."""
    import copy

    from cheers.train.feed import RecordFeed
    from cheers.train.settings import TrainConfigError

    cfg = flow_config(Path("/nonexistent"))
    feed = RecordFeed(cfg.data, 0)
    feed.take(9)
    state = copy.deepcopy(feed.state_dict())
    want = [(i, r.where, r.source) for i, r in feed.take(40)]  # the old mix's continuation

    more = copy.deepcopy(cfg.data)
    more.sources.append(copy.deepcopy(more.sources[2]))
    more.sources[-1].name, more.sources[-1].weight = "extra", 4.0
    with pytest.raises(TrainConfigError, match="add_sources_on_resume"):
        RecordFeed(more, 0).load_state_dict(copy.deepcopy(state))
    more.add_sources_on_resume = True
    grown = RecordFeed(more, 0)
    grown.load_state_dict(copy.deepcopy(state))
    got = grown.take(40)
    assert [i for i, _ in got] == [w[0] for w in want]  # the global index carries on (noise, t, dropout seeds)
    assert 5 <= sum(r.source == "extra" for _, r in got) <= 30  # weight 4 of 15: ~10.7 expected
    # each saved source continues with the records it would have given next
    for name in ("understanding", "generation"):
        old = [w for _, w, src in want if src == name]
        new = [r.where for _, r in got if r.source == name]
        k = min(len(old), len(new))
        assert k >= 3 and new[:k] == old[:k]
    # the grown stream saves and resumes exactly as any other
    st2 = copy.deepcopy(grown.state_dict())
    a = [(i, r.where, r.source) for i, r in grown.take(12)]
    again = RecordFeed(more, 0)
    again.load_state_dict(st2)
    assert [(i, r.where, r.source) for i, r in again.take(12)] == a
    # removing a saved source is refused even with the flag
    fewer = copy.deepcopy(more)
    fewer.sources = fewer.sources[1:]
    with pytest.raises(TrainConfigError, match="does not match"):
        RecordFeed(fewer, 0).load_state_dict(copy.deepcopy(state))
