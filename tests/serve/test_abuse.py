"""Abusive requests against a real server: each is refused or run without stalling anyone else, holding memory
within a stated bound, and every bad input is a 4xx in the JSON error format."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import data_url, png_bytes

CHAT = "/v1/chat/completions"
GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Watch:
    """Runs `send` in a thread while polling /health and the server's resident memory."""

    def __init__(self, srv, send):
        self.srv, self.send = srv, send
        self.health_s: list[float] = []
        self.rss: list[float] = []
        self.result = None
        self.took = 0.0

    def run(self, timeout: float = 300) -> "Watch":
        def worker():
            t0 = time.monotonic()
            self.result = self.send()
            self.took = time.monotonic() - t0

        self.rss0 = rss_mb(self.srv.proc.pid)
        th = threading.Thread(target=worker)
        th.start()
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.srv.url, timeout=30) as c:
            while th.is_alive() and time.monotonic() < deadline:
                t0 = time.monotonic()
                assert c.get("/health").status_code == 200
                self.health_s.append(time.monotonic() - t0)
                self.rss.append(rss_mb(self.srv.proc.pid))
                time.sleep(0.05)
        th.join(max(0.0, deadline - time.monotonic()))
        assert not th.is_alive(), "the abusive request is still running"
        return self

    @property
    def rss_growth(self) -> float:
        return max(self.rss, default=self.rss0) - self.rss0


def test_a_huge_prompt_is_refused_at_once_and_stalls_nobody(main_server):
    """A 24 MB prompt (under the 25 MB body limit): refused by a bound that needs no tokenizing."""
    body = {"messages": [{"role": "user", "content": "word " * (24 * 2**20 // 5)}], "max_tokens": 2}
    raw = httpx.Request("POST", "/", json=body).content
    assert 23 * 2**20 < len(raw) < 25 * 2**20

    def send():
        with main_server.client() as c:
            return c.post(CHAT, content=raw, headers={"Content-Type": "application/json"})

    w = Watch(main_server, send).run()
    r = w.result
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert "at least" in r.json()["error"]["message"]
    assert w.took < 10, w.took
    assert len(w.health_s) >= 2 and max(w.health_s) < 1.0, w.health_s
    # the body (24 MB), its text and one JSON copy; no token lists of millions of entries
    assert w.rss_growth < 250, (w.rss0, max(w.rss))


def expect(resp: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w.lower() in err["message"].lower(), err
    return err


# raw JSON bytes: (path, body, status, param, words)
BAD_RAW = [
    (GEN, b'{"prompt": "a \\ud800 b"}', 400, "prompt", ["unpaired UTF-16 surrogate", "\\ud800"]),
    (GEN, b'{"prompt": "x", "\\udfff": 1}', 400, None, ["field name", "surrogate"]),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\uDBFF"}]}]}', 400,
     "messages[0].content[0].text", ["surrogate"]),
    (GEN, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, None, ["malformed JSON", "digits"]),
    (CHAT, b'{"messages": [], "n": -' + b"1" * 5000 + b"}", 400, None, ["malformed JSON"]),
    (GEN, b'{"prompt": "x", "seed": ' + b"9" * 4000 + b"}", 400, "seed", ["<= 4294967295"]),
]


@pytest.mark.parametrize("path,raw,status,param,words", BAD_RAW, ids=[f"raw{i}" for i in range(len(BAD_RAW))])
def test_unencodable_text_and_huge_numbers_are_4xx(main_server, path, raw, status, param, words):
    with main_server.client() as c:
        expect(c.post(path, content=raw, headers={"Content-Type": "application/json"}), status, param, *words)


def test_a_surrogate_pair_is_fine(main_server):
    with main_server.client() as c:
        r = c.post(GEN, content=b'{"prompt": "\\ud83d\\ude00 a smile", "steps": 1, "seed": 3}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body,param,limit", [
    (GEN, {"prompt": "x", "seed": 2**32}, "seed", "<= 4294967295"),
    (GEN, {"prompt": "x", "seed": 2**32 - 1, "n": 2}, "seed", "<= 4294967294"),  # image i uses seed + i
    (EDIT, {"prompt": "x", "image": "data:image/png;base64,AA==", "seed": 2**63 - 1}, "seed", "<= 4294967295"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "seed": 2**40}, "seed",
     "<= 4294967295"),
])
def test_seed_range_is_checked_up_front(main_server, path, body, param, limit):
    with main_server.client() as c:
        expect(c.post(path, json=body), 400, param, limit)


def test_the_largest_seed_runs(main_server):
    with main_server.client() as c:
        r = c.post(GEN, json={"prompt": "x", "steps": 1, "seed": 2**32 - 2, "n": 2})
        assert r.status_code == 200, r.text
        assert [d["seed"] for d in r.json()["data"]] == [2**32 - 2, 2**32 - 1]
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                               "temperature": 0.7, "seed": 2**32 - 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,ctype", [(GEN, "text/plain"), (CHAT, "text/plain;charset=UTF-8"),
                                        (CHAT, "application/x-www-form-urlencoded"), (GEN, None),
                                        (CHAT, "multipart/form-data; boundary=x"), (EDIT, "text/plain")])
