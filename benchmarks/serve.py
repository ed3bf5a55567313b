"""Throughput and latency of `cheers serve`, in three parts (`--parts`, default all):

batching  image generation and chat at concurrency 1, 4 and 16, with batching on (--max-batch 16) and off
          (--max-batch 1): requests/s and p50/p95 latency
streams   `--streams` (64) concurrent streaming chats with continuous batching (--max-running 64) against the same
          streams decoded one at a time (--max-running 1): tokens/s, p50/p95 latency and time to first token
abuse     the abuse mix on one server: a prompt near the 25 MB body limit, two chats with eight 4096 x 4096 images
          each, and four image requests whose clients hang up, while /health is polled: the slowest /health, how
          each abusive request ended, the server's peak memory growth

    .venv/bin/python benchmarks/serve.py                      # the embedded model, else a random tiny model
    .venv/bin/python benchmarks/serve.py --model DIR --requests 32 --steps 8 --parts streams,abuse

Real server processes run on free loopback ports. Prints tables, then one JSON line with every figure (last).
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


def start_server(model: Path, max_batch: int, args: argparse.Namespace, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cheers.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "256",
           "--log-level", "warning", "--no-access-log", *extra]
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
    p.add_argument("--parts", default="batching,streams,abuse", help="comma-separated: batching, streams, abuse")
    p.add_argument("--streams", type=int, default=64, help="concurrent streaming chats (streams part)")
    p.add_argument("--stream-tokens", type=int, default=32, help="max_tokens of each streamed chat")
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
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    summary: dict = {"benchmark": "serve", "model": str(model), "threads": args.threads}
    if "batching" in parts:
        summary["batching"] = batching(model, args)
    if "streams" in parts:
        summary["streams"] = streams(model, args)
    if "abuse" in parts:
        summary["abuse"] = abuse(model, args)
    print(json.dumps(summary))
    if tmp:
        tmp.cleanup()
    return 0


def batching(model: Path, args: argparse.Namespace) -> dict:
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
    return {"steps": args.steps, "cfg": args.cfg, "max_tokens": args.max_tokens, "requests": args.requests,
            "repeat": args.repeat,
            "results": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in results]}


async def one_stream(client: httpx.AsyncClient, q: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"stream: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            elif data["choices"] and data["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": first if first is not None else 0.0, "tokens": tokens}


async def stream_burst(url: str, n: int, max_tokens: int) -> dict:
    # prompts the embedded model answers at some length (8 to 14 tokens)
    asks = ("Describe the image.", "What do you see?", "Describe picture number 5.", "Draw the digit 7.")
    questions = [asks[i % len(asks)] for i in range(n)]
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(c, q, max_tokens) for q in questions))
        wall = time.perf_counter() - t0
        stats = (await c.get("/v1/stats")).json()
    lat, ttft = [r["latency"] for r in res], [r["ttft"] for r in res]
    tokens = sum(r["tokens"] for r in res)
    return {"streams": n, "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "p50_ms": round(1000 * percentile(lat, 0.5), 1), "p95_ms": round(1000 * percentile(lat, 0.95), 1),
            "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1), "ttft_p95_ms": round(1000 * percentile(ttft, 0.95), 1),
            "largest_running": (stats.get("decode") or {}).get("largest_running")}


def streams(model: Path, args: argparse.Namespace) -> dict:
    """`--streams` concurrent streaming chats: continuous batching vs the same streams one at a time."""
    out = {}
    for mode, running in (("continuous", str(max(args.streams, 1))), ("one_by_one", "1")):
        proc, url = start_server(model, 16, args, "--max-running", running, "--max-queue", str(4 * args.streams))
        try:
            asyncio.run(stream_burst(url, 2, 4))  # warm-up
            out[mode] = asyncio.run(stream_burst(url, args.streams, args.stream_tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        r = out[mode]
        print(f"  streams {mode:<11} {r['streams']} x <= {args.stream_tokens} tokens: {r['tokens_per_s']:8.1f} tok/s  "
              f"p50 {r['p50_ms']:8.0f} ms  p95 {r['p95_ms']:8.0f} ms  ttft p95 {r['ttft_p95_ms']:8.0f} ms  "
              f"largest batch {r['largest_running']}", file=sys.stderr, flush=True)
    out["speedup_tokens_per_s"] = round(out["continuous"]["tokens_per_s"] / out["one_by_one"]["tokens_per_s"], 2)
    out["p95_ratio"] = round(out["continuous"]["p95_ms"] / out["one_by_one"]["p95_ms"], 3)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def abuse(model: Path, args: argparse.Namespace) -> dict:
    """The abuse mix against one server while /health is polled every 50 ms."""
    import base64
    import io
    import socket
    import threading
    from urllib.parse import urlparse

    from PIL import Image

    proc, url = start_server(model, 16, args)
    out: dict = {}
    try:
        buf = io.BytesIO()
        Image.new("RGB", (4096, 4096), (30, 140, 200)).save(buf, format="PNG")
        img = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        big_prompt = {"messages": [{"role": "user", "content": "word " * (24 * 2**20 // 5)}], "max_tokens": 4}
        images = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}] * 8
                                + [{"type": "text", "text": "What colour?"}]}], "max_tokens": 4}
        rss0 = rss_mb(proc.pid)
        results: dict = {}

        def post(name: str, body: dict) -> None:
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            results[name] = {"status": r.status_code, "s": round(time.perf_counter() - t0, 3),
                             "code": r.json().get("error", {}).get("code") if r.status_code != 200 else None}

        def hang_up(i: int) -> None:
            u = urlparse(url)
            data = json.dumps({"prompt": f"dropped {i}", "steps": 250, "seed": i}).encode()
            s = socket.create_connection((u.hostname, u.port))
            s.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            time.sleep(0.5)
            s.close()

        threads = [threading.Thread(target=post, args=("prompt_24MB", big_prompt))]
        threads += [threading.Thread(target=post, args=(f"images_8x4096px_{i}", images)) for i in range(2)]
        threads += [threading.Thread(target=hang_up, args=(i,)) for i in range(4)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        health, peak = [], rss0
        with httpx.Client(base_url=url, timeout=60) as c:
            while any(t.is_alive() for t in threads) or c.get("/v1/stats").json()["queued"]:
                h0 = time.perf_counter()
                c.get("/health")
                health.append(time.perf_counter() - h0)
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(0.05)
            stats = c.get("/v1/stats").json()
        out = {"wall_s": round(time.perf_counter() - t0, 3), "health_max_ms": round(1000 * max(health), 1),
               "health_p95_ms": round(1000 * percentile(health, 0.95), 1), "health_polls": len(health),
               "rss_start_mb": round(rss0), "rss_peak_growth_mb": round(peak - rss0),
               "rss_after_growth_mb": round(rss_mb(proc.pid) - rss0), "cancelled": stats["cancelled_requests"],
               "requests": results}
        print(f"  abuse: /health max {out['health_max_ms']:.0f} ms over {len(health)} polls, RSS +{out['rss_peak_growth_mb']}"
              f" MB peak, +{out['rss_after_growth_mb']} MB after, {out['cancelled']} abandoned requests cancelled, "
              f"{results}", file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


if __name__ == "__main__":
    sys.exit(main())
