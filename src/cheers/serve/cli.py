"""`cheers serve`: the subcommand's options, and running the server in the foreground.

Only the standard library and torch-free parts of the package are imported here, so `cheers --help` stays fast and
the subcommand exists even without the `serve` extra (it then says what to install).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cheers.options import add_model_options, load_pipeline
from cheers.serve.context import default_model_name
from cheers.serve.deps import require, require_all
from cheers.serve.runner import warm_up
from cheers.serve.settings import ServeSettings, parse_size


def serve(model: Any, settings: ServeSettings) -> None:
    """Run the server in the foreground until interrupted. On SIGTERM / Ctrl-C it stops listening, lets queued
    and running requests finish for `settings.shutdown_grace_s` seconds, answers the rest 503 and exits."""
    uvicorn = require("uvicorn")
    from cheers.serve.app import create_app

    app = create_app(model, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False,  # the app writes its own, structured, with request ids
                            timeout_graceful_shutdown=settings.shutdown_grace_s + 5)
    draining_server(uvicorn, config, app.state.scheduler, settings.shutdown_grace_s).run()


def draining_server(uvicorn: Any, config: Any, scheduler: Any, grace_s: float) -> Any:
    """A uvicorn server whose shutdown drains the scheduler: without it, requests still running when uvicorn's
    own timeout ends are cancelled and answered with a plain-text 500."""

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            import asyncio

            drain = asyncio.ensure_future(scheduler.shutdown(grace_s))
            try:
                await super().shutdown(sockets)
            finally:
                drain.cancel()

    return DrainingServer(config)


def add_serve_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on the `cheers` command's subparsers."""
    d = ServeSettings()
    p = subparsers.add_parser(
        "serve", help="OpenAI-style HTTP API with batching and a web demo page",
        description="Serve the model over HTTP: /v1/chat/completions, /v1/images/generations, /v1/images/edits, "
                    "/v1/models, /v1/stats, /health, and a demo page at /.")
    add_model_options(p, compile=False)
    p.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host}, this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default: {d.port})")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY) on every endpoint but /health; "
                        "default: $CHEERS_API_KEY, else no key")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="without an API key, requests must name the server by IP address or localhost (a guard "
                        "against DNS rebinding); this accepts another host name too (repeatable)")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: directory name)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images or conversations per model call (default: {d.max_batch}; 1 = no batching)")
    p.add_argument("--max-running", type=int, default=d.max_running,
                   help=f"chat replies decoding together: streamed or not, they join and leave one running batch "
                        f"between tokens (default: {d.max_running}; 1 = one at a time)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a request waits for others to batch with (default: {d.max_wait_ms:g})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"queued + running images/conversations before answering 503 (default: {d.max_queue})")
    p.add_argument("--max-queue-memory", type=parse_size, default=d.max_queue_bytes,
                   help="memory that queued + running requests may hold (their images) before answering 503, "
                        "e.g. 1GB (default: 1GB)")
    p.add_argument("--max-body-size", type=parse_size, default=d.max_body_bytes,
                   help="largest request body, e.g. 25MB (default: 25MB)")
    p.add_argument("--max-image-size", type=parse_size, default=d.max_image_bytes,
                   help="largest image file, e.g. 16MB (default: 16MB)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help=f"largest image width x height (default: {d.max_image_pixels})")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"images in one chat request (default: {d.max_images})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"upper limit of a request's max_tokens (default: {d.max_tokens})")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens, images included (default: the model's context)")
    p.add_argument("--max-n", type=int, default=d.max_n, help=f"images/choices per request (default: {d.max_n})")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help=f"upper limit of denoising steps (default: {d.max_steps})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the model (default: one per core; lower it when sharing the machine)")
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s,
                   help="on SIGTERM, seconds that queued and running requests get to finish before they are "
                        f"answered 503 (default: {d.shutdown_grace_s:g})")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not write the JSON access-log line of each request to stderr")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up calls before accepting requests")
    p.add_argument("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"],
                   help=f"uvicorn log level (default: {d.log_level})")
    p.set_defaults(func=cmd_serve)
    return p


def settings_from_args(a: argparse.Namespace) -> ServeSettings:
    """The parsed options as settings; an out-of-range limit is a ValueError naming the option."""
    for name in ("max_batch", "max_running", "max_queue", "max_n", "max_steps", "max_tokens", "max_images", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if a.max_wait_ms < 0:
        raise ValueError("--max-wait-ms must be >= 0")
    if a.shutdown_grace < 0:
        raise ValueError("--shutdown-grace must be >= 0")
    key = a.api_key if a.api_key is not None else os.environ.get("CHEERS_API_KEY")
    if key is not None and not key.strip():
        source = "--api-key" if a.api_key is not None else "CHEERS_API_KEY"
        raise ValueError(f"{source} is empty, which would leave the server without authentication; give a key, "
                         "or leave it out to serve without one")
    return ServeSettings(
        host=a.host, port=a.port, api_key=key, allowed_hosts=tuple(a.allowed_host),
        model_name=a.model_name, max_batch=a.max_batch, max_running=a.max_running, max_wait_ms=a.max_wait_ms,
        max_queue=a.max_queue, max_queue_bytes=a.max_queue_memory,
        max_body_bytes=a.max_body_size, max_image_bytes=a.max_image_size, max_image_pixels=a.max_image_pixels,
        max_images=a.max_images, max_tokens=a.max_tokens, max_prompt_tokens=a.max_prompt_tokens, max_n=a.max_n,
        max_steps=a.max_steps, threads=a.threads, warmup=not a.no_warmup, log_level=a.log_level,
        shutdown_grace_s=a.shutdown_grace, access_log=not a.no_access_log,
    )


def cmd_serve(a: argparse.Namespace) -> int:
    """Load the model, warm it up and serve it until interrupted."""
    settings = settings_from_args(a)
    require_all()
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = load_pipeline(a)
    if settings.warmup:
        warm_up(model)
    name = settings.model_name or default_model_name(model)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"cheers serve: warning: listening on {settings.host} without an API key; anyone who can reach "
              "this address can use the model (set --api-key or CHEERS_API_KEY)", file=sys.stderr)
    print(f"cheers serve: {name} ({model.config.resolution} px) on http://{settings.host}:{settings.port}  "
          f"[batch <= {settings.max_batch}, wait {settings.max_wait_ms:g} ms, queue {settings.max_queue}"
          f"{', API key required' if settings.api_key else ''}]", file=sys.stderr, flush=True)
    serve(model, settings)
    return 0
