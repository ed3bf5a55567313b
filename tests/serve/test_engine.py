"""Continuous batching on the embedded model: replies that join and leave the running batch between tokens are the
replies each would get alone; streams get their text in pieces; a gone job leaves at the next token."""

from __future__ import annotations

import pytest
import torch

from cheers.serve.engine import TextEngine
from cheers.serve.scheduler import Job, StreamSink

QUESTIONS = ["Which shape is red?", "Draw the digit 7.", "There are three hearts above a purple cross. " * 3,
             "yes", "What color is the star? " * 5, "Hello!"]


@pytest.fixture(scope="module")
def model():
    from cheers.pipeline import Cheers

    return Cheers.from_pretrained(None)


def conv(q: str) -> list[dict]:
    return [{"role": "user", "content": q, "images": []}]


def opts(**kw) -> dict:
    return {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
            "stop": [], "seed": 0, **kw}


class FakeSink:
    """A sink for the engine's events without an event loop: the engine returns pieces as events."""

    def __init__(self):
        import threading

        self.cancelled = threading.Event()


def drive(engine: TextEngine, arrivals: dict[int, list[Job]], max_steps: int = 200) -> tuple[dict, dict, list]:
    """Run steps; `arrivals[k]` join before step k. Returns done completions, streamed text per job, batch sizes."""
    done, pieces, sizes = {}, {}, []
    for k in range(max_steps):
        events = engine.step(arrivals.get(k, []))
        sizes.append(engine.rows)
        for ev in events:
            if ev[0] == "done":
                done[id(ev[1])] = ev[2]
            elif ev[0] == "piece":
                pieces[id(ev[1])] = pieces.get(id(ev[1]), "") + ev[2]
            elif ev[0] == "error":
                raise ev[2]
        if not engine.active and k >= max(arrivals):
            break
    return done, pieces, sizes


def test_joining_between_tokens_gives_the_solo_replies(model):
    solo = [model.chat(conv(q), max_new_tokens=12, temperature=0.0, seed=0) for q in QUESTIONS]
    assert len(set(solo)) > 2  # different questions, different replies: the comparison means something
    jobs = [Job("chat", ("c",), [conv(q)], [0], opts()) for q in QUESTIONS]
    jobs[2].sink = FakeSink()  # one of them streamed
    engine = TextEngine(model, max_rows=8, max_prefill=4)
    done, pieces, sizes = drive(engine, {0: jobs[:2], 3: jobs[2:4], 5: jobs[4:]})
    got = [done[id(j)][0].text for j in jobs]
    assert got == solo
    assert pieces[id(jobs[2])] == solo[2]  # the streamed pieces add up to the reply
    assert max(sizes) >= 4 and engine.steps < sum(len(model.tokenizer.encode(s)) + 1 for s in solo)
    for j in jobs:
        c = done[id(j)][0]
        assert c.finish_reason in ("stop", "length") and (c.finish_reason == "length") == (c.tokens == 12)
    assert engine.cache is None and not engine.active  # everything left: nothing held


def test_seeded_sampling_is_independent_of_the_batch(model):
    q = "Which shape is red?"
    solo = model.chat(conv(q), max_new_tokens=10, temperature=0.9, top_p=0.95, seed=1234)
    noise = [Job("chat", ("c",), [conv(x)], [0], opts(temperature=1.0, seed=7 + i)) for i, x in enumerate(QUESTIONS)]
    mine = Job("chat", ("c",), [conv(q)] * 2, [0, 0], opts(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=1234))
    done, _, _ = drive(TextEngine(model, max_rows=16), {0: noise[:3], 2: [mine] + noise[3:]})
    first, second = done[id(mine)]
    assert first.text == solo  # choice 0 samples with the request's seed, as alone
    assert first.peak > 2


def test_a_gone_job_leaves_at_the_next_token(model):
    a = Job("chat", ("c",), [conv("Hello!")], [0], opts(max_new_tokens=200, repetition_penalty=1.0))
    b = Job("chat", ("c",), [conv("yes")], [0], opts(max_new_tokens=6))
    engine = TextEngine(model, max_rows=4)
    engine.step([a, b])
    assert engine.rows == 2
    a.cancel()
    events = engine.step([])
    assert ("dropped", a) in [(e[0], e[1]) for e in events] and engine.rows <= 1
    assert all(s.job is b for s in engine.seqs)


def test_stop_strings_are_never_streamed(model):
    full = model.chat(conv("Hello!"), max_new_tokens=12, temperature=0.0, seed=0)
    assert len(full) > 4
    stop = full[2:4]
    job = Job("chat_stream", ("c",), [conv("Hello!")], [0], opts(stop=[stop]), sink=FakeSink())
    done, pieces, _ = drive(TextEngine(model), {0: [job]})
    assert done[id(job)][0].text == full[: full.find(stop)] == pieces.get(id(job), "")
    assert done[id(job)][0].finish_reason == "stop"


def test_logprobs_and_logit_bias(model):
    q = "What color is the star?"
    base = Job("chat", ("c",), [conv(q)], [0], opts(logprobs=3))
    done, _, _ = drive(TextEngine(model), {0: [base]})
    c = done[id(base)][0]
    assert c.text == model.chat(conv(q), max_new_tokens=12, temperature=0.0, seed=0)
    assert len(c.logprobs) == c.tokens >= 1 and all(len(e["top_logprobs"]) == 3 for e in c.logprobs)
    assert "".join(e["token"] for e in c.logprobs) == c.text
    first = c.logprobs[0]
    assert first["logprob"] == pytest.approx(first["top_logprobs"][0]["logprob"])  # greedy takes the top one
    assert all(e["logprob"] <= 0 for e in c.logprobs) and first["bytes"] == list(first["token"].encode())
    # a bias of -100 on the greedy first token: the runner-up comes first
    tid = model.tokenizer.encode(first["token"])[0]
    biased = Job("chat", ("c",), [conv(q)], [0], opts(logit_bias={str(tid): -100}, logprobs=0))
    done, _, _ = drive(TextEngine(model), {0: [biased]})
    assert done[id(biased)][0].logprobs[0]["token"] == first["top_logprobs"][1]["token"]


def test_openai_penalties_count_generated_tokens(model):
    from cheers import sampling as S
    from cheers.serve.engine import Seq

    engine = TextEngine(model)
    V = model.config.text.vocab_size
    logits = torch.zeros(V)
    logits[5], logits[6] = 3.0, 2.0

    def pick(**o):
        seq = Seq(Job("chat", ("c",), [[]], [0], o), 0, S.TextSampling(), [], [])
        seq.counts = torch.zeros(V)
        seq.counts[5] = 2
        return engine._choose(seq, logits)

    assert pick() == 5
    assert pick(presence_penalty=1.5) == 6  # 3 - 1.5 < 2
    assert pick(presence_penalty=0.5) == 5
    assert pick(frequency_penalty=0.6) == 6  # 3 - 2 x 0.6 < 2
    assert pick(frequency_penalty=0.4) == 5
    assert pick(logit_bias={"7": 5}) == 7


def test_stream_sink_round_trip():
    import asyncio

    async def main():
        sink = StreamSink(asyncio.get_running_loop())
        sink.put("he")
        sink.put("llo")
        await asyncio.sleep(0)
        return [sink.queue.get_nowait() for _ in range(2)]

    assert asyncio.run(main()) == [("piece", "he"), ("piece", "llo")]
    torch.manual_seed(0)
