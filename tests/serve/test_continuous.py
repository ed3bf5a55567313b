"""Continuous batching through HTTP on the embedded model: concurrent streamed and non-streamed chats share
decoding steps and each gets the reply it would get alone."""

from __future__ import annotations

import asyncio
import json

import httpx

QUESTIONS = ["Which shape is red?", "Draw the digit 7.", "What color is the star?", "Hello!",
             "There are three hearts above a purple cross.", "Describe the picture.", "Is there a circle?",
             "How many squares are there?", "What is above the cross?", "Name a shape."]


def body(q: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0, **kw}


async def stream_text(c: httpx.AsyncClient, q: str) -> str:
    text = ""
    async with c.stream("POST", "/v1/chat/completions", json=body(q, stream=True)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                if choices:
                    text += choices[0]["delta"].get("content") or ""
    return text


async def burst(url: str) -> tuple[list[str], list[httpx.Response]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        streams = [stream_text(c, q) for q in QUESTIONS]
        posts = [c.post("/v1/chat/completions", json=body(q)) for q in QUESTIONS[:4]]
        out = await asyncio.gather(*streams, *posts)
    return out[:len(QUESTIONS)], out[len(QUESTIONS):]


def test_ten_concurrent_streams_share_batches_and_match_solo(embedded_server):
    with embedded_server.client() as c:
        solo = [c.post("/v1/chat/completions", json=body(q)).json()["choices"][0]["message"]["content"]
                for q in QUESTIONS]
        before = c.get("/v1/stats").json()["decode"]
    assert len(set(solo)) >= 5  # the replies differ: matching them means something
    streamed, posted = asyncio.run(burst(embedded_server.url))
    assert streamed == solo
    assert [r.json()["choices"][0]["message"]["content"] for r in posted] == solo[:4]
    with embedded_server.client() as c:
        after = c.get("/v1/stats").json()["decode"]
    steps, tokens = after["steps"] - before["steps"], after["tokens"] - before["tokens"]
    assert after["largest_running"] >= 8, after
    # one by one, every token would take a step of its own; shared, a step serves many rows
    assert tokens >= 14 and steps < tokens / 3, (steps, tokens)
    assert max(int(r.headers["X-Cheers-Batch-Size"]) for r in posted) >= 8