def test_bodies_must_be_declared_json(main_server, path, ctype):
    """A web page may send text/plain and form bodies to any site without a preflight; JSON endpoints refuse
    them (edits also take the documented multipart form)."""
    headers = {"Content-Type": ctype} if ctype else {}
    with main_server.client() as c:
        r = c.post(path, content=b'{"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}',
                   headers=headers)
    err = expect(r, 415, None, "Content-Type must be application/json")
    assert err["code"] == "unsupported_media_type"


def test_queued_images_are_held_at_model_resolution(main_server):
    """Two concurrent chats with eight 4096 x 4096 images each (the default limits): each image is reduced to
    what the model reads (64 x 64 here) as it is parsed, one decodes at a time, and the memory goes back."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (30, 140, 200)).save(buf, format="PNG")  # 48 MB of pixels, a small file
    url = data_url(buf.getvalue())
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 8
                          + [{"type": "text", "text": "What colour?"}]}], "max_tokens": 2}

    def send():
        import asyncio

        async def burst():
            async with httpx.AsyncClient(base_url=main_server.url, timeout=300) as c:
                return await asyncio.gather(*(c.post(CHAT, json=body) for _ in range(2)))

        return asyncio.run(burst())

    w = Watch(main_server, send).run()
    assert [r.status_code for r in w.result] == [200] * 2, [r.text[:200] for r in w.result]
    assert max(w.health_s) < 1.0, w.health_s
    # 16 images x 48 MB = 768 MB if held at full size; one decode at a time needs about three copies of one
    assert w.rss_growth < 350, (w.rss0, max(w.rss))
    # and handed back (held at full size, 1.3 GB stayed after the replies)
    deadline = time.monotonic() + 3
    while rss_mb(main_server.proc.pid) - w.rss0 > 150 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rss_mb(main_server.proc.pid) - w.rss0 < 150, (w.rss0, rss_mb(main_server.proc.pid))


def raw_post(url: str, path: str, body: dict):
    """Send a JSON POST on a plain socket and return the open socket (the caller hangs up by closing it)."""
    import json
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    data = json.dumps(body).encode()
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def wait_idle(c: httpx.Client, timeout: float = 120) -> float:
    t0 = time.monotonic()
    while c.get("/v1/stats").json()["queued"]:
        assert time.monotonic() - t0 < timeout, "the server never went idle"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_abandoned_image_requests_stop_between_denoising_steps(main_server):
    with main_server.client() as c:
        r = c.post(GEN, json={"prompt": "timing", "steps": 20, "seed": 1})
        ms_per_step = float(r.headers["X-Cheers-Run-Ms"]) / 20
        before = c.get("/v1/stats").json()
        last_id = max(b["id"] for b in before["recent"])
        socks = [raw_post(main_server.url, GEN, {"prompt": f"dropped {i}", "steps": 250, "seed": i})
                 for i in range(4)]
        deadline = time.monotonic() + 30
        while c.get("/v1/stats").json()["queued"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.2)  # running now
        for s in socks:
            s.close()
        idle_after = wait_idle(c)
        stats = c.get("/v1/stats").json()
    full_s = 250 * ms_per_step / 1000  # what the batch would have run (at least: 4 images cost more than 1)
    assert idle_after < max(0.3 * full_s, 1.0), (idle_after, full_s)
    assert stats["cancelled_requests"] - before["cancelled_requests"] == 4
    # the first ran (alone: it found the server idle) and stopped early; the others never ran
    ran = [b for b in stats["recent"] if b["id"] > last_id]
    assert ran and sum(b["ms"] for b in ran) < 0.3 * full_s * 1000, (ran, full_s)


def test_an_abandoned_chat_stops_between_tokens(main_server):
    msgs = [{"role": "user", "content": "Count the shapes."}]
    with main_server.client() as c:
        r = c.post(CHAT, json={"messages": msgs, "max_tokens": 40})
        ms_per_token = float(r.headers["X-Cheers-Run-Ms"]) / r.json()["usage"]["completion_tokens"]
        before = c.get("/v1/stats").json()["cancelled_requests"]
        s = raw_post(main_server.url, CHAT, {"messages": msgs, "max_tokens": 1000})
        deadline = time.monotonic() + 30
        while c.get("/v1/stats").json()["queued"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.1)
        s.close()
        idle_after = wait_idle(c)
        stats = c.get("/v1/stats").json()
    assert idle_after < max(0.3 * 1000 * ms_per_token / 1000, 1.0), (idle_after, ms_per_token)
    assert stats["cancelled_requests"] - before == 1


def test_sigterm_drains_then_answers_json_503(tiny_model_dir, tmp_path):
    """On SIGTERM: what can finish within the grace period finishes; the rest is answered 503 in the JSON format
    (a stream gets an error event), no traceback; the process ends by the signal (uvicorn re-raises it)."""
    import json
    import signal

    from tests.serve.conftest import launch, wait_ready

    # the long job must outlast the grace period on any machine: 5,000 steps take far longer than 4 s
    srv = launch(tiny_model_dir, tmp_path / "srv.log", "--no-warmup", "--shutdown-grace", "4", "--max-steps", "5000")
    wait_ready(srv)
    out: dict = {}

    def stream():
        with srv.client() as c, c.stream("POST", CHAT, json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 1024, "stream": True}) as r:
            out["stream"] = [ln for ln in r.iter_lines() if ln]

    def post(name, body):
        with srv.client() as c:
            out[name] = c.post(GEN, json=body)

    threads = [threading.Thread(target=stream)]
    threads[0].start()
    with srv.client() as c:
        while c.get("/v1/stats").json()["queued"] < 1:
            time.sleep(0.005)
        threads.append(threading.Thread(target=post, args=("short", {"prompt": "quick", "steps": 8, "seed": 1})))
        threads[-1].start()
        while c.get("/v1/stats").json()["queued"] < 2:
            time.sleep(0.005)
        threads.append(threading.Thread(target=post, args=("long", {"prompt": "slow", "steps": 5000, "seed": 2})))
        threads[-1].start()
        while c.get("/v1/stats").json()["queued"] < 3:
            time.sleep(0.005)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    rc = srv.proc.wait(30)
    took = time.monotonic() - t0
    log = srv.log.read_text()
    assert rc == -signal.SIGTERM and took < 4 + 5, (rc, took, log[-2000:])
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    assert out["short"].status_code == 200  # finished within the grace period
    r = out["long"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text[:300]
    events = out["stream"]
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == "shutting_down" and "shutting down" in err["message"]


def test_without_a_key_only_local_hosts_and_same_origin(main_server):
    """DNS rebinding (a page's own domain resolving to the server) and cross-site requests are refused."""
    port = main_server.url.rsplit(":", 1)[1]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with main_server.client() as c:
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}"):
            err = expect(c.get("/v1/models", headers={"Host": host}), 403, None, "not allowed")
            assert err["code"] == "host_not_allowed"
            expect(c.post(CHAT, json=body, headers={"Host": host}), 403, None, "not allowed")
            expect(c.get("/", headers={"Host": host}), 403, None, "not allowed")
            assert c.get("/health", headers={"Host": host}).status_code == 200  # probes stay open
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
        for origin in ("https://evil.example", f"http://evil.example:{port}", "null", f"http://localhost:{port}"):
            err = expect(c.post(CHAT, json=body, headers={"Origin": origin}), 403, None, "cross-origin")
            assert err["code"] == "cross_origin"
        same = c.post(CHAT, json=body, headers={"Origin": main_server.url})  # the demo page's own requests
        assert same.status_code == 200, same.text


def test_with_a_key_the_key_decides(strict_server):
    with strict_server.client() as c:
        r = c.get("/v1/models", headers={"Host": "gpu-box.example", "Origin": "https://app.example"})
        assert r.status_code == 200, r.text
        expect(httpx.get(f"{strict_server.url}/v1/models", headers={"Host": "gpu-box.example"}), 401, None,
               "missing API key")
