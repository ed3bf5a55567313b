"""The demo page in headless Chromium: a generation runs end to end and the image shows on screen."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import os
import select
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium); "
                                                         "the browser test needs /usr/bin/chromium")

WINDOW = "1000,800"


def chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={WINDOW}",
           "--force-device-scale-factor=1", "--hide-scrollbars", "--run-all-compositor-stages-before-draw",
           "--virtual-time-budget=60000", *mode, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_generates_an_image(main_server, tmp_path):
    query = urlencode({"auto": "1", "prompt": "a red circle and a blue square", "steps": "2", "cfg": "2",
                       "seed": "7"})
    url = f"{main_server.url}/?{query}"

    # 1. the DOM after the scripted generation: title 'done', an <img> holding a PNG data URL
    run = chromium(url, tmp_path / "profile-dom", "--dump-dom")
    dom = run.stdout
    assert "<title>done</title>" in dom, (re.findall(r"<title>.*?</title>", dom), run.stderr[-2000:])
    m = re.search(r'<img id="gen-out-0"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert m, dom[:3000]
    png = Image.open(io.BytesIO(base64.b64decode(m.group(1)))).convert("RGB")
    assert png.size == (64, 64)
    rect = json.loads(re.search(r'data-img-rect="([^"]+)"', dom).group(1).replace("&quot;", '"'))
    left, top, width, height = (round(v) for v in rect)
    assert (width, height) == (256, 256)
    assert "batch of 1" in dom  # the status line shows the response's batch header

    # 2. the screenshot: the generated picture is on screen where the <img> is
    shot_path = tmp_path / "shot.png"
    run = chromium(url, tmp_path / "profile-shot", f"--screenshot={shot_path}")
    assert shot_path.exists(), run.stderr[-2000:]
    shot = np.asarray(Image.open(shot_path).convert("RGB"), dtype=float)
    assert shot.shape[:2] == (800, 1000)
    inner = shot[top + 2: top + height - 2, left + 2: left + width - 2]  # inside the 1 px border
    assert inner.std() > 20, "the image area is blank"
    page_bg = shot[-50:, :, :]  # the empty bottom of the page: flat
    assert page_bg.std() < 3
    expected = np.asarray(png.resize((width, height), Image.NEAREST), dtype=float)[2:-2, 2:-2]
    diff = np.abs(inner - expected).mean()
    assert diff < 25, f"on-screen image differs from the generated PNG (mean abs diff {diff:.1f})"
    # and it is not just any picture: a shifted comparison is much worse
    assert np.abs(inner - np.roll(expected, 64, axis=1)).mean() > diff + 10


class DevTools:
    """Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out; NUL-terminated JSON), in real
    time: for the streaming chat, whose chunks --virtual-time-budget does not wait for."""

    def __init__(self, profile: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def child():  # runs in the forked child before exec: put the pipe ends at fds 3 and 4
            a, b = os.dup(cmd_r), os.dup(out_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={WINDOW}", "about:blank"],
            preexec_fn=child, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.session = None

    def send(self, method: str, params: dict | None = None, timeout: float = 60, session: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(method)
            if select.select([self._out_r], [], [], left)[0]:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser exited")
                self._buf += chunk

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]

    def js(self, expression: str, timeout: float = 60):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      timeout=timeout)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_title(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            title = self.js("document.title")
            if title == "done" or (title or "").startswith("error"):
                return title
            time.sleep(0.05)
        raise TimeoutError(f"page title still {title!r}")

    def set_file(self, selector: str, path: Path) -> None:
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._cmd_w)
        os.close(self._out_r)


@pytest.fixture
def devtools(tmp_path):
    d = DevTools(tmp_path / "profile-cdp")
    yield d
    d.close()


def test_page_chat_ask_and_edit(main_server, devtools, tmp_path):
    devtools.open(f"{main_server.url}/?" + urlencode({"auto": "chat", "message": "Which shape is red?",
                                                       "max_tokens": "4"}))
    assert devtools.wait_title() == "done"
    log = devtools.js("document.getElementById('chat-log').innerHTML")
    assert "<b>you: </b><span>Which shape is red?</span>" in log and "<b>cheers: </b>" in log
    assert "[error]" not in log
    assert re.fullmatch(r"\d+ ms", devtools.js("document.getElementById('chat-status').textContent"))

    src = tmp_path / "shapes.png"
    Image.new("RGB", (48, 40), (220, 30, 30)).save(src)
    # ask: an uploaded image and a question, answered over the streaming API
    devtools.js("showTab('ask')")
    devtools.set_file("#ask-file", src)
    devtools.js("ask()", timeout=90)
    status = devtools.js("document.getElementById('ask-status').textContent")
    assert re.fullmatch(r"\d+ ms", status), status
    # edit: multipart upload from the page, the edited image shows
    devtools.js("showTab('edit'); document.getElementById('edit-steps').value = '2'")
    devtools.set_file("#edit-file", src)
    devtools.js("edit()", timeout=90)
    status = devtools.js("document.getElementById('edit-status').textContent")
    assert "batch of" in status, status
    size = devtools.js("new Promise(r => { const i = document.getElementById('edit-out-0');"
                       " const wh = () => r([i.naturalWidth, i.naturalHeight]);"
                       " if (i.complete) wh(); else i.onload = wh; })")
    assert size == [64, 64]
