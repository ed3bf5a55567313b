"""Operations: Prometheus metrics at /metrics and one JSON access-log line per request, with a request id."""

from __future__ import annotations

import json
import re
import time

import pytest

pytest.importorskip("prometheus_client")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            got = ",".join(sorted(p for p in re.findall(r'[a-z_]+="[^"]*"', m.group(2) or "")))
            if got == want:
                return float(m.group(3))
    return 0.0


def test_metrics_count_requests_batches_tokens_and_errors(main_server):
    with main_server.client() as c:
        before = c.get("/metrics").text
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 1, "n": 2})
        assert r.status_code == 200
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 3}).json()
        assert c.post("/v1/images/generations", json={"prompt": "x", "size": "9x9"}).status_code == 400
        after_resp = c.get("/metrics")
    assert after_resp.headers["content-type"].startswith("text/plain")
    after = after_resp.text
    d = lambda name, **kw: metric(after, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert d("cheers_requests_total", path="/v1/images/generations", status="200") == 1
    assert d("cheers_requests_total", path="/v1/images/generations", status="400") == 1
    assert d("cheers_errors_total", status="400", code="unsupported_size") == 1
    assert d("cheers_images_total", task="image") == 2
    assert d("cheers_batch_size_count", task="image") == 1 and d("cheers_batch_size_sum", task="image") == 2
    assert d("cheers_generated_tokens_total") >= chat["usage"]["completion_tokens"] >= 1
    assert d("cheers_decode_steps_total") >= 1
    assert d("cheers_request_seconds_count", path="/v1/chat/completions") == 1
    assert metric(after, "cheers_queue_depth") == 0 and metric(after, "cheers_ready") == 1
    for name in ("cheers_rejected_total", "cheers_cancelled_total", "cheers_running_replies", "cheers_queue_bytes",
                 "cheers_batch_seconds_bucket"):
        assert name in after


def test_access_log_lines_carry_the_request_id(main_server):
    with main_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                   headers={"X-Request-Id": "trace-abc.123"})
        assert r.status_code == 200 and r.headers["X-Request-Id"] == "trace-abc.123"
        bad = c.post("/v1/chat/completions", json={"messages": []}, headers={"X-Request-Id": "no spaces allowed"})
        rid = bad.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid) and "x-cheers-error-code" not in bad.headers
    deadline = time.monotonic() + 5
    lines: dict[str, dict] = {}
    while time.monotonic() < deadline and not {"trace-abc.123", rid} <= set(lines):
        for ln in main_server.log.read_text().splitlines():
            if ln.startswith("{") and '"event": "request"' in ln:
                entry = json.loads(ln)
                lines[entry["request_id"]] = entry
        time.sleep(0.05)
    ok, err = lines["trace-abc.123"], lines[rid]
    assert ok["method"] == "POST" and ok["path"] == "/v1/chat/completions" and ok["status"] == 200
    assert ok["batch"] >= 1 and ok["ms"] > 0 and ok["bytes"] > 0 and ok["client"].startswith("127.0.0.1:")
    assert err["status"] == 400 and err["error"] == "invalid_request_error"
