"""Scale-out: a second replica run by plain uvicorn (the application factory) answers like `cheers serve` does,
so any HTTP load balancer can spread requests over replicas and use /health for readiness."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from tests.serve.conftest import REPO, Server, decode_png, free_port, stop, wait_ready


def test_env_options_map_to_serve_options():
    from cheers.serve.asgi import args_from_env

    a = args_from_env({"CHEERS_MODEL": "/m", "CHEERS_DEVICE": "cuda:1", "CHEERS_MAX_BATCH": "8",
                       "CHEERS_NO_WARMUP": "1", "CHEERS_NO_ACCESS_LOG": "0", "CHEERS_MAX_BODY_SIZE": "2MB",
                       "CHEERS_ALLOWED_HOST": "a.lan b.lan", "CHEERS_API_KEY": "k", "UNRELATED": "x"})
    assert (a.model, a.device, a.max_batch, a.no_warmup, a.no_access_log) == ("/m", "cuda:1", 8, True, False)
    assert a.max_body_size == 2 * 2**20 and a.allowed_host == ["a.lan", "b.lan"] and a.api_key == "k"


def test_a_uvicorn_replica_answers_like_cheers_serve(main_server, tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CHEERS_MODEL": str(tiny_model_dir),
           "CHEERS_MODEL_NAME": "tiny", "CHEERS_NO_WARMUP": "1", "CHEERS_THREADS": "1"}
    log = tmp_path / "replica.log"
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "cheers.serve.asgi:app_from_env",
                             "--port", str(port), "--log-level", "warning"], env=env, cwd=str(REPO),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    replica = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_ready(replica)
        body = {"prompt": "a blue square", "steps": 2, "seed": 42}
        images = []
        for srv in (main_server, replica):  # round robin, as a load balancer would
            with srv.client() as c:
                h = c.get("/health")
                assert h.status_code == 200 and h.json()["ready"] is True and h.json()["model"] == "tiny"
                r = c.post("/v1/images/generations", json=body)
                assert r.status_code == 200, r.text
                images.append(np.asarray(decode_png(r.json()["data"][0]["b64_json"]), dtype=float))
        assert np.abs(images[0] - images[1]).max() <= 1  # same seed, same image on either replica
    finally:
        stop(replica)
