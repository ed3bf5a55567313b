"""Real `cheers serve` processes on free loopback ports, shared by the serve tests.

Three servers start together (their start-up overlaps): `main` (a random tiny model) with default limits and no
key; `strict` with an API key, tiny limits and no batching, for the limit, key and queue-full tests; and
`embedded` serving the embedded trained model, whose replies differ from question to question (the tiny model's
do not), for the continuous-batching tests.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

API_KEY = "test-secret-key"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, **kw) -> "httpx.Client":
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120, **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None and httpx.get(f"{self.url}/health", timeout=10).status_code == 200


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir: Path | None, log: Path, *args: str, env: dict[str, str] | None = None,
           key: str | None = None) -> Server:
    """A `cheers serve` process for `model_dir` (None: the embedded model) on a free port."""
    port = free_port()
    model = ["--model", str(model_dir), "--model-name", "tiny"] if model_dir is not None else []
    cmd = [sys.executable, "-m", "cheers.cli", "serve", *model, "--port", str(port), "--log-level", "warning",
           "--threads", "1", *args]
    e = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=e, cwd=str(REPO))
    return Server(f"http://127.0.0.1:{port}", proc, log, key)


def wait_ready(srv: Server, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log.read_text()}")
        try:
            if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{srv.log.read_text()}")


def stop(srv: Server) -> None:
    if srv.proc.poll() is None:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()


@dataclass
class Servers:
    main: Server
    strict: Server
    embedded: Server


@pytest.fixture(scope="session")
def servers(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    main = launch(tiny_model_dir, logs / "main.log", "--max-wait-ms", "100", "--max-batch", "16")
    strict = launch(tiny_model_dir, logs / "strict.log", "--no-warmup", "--max-batch", "1", "--max-queue", "1",
                    "--max-body-size", "256KB", "--max-image-size", "16KB", "--max-image-pixels", "10000",
                    "--max-tokens", "32", "--max-prompt-tokens", "200", "--max-n", "4",
                    env={"CHEERS_API_KEY": API_KEY}, key=API_KEY)
    embedded = launch(None, logs / "embedded.log", "--no-warmup", "--max-running", "16")
    try:
        for srv in (main, strict, embedded):
            wait_ready(srv)
        yield Servers(main, strict, embedded)
    finally:
        for srv in (main, strict, embedded):
            stop(srv)


@pytest.fixture(scope="session")
def main_server(servers) -> Server:
    return servers.main


@pytest.fixture(scope="session")
def strict_server(servers) -> Server:
    return servers.strict


@pytest.fixture(scope="session")
def embedded_server(servers) -> Server:
    return servers.embedded


def png_bytes(size=(40, 30), color=(200, 20, 20), noise: bool = False) -> bytes:
    from PIL import Image

    if noise:
        import numpy as np

        arr = np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr)
    else:
        im = Image.new("RGB", size, color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


def decode_png(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))
