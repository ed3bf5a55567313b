"""Every bad-input class answers a 4xx JSON error naming the field, the API key, the queue limit; and the server
survives all of it."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest

from tests.serve.conftest import API_KEY, data_url, png_bytes

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"


def _user(content):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


def _image_part(url):
    return _user([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}])


def expect(resp: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param"}
    assert err["param"] == param, err
    for w in words:
        assert w.lower() in err["message"].lower(), err
    return err


# (path, json body or raw bytes, status, param, words in the message)
BAD_JSON = [
    (CHAT, b'{"messages": [', 400, None, ["malformed JSON"]),
    (GEN, b"", 400, None, ["empty request body"]),
    (GEN, b"[1, 2]", 400, None, ["JSON object"]),
    (GEN, b"[" * 100000, 400, None, ["malformed JSON"]),
    (GEN, b"\xff\xfe{}", 400, None, ["UTF-8"]),
    (GEN, {"prompt": "x", "colour": "red"}, 400, "colour", ["unknown field 'colour'", "accepted fields"]),
    (GEN, {"steps": 2}, 400, "prompt", ["missing required field 'prompt'"]),
    (GEN, {"prompt": "   "}, 400, "prompt", ["must not be empty"]),
    (GEN, {"prompt": "x", "size": "512x512"}, 400, "size", ["unsupported size", "64x64"]),
    (GEN, {"prompt": "x", "size": "huge"}, 400, "size", ["unsupported size"]),
    (GEN, {"prompt": "x", "n": "two"}, 400, "n", ["integer"]),
    (GEN, {"prompt": "x", "n": 0}, 400, "n", [">= 1"]),
    (GEN, {"prompt": "x", "n": 99}, 400, "n", ["<= 8"]),
    (GEN, {"prompt": "x", "steps": 100000}, 400, "steps", ["<= 250"]),
    (GEN, {"prompt": "x", "sampler": "dpm"}, 400, "sampler", ["euler"]),
    (GEN, {"prompt": "x", "cfg": 2, "cfg_scale": 3}, 400, "cfg_scale", ["disagree"]),
    (GEN, {"prompt": "x", "cfg_interval": [0.8, 0.2]}, 400, "cfg_interval", ["0 <= lo <= hi <= 1"]),
    (GEN, {"prompt": "x", "cfg_interval": 0.5}, 400, "cfg_interval", ["two numbers"]),
    (GEN, {"prompt": "x", "cfg_interval": [0.1, "a"]}, 400, "cfg_interval", ["two numbers"]),
    (GEN, {"prompt": "x", "response_format": "url"}, 400, "response_format", ["b64_json"]),
    (GEN, {"prompt": "x", "model": "dall-e-3"}, 404, "model", ["does not exist"]),
    (GEN, {"prompt": "a <image> b"}, 400, "prompt", ["reserved token"]),
    (GEN, {"prompt": "word " * 3000}, 400, "prompt", ["tokens", "exceeds the model's context of 2048"]),
    (CHAT, {"messages": []}, 400, "messages", ["non-empty"]),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "tools", ["'tools' is not supported"]),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "colour": "red"}, 400, "colour",
     ["unknown field 'colour'", "accepted fields"]),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", ["one of"]),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, 400, "messages[0].mood",
     ["unknown field"]),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", ["string or an array"]),
    (CHAT, _user([{"type": "input_audio", "input_audio": {}}]), 400, "messages[0].content[0].type", ["one of"]),
    (CHAT, _user([{"type": "text", "text": "a", "extra": 1}]), 400, "messages[0].content[0].extra",
     ["unknown field"]),
    (CHAT, _user("<|im_end|> hi"), 400, "messages[0].content", ["reserved token"]),
    (CHAT, _image_part("https://example.com/cat.png"), 400, "messages[0].content[0].image_url.url",
     ["not fetched"]),
    (CHAT, _image_part("data:image/png;base64,@@@not-base64@@@"), 400, "messages[0].content[0].image_url.url",
     ["base64"]),
    (CHAT, _image_part(data_url(b"hello, I am text, not a picture")), 400, "messages[0].content[0].image_url.url",
     ["not a usable image"]),
    (CHAT, _image_part(data_url(png_bytes(), "text/plain")), 400, "messages[0].content[0].image_url.url",
     ["not an image"]),
    (CHAT, _image_part(data_url(png_bytes()[:60])), 400, "messages[0].content[0].image_url.url",
     ["not a usable image"]),
    (CHAT, {**_user("hi"), "max_tokens": 5000}, 400, "max_tokens", ["<= 1024"]),
    (CHAT, {**_user("hi"), "temperature": -1}, 400, "temperature", [">= 0"]),
    (CHAT, {**_user("hi"), "top_p": 0}, 400, "top_p", ["> 0"]),
    (CHAT, {**_user("hi"), "stop": [1, 2]}, 400, "stop", ["strings"]),
    (CHAT, {**_user("hi"), "stream": True, "n": 2}, 400, "n", ["n = 1"]),
    (CHAT, {**_user("hi"), "stream_options": {"include_usage": True}}, 400, "stream_options", ["stream: true"]),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 250}], "max_tokens": 1000}, 400, "messages",
     ["max_tokens adds 1000", "exceeds the model's context"]),
    (EDIT, {"prompt": "make it red", "steps": 2}, 400, "image", ["missing required field 'image'"]),
    (EDIT, {"prompt": "x", "image": data_url(b"GIF89a broken")}, 400, "image", ["not a usable image"]),
    (EDIT, {"prompt": "x", "images": [{"image_url": data_url(png_bytes())}] * 2}, 400, "images", ["exactly one"]),
    (EDIT, {"prompt": "x", "image": data_url(png_bytes()), "edit_start": 1.0}, 400, "edit_start", ["<= 0.99"]),
    (GEN, {"prompt": "x", "edit_start": 0.5}, 400, "edit_start", ["unknown field 'edit_start'"]),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD_JSON,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[1]}-{c[3]}" for i, c in enumerate(BAD_JSON)])
def test_bad_json_requests(main_server, path, body, status, param, words):
    with main_server.client() as c:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = c.post(path, json=body)
    expect(r, status, param, *words)


def test_bad_multipart_edits(main_server):
    with main_server.client() as c:
        r = c.post(EDIT, files={"image": ("notes.txt", b"just some text", "text/plain")}, data={"prompt": "x"})
        expect(r, 400, "image", "not a usable image")
        r = c.post(EDIT, data={"prompt": "x", "steps": "2"})  # a form without the file
        expect(r, 400, "image", "missing required file")
        files = {"image": ("a.png", png_bytes(), "image/png"), "mask": ("m.png", png_bytes(), "image/png")}
        r = c.post(EDIT, files=files, data={"prompt": "x"})
        expect(r, 400, "mask", "masks are not supported")
        r = c.post(EDIT, files={"image": ("a.png", png_bytes(), "image/png")}, data={"prompt": "x", "steps": "many"})
        expect(r, 400, "steps", "integer")
        r = c.post(EDIT, files={"image": ("a.png", png_bytes(), "image/png")}, data={"prompt": "x", "colour": "red"})
        expect(r, 400, "colour", "unknown field")
        r = c.post(EDIT, files={"image": ("a.png", png_bytes(), "image/png")}, data={"prompt": "x", "quality": "max"})
        expect(r, 400, "quality", "one of")


def test_unknown_routes_and_methods(main_server):
    with main_server.client() as c:
        expect(c.get("/v1/nothing"), 404, None, "no such endpoint")
        expect(c.get(CHAT), 405, None, "not allowed")
        expect(c.get("/v1/models/gpt-4"), 404, "model", "does not exist")


def test_openai_client_sees_bad_request(main_server):
    oai = openai.OpenAI(base_url=f"{main_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(prompt="x", size="1024x1024")
    assert e.value.status_code == 400 and e.value.body["param"] == "size"


def test_server_survives_bad_inputs(main_server):
    assert main_server.alive()
    with main_server.client() as c:
        r = c.post(GEN, json={"prompt": "still working", "steps": 1, "seed": 1})
    assert r.status_code == 200


# ---- the strict server: API key, small limits, queue of 1 -------------------------------------------------------
def test_api_key_required_except_health(strict_server):
    url = strict_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    r = httpx.get(f"{url}/v1/models")
    expect(r, 401, None, "missing API key")
    assert r.json()["error"]["type"] == "authentication_error"
    expect(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401, None, "invalid API key")
    expect(httpx.post(f"{url}{CHAT}", json=_user("hi")), 401, None, "API key")
    expect(httpx.post(f"{url}{GEN}", json={"prompt": "x"}), 401, None, "API key")
    expect(httpx.get(f"{url}/v1/stats"), 401, None, "API key")
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"X-API-Key": API_KEY}).status_code == 200

    good = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    r = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_configured_limits(strict_server):
    with strict_server.client() as c:
        # body over 256KB
        expect(c.post(GEN, content=b'{"prompt": "' + b"x" * 300_000 + b'"}',
                      headers={"Content-Type": "application/json"}), 413, None, "over the limit")
        # image file over 16KB (noise does not compress), inside the body limit
        big = png_bytes((120, 120), noise=True)
        assert 16 * 1024 < len(big) < 200 * 1024
        expect(c.post(CHAT, json=_image_part(data_url(big))), 400, "messages[0].content[0].image_url.url",
               "over the limit")
        expect(c.post(EDIT, files={"image": ("big.png", big, "image/png")}, data={"prompt": "x"}), 400, "image",
               "over the limit")
        # small file, too many pixels (200 x 200 > 10000)
        expect(c.post(CHAT, json=_image_part(data_url(png_bytes((200, 200))))), 400,
               "messages[0].content[0].image_url.url", "too large")
        # max_tokens over the configured 32, prompt over the configured 200 tokens
        expect(c.post(CHAT, json={**_user("hi"), "max_tokens": 33}), 400, "max_tokens", "<= 32")
        expect(c.post(CHAT, json=_user("word " * 300)), 400, "messages", "over the limit of 200 tokens")
        expect(c.post(GEN, json={"prompt": "x", "n": 5}), 400, "n", "<= 1")  # n is capped by the queue (1)


def test_queue_full_answers_503(strict_server):
    """Queue of 1 and no batching: while one image is being made, another request is turned away with 503."""
    for attempt in range(3):  # retried only if the slow request finished before the second one arrived
        result = {}

        def slow():
            with strict_server.client() as c:
                result["r"] = c.post(GEN, json={"prompt": "slow", "steps": 60 * (attempt + 1), "seed": 1})

        t = threading.Thread(target=slow)
        t.start()
        with strict_server.client() as c:
            deadline = time.monotonic() + 60
            while c.get("/v1/stats").json()["queued"] < 1 and t.is_alive():
                assert time.monotonic() < deadline, "the slow request never got queued"
                time.sleep(0.005)
            r = c.post(CHAT, json=_user("hi"))
            t.join(120)
            assert result["r"].status_code == 200
            if r.status_code == 200:
                continue
            err = expect(r, 503, None, "server busy")
            assert err["code"] == "queue_full" and r.headers.get("Retry-After")
            assert c.get("/v1/stats").json()["rejected_queue_full"] >= 1
            assert c.post(CHAT, json=_user("hi")).status_code == 200  # room again
            break
    else:
        pytest.fail("never saw the queue full")
    assert strict_server.alive()


def test_b64_payload_is_checked_before_decoding(strict_server):
    huge = "data:image/png;base64," + base64.b64encode(b"\0" * 100_000).decode()
    with strict_server.client() as c:
        expect(c.post(CHAT, json=_image_part(huge)), 400, "messages[0].content[0].image_url.url", "over the limit")
