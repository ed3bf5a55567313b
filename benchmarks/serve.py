"""Throughput and latency of `cheers serve`: image generation and chat at concurrency 1, 4 and 16, with batching
on (--max-batch 16) and off (--max-batch 1).

    .venv/bin/python benchmarks/serve.py                      # the embedded model, else a random tiny model
    .venv/bin/python benchmarks/serve.py --model DIR --requests 32 --steps 8

Two real server processes (batching on and off) run on free loopback ports; for each point `--requests` requests
are sent with `c` in flight at a time (closed loop), `--repeat` times, alternating the servers. Reports requests/s
and p50/p95 latency: a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "src" / "cheers" / "assets" / "cheers-shapes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cheers.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "256",
           "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def load(url: str, path: str, bodies: list[dict], concurrency: int) -> dict:
    latencies: list[float] = []
    sizes: list[int] = []
    it = iter(bodies)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker():
            for body in it:
                t0 = time.perf_counter()
                r = await client.post(path, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
                sizes.append(int(r.headers.get("X-Cheers-Batch-Size", "1")))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "wall": wall, "mean_batch": sum(sizes) / len(sizes)}


def bodies(task: str, n: int, args: argparse.Namespace) -> tuple[str, list[dict]]:
    if task == "image":
        return "/v1/images/generations", [{"prompt": f"a red circle and {i % 5} blue squares", "seed": i,
                                           "steps": args.steps, "cfg": args.cfg} for i in range(n)]
    return "/v1/chat/completions", [{"messages": [{"role": "user", "content": f"Describe shape number {i}."}],
                                     "max_tokens": args.max_tokens} for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: embedded model, else a tiny one)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per (task, concurrency) point and run")
    p.add_argument("--repeat", type=int, default=2, help="runs per point, alternating the two servers")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    p.add_argument("--cfg", type=float, default=9.5, help="guidance scale")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per chat reply")
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="batching window of the batched server")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    p.add_argument("--tasks", default="image,chat", help="comma-separated: image, chat")
    args = p.parse_args(argv)

    tmp = None
    if args.model:
        model = Path(args.model)
    elif (EMBEDDED / "config.json").exists():
        model = EMBEDDED
    else:
        from cheers.testing import make_tiny_model_dir

        tmp = tempfile.TemporaryDirectory()
        model = make_tiny_model_dir(Path(tmp.name) / "tiny")
    levels = [int(c) for c in args.concurrency.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    # both servers run side by side (an idle one costs nothing) and the two modes alternate point by point, so
    # that a change in the machine's load between points hits both alike
    modes = (("batched", 16), ("max_batch=1", 1))
    servers = {}
    results = []
    try:
        for mode, max_batch in modes:
            servers[mode] = start_server(model, max_batch, args)
        for task in tasks:
            for mode, _ in modes:
                path, warm = bodies(task, 2, args)
                asyncio.run(load(servers[mode][1], path, warm, 1))  # warm-up
            for c in levels:
                runs: dict[str, list[dict]] = {m: [] for m, _ in modes}
                for rep in range(args.repeat):
                    order = modes if rep % 2 == 0 else modes[::-1]
                    for mode, _ in order:
                        path, bs = bodies(task, max(args.requests, c), args)
                        runs[mode].append(asyncio.run(load(servers[mode][1], path, bs, c)))
                for mode, _ in modes:
                    rs = runs[mode]
                    lat = [x for r in rs for x in r["latencies"]]
                    r = {"mode": mode, "task": task, "concurrency": c, "requests": len(lat),
                         "rps": len(lat) / sum(r["wall"] for r in rs), "p50_ms": 1000 * percentile(lat, 0.5),
                         "p95_ms": 1000 * percentile(lat, 0.95),
                         "mean_batch": sum(r["mean_batch"] for r in rs) / len(rs)}
                    results.append(r)
                    print(f"  {mode:<12} {task:<6} c={c:<3} {r['rps']:7.2f} req/s  p50 {r['p50_ms']:8.0f} ms  "
                          f"p95 {r['p95_ms']:8.0f} ms  mean batch {r['mean_batch']:.1f}", file=sys.stderr,
                          flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\nmodel: {model}  steps={args.steps} cfg={args.cfg} max_tokens={args.max_tokens} "
          f"requests/point={args.requests} x {args.repeat} runs  threads={args.threads or 'default'}")
    head = f"{'task':<6} {'conc':>4} | {'batched req/s':>13} {'p50 ms':>8} {'p95 ms':>8} {'batch':>5} | " \
           f"{'max_batch=1 req/s':>17} {'p50 ms':>8} {'p95 ms':>8} | {'speed-up':>8}"
    print(head)
    print("-" * len(head))
    for task in tasks:
        for c in levels:
            b = next(r for r in results if r["mode"] == "batched" and r["task"] == task and r["concurrency"] == c)
            u = next(r for r in results if r["mode"] == "max_batch=1" and r["task"] == task and r["concurrency"] == c)
            print(f"{task:<6} {c:>4} | {b['rps']:>13.2f} {b['p50_ms']:>8.0f} {b['p95_ms']:>8.0f} "
                  f"{b['mean_batch']:>5.1f} | {u['rps']:>17.2f} {u['p50_ms']:>8.0f} {u['p95_ms']:>8.0f} | "
                  f"{b['rps'] / u['rps']:>7.2f}x")
    summary = {"benchmark": "serve", "model": str(model), "steps": args.steps, "cfg": args.cfg,
               "max_tokens": args.max_tokens, "requests": args.requests, "repeat": args.repeat, "threads": args.threads,
               "results": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in results]}
    print(json.dumps(summary))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
