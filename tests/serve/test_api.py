"""The endpoints through real HTTP: httpx and the official `openai` client against a `cheers serve` process."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.serve.conftest import data_url, decode_png, png_bytes

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def oai(main_server):
    return openai.OpenAI(base_url=f"{main_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_health_models_and_page(main_server):
    with main_server.client() as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["model"] == "tiny" and h["ready"] is True and h["queue_limit"] == 64
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
        card = models["data"][0]
        assert card["resolution"] == 64 and card["image_defaults"]["steps"] == 80
        assert c.get("/v1/models/tiny").json()["id"] == "tiny"
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for needle in ("Generate", "Ask", "Edit", "Chat", "/v1/images/generations", "/v1/chat/completions"):
            assert needle in page.text
        assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN


def test_openai_client_lists_models(oai):
    assert [m.id for m in oai.models.list()] == ["tiny"]


def test_chat_with_openai_client_text_and_image(oai):
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is this?"}],
                                    max_tokens=5)
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 4 and 0 <= u.completion_tokens <= 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                                         {"type": "text", "text": "What color is it?"}]}]
    r2 = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert isinstance(r2.choices[0].message.content, str) and r2.usage.prompt_tokens > 4


def test_chat_stream_matches_non_stream(oai, main_server):
    msgs = [{"role": "user", "content": "Tell me about the square."}]
    full = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=6).choices[0].message.content
    chunks = list(oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full  # greedy: the same reply either way
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)

    # the raw event stream: data lines, OpenAI chunks, terminated by [DONE]
    with main_server.client() as c:
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": msgs, "max_tokens": 3, "stream": True}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            events = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_chat_n_choices(main_server):
    with main_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 3,
                                                 "max_tokens": 2, "temperature": 0.8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
    assert r.headers["X-Cheers-Batch-Size"] == "3"


def test_generate_images_with_openai_client(oai):
    g = oai.images.generate(model="tiny", prompt="a red circle", size="64x64", n=2, response_format="b64_json",
                            extra_body={"steps": 2, "cfg": 2.0, "seed": 11})
    assert len(g.data) == 2 and g.created > 0
    a, b = (np.asarray(decode_png(d.b64_json).convert("RGB"), dtype=float) for d in g.data)
    assert a.shape == (64, 64, 3) and a.std() > 5 and np.abs(a - b).mean() > 5  # seeds 11 and 12 differ
    assert [d.model_extra.get("seed") for d in g.data] == [11, 12]
    # same seed, same image; cfg_scale is an alias of cfg
    again = oai.images.generate(prompt="a red circle", size="64x64", response_format="b64_json",
                                extra_body={"steps": 2, "cfg_scale": 2.0, "seed": 11})
    c = np.asarray(decode_png(again.data[0].b64_json).convert("RGB"), dtype=float)
    assert np.abs(a - c).max() <= 1
    # a guidance interval between the step times (0, 1) guides no step: the unguided picture of seed 11
    never, plain = (oai.images.generate(prompt="a red circle", size="64x64", response_format="b64_json",
                                        extra_body={"steps": 2, "seed": 11, **kw}) for kw in
                    ({"cfg": 2.0, "cfg_interval": [0.4, 0.6]}, {"cfg": 1.0}))
    n_, p_ = (np.asarray(decode_png(g.data[0].b64_json).convert("RGB"), dtype=float) for g in (never, plain))
    assert np.abs(n_ - p_).max() <= 1 and np.abs(n_ - a).max() > 1


def test_edit_multipart_with_openai_client_and_json_data_url(oai, main_server):
    src = png_bytes((48, 32), (30, 160, 40))
    e = oai.images.edit(model="tiny", image=("src.png", src, "image/png"), prompt="Make the square red.",
                        size="64x64", response_format="b64_json", extra_body={"steps": 2, "seed": 5})
    im = decode_png(e.data[0].b64_json)
    assert im.size == (64, 64) and im.format == "PNG"
    with main_server.client() as c:
        r = c.post("/v1/images/edits", json={"image": data_url(src), "prompt": "Make the square red.", "steps": 2,
                                             "seed": 5})
        assert r.status_code == 200, r.text
        same = np.asarray(decode_png(r.json()["data"][0]["b64_json"]), dtype=float)
        assert np.abs(same - np.asarray(im, dtype=float)).max() <= 1  # multipart and JSON: the same edit
        r2 = c.post("/v1/images/edits", json={"images": [{"image_url": data_url(src)}], "prompt": "Remove it.",
                                              "steps": 2, "n": 2})
        assert r2.status_code == 200 and len(r2.json()["data"]) == 2
        # edit_start reaches the model: a later start changes the picture
        r3 = c.post("/v1/images/edits", json={"image": data_url(src), "prompt": "Make the square red.", "steps": 2,
                                              "seed": 5, "edit_start": 0.6})
        assert r3.status_code == 200, r3.text
        late = np.asarray(decode_png(r3.json()["data"][0]["b64_json"]), dtype=float)
        assert np.abs(late - same).max() > 1


def test_stats_report_batches(main_server):
    with main_server.client() as c:
        s = c.get("/v1/stats").json()
    assert s["settings"]["max_batch"] == 16 and s["queued"] == 0
    assert s["batches"]["image"]["count"] >= 1 and s["largest_batch"] >= 1


def test_stream_stops_generating_when_the_client_goes_away(main_server):
    msgs = [{"role": "user", "content": "Count the shapes."}]
    with main_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 20})
        ms_per_token = float(r.headers["X-Cheers-Run-Ms"]) / 20
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": msgs, "max_tokens": 1000, "stream": True}) as resp:
            for n, line in enumerate(ln for ln in resp.iter_lines() if ln):
                if n == 2:
                    break  # hang up after a few chunks
        deadline = time.monotonic() + 60
        while c.get("/v1/stats").json()["queued"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        streams = [b for b in c.get("/v1/stats").json()["recent"] if b["task"] == "chat_stream"]
    # stopped long before the 1000 tokens it was allowed
    assert streams[-1]["ms"] < 300 * ms_per_token, (streams[-1], ms_per_token)
