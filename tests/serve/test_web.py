"""The demo page in headless Chromium: a generation runs end to end and the image shows on screen."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
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
