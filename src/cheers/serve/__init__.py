"""`cheers serve`: an OpenAI-style HTTP API (FastAPI + uvicorn) with request batching and a web demo page.

Endpoints
    POST /v1/chat/completions   messages with text and image parts (data URLs); `stream: true` gives server-sent
                                events in OpenAI's chunk format ending with `data: [DONE]`; usage counts; OpenAI's
                                sampling fields (n, seed, stop, temperature, top_p, presence/frequency_penalty,
                                logit_bias, logprobs/top_logprobs, ...) plus top_k and repetition_penalty; tools,
                                JSON mode and audio are refused (400 unsupported_parameter)
    POST /v1/images/generations prompt, n, size "RxR", seed, steps, cfg | cfg_scale, shift, sampler, cfg_interval
                                -> PNG b64_json
    POST /v1/images/edits       multipart (image file + prompt, like OpenAI) or JSON with a data-URL image; the
                                generation fields and edit_start (t0 in [0, 0.99], larger keeps more of the source)
    GET  /v1/models, /v1/models/{id}, /v1/stats (batching statistics), /metrics (Prometheus), /health
         (liveness and readiness), / (the demo page)

Modules
    settings   server limits and batching parameters
    errors     the JSON error model `{"error": {"message", "type", "param", "code"}}`
    fields     typed field reads that name the offending field
    context    what parsing knows about the model: context length, reserved tokens, image decoding
    schema     request parsing and validation, batch keys
    scheduler  the batching queue and the single model thread
    engine     continuous batching of text: replies join and leave one running batch between tokens
    runner     one model call per image batch, failing requests isolated
    body       request bodies: size limit, JSON, the edit form
    auth       the optional API key; without one, local hosts and same-origin requests only
    app        the FastAPI application and its routes
    cli        the `serve` subcommand

Importing the package loads neither torch nor FastAPI, so `cheers --help` stays fast and the subcommand exists
even without the `serve` extra; `create_app` loads FastAPI on first use (or says what to install).
"""

from __future__ import annotations

from typing import Any

from cheers.samplers import SAMPLERS
from cheers.serve.cli import add_serve_subcommand, cmd_serve, serve
from cheers.serve.errors import ApiError
from cheers.serve.settings import ServeSettings

__all__ = ["ApiError", "SAMPLERS", "ServeSettings", "add_serve_subcommand", "cmd_serve", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    """`create_app` on first use, so that importing the package does not load FastAPI."""
    if name == "create_app":
        from cheers.serve.deps import require_all

        require_all()  # an install hint rather than a bare ImportError of fastapi
        from cheers.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
