"""16 concurrent requests: every one answered with its own result, and the server batched them."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np

from tests.serve.conftest import decode_png

N = 16


async def _burst(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=180) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


def test_16_concurrent_image_requests_are_batched_and_each_gets_its_own_image(main_server):
    body = lambda i: {"prompt": f"shape number {i}", "seed": 100 + i, "steps": 1, "cfg": 2.0}  # noqa: E731
    with main_server.client() as c:  # references, one at a time (batch of 1)
        refs = {}
        for i in (0, 7, 15):
            r = c.post("/v1/images/generations", json=body(i))
            assert r.status_code == 200 and r.headers["X-Cheers-Batch-Size"] == "1"
            refs[i] = np.asarray(decode_png(r.json()["data"][0]["b64_json"]), dtype=float)

    responses = asyncio.run(_burst(main_server.url, "/v1/images/generations", [body(i) for i in range(N)]))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    images = [np.asarray(decode_png(r.json()["data"][0]["b64_json"]), dtype=float) for r in responses]
    assert [r.json()["data"][0]["seed"] for r in responses] == [100 + i for i in range(N)]
    for i, ref in refs.items():  # batched == alone (up to rounding), and not some other request's image
        assert np.abs(images[i] - ref).max() <= 2
        others = [np.abs(images[j] - ref).mean() for j in range(N) if j != i]
        assert min(others) > 5
    sizes = [int(r.headers["X-Cheers-Batch-Size"]) for r in responses]
    assert max(sizes) > 1, sizes
    assert len({r.headers["X-Cheers-Batch-Id"] for r in responses}) < N


def test_16_concurrent_chat_requests_are_batched(main_server):
    bodies = [{"messages": [{"role": "user", "content": f"Question {i}: which shape is {'big ' * i}here?"}],
               "max_tokens": 4} for i in range(N)]
    with main_server.client() as c:
        solo = c.post("/v1/chat/completions", json=bodies[5]).json()["choices"][0]["message"]["content"]
    responses = asyncio.run(_burst(main_server.url, "/v1/chat/completions", bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    payloads = [r.json() for r in responses]
    assert len({p["id"] for p in payloads}) == N
    for p in payloads:
        assert p["object"] == "chat.completion" and isinstance(p["choices"][0]["message"]["content"], str)
        assert p["usage"]["completion_tokens"] <= 4
    # longer questions have more prompt tokens: usage belongs to the right request
    prompt_tokens = [p["usage"]["prompt_tokens"] for p in payloads]
    assert prompt_tokens == sorted(prompt_tokens) and prompt_tokens[0] < prompt_tokens[-1]
    assert payloads[5]["choices"][0]["message"]["content"] == solo  # greedy: batched reply == reply alone
    sizes = [int(r.headers["X-Cheers-Batch-Size"]) for r in responses]
    assert max(sizes) > 1, sizes
    with main_server.client() as c:
        stats = c.get("/v1/stats").json()
    chat_sizes = {int(k) for k in stats["batches"]["chat"]["sizes"]}
    assert max(chat_sizes) > 1 and stats["largest_batch"] > 1
