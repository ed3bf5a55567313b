"""An application factory for running the server under an ASGI process manager instead of `cheers serve`:

    CHEERS_MODEL=DIR CHEERS_DEVICE=cuda:0 uvicorn --factory cheers.serve.asgi:app_from_env --port 8001

Every `cheers serve` option has an environment variable: CHEERS_MODEL, CHEERS_DEVICE, CHEERS_DTYPE and, for
the limits, CHEERS_ plus the option name in capitals (CHEERS_MAX_BATCH=8, CHEERS_API_KEY=..., ...). One process
serves one model on one device; run one per device (see docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any

from cheers.serve.cli import add_serve_subcommand, settings_from_args


def args_from_env(env: dict[str, str] | None = None) -> argparse.Namespace:
    """`cheers serve` options from CHEERS_* variables (CHEERS_MAX_BATCH=8 is --max-batch 8; a flag such as
    CHEERS_NO_WARMUP=1 is set when non-empty and not 0)."""
    env = dict(os.environ if env is None else env)
    parser = argparse.ArgumentParser(prog="cheers")
    sub = add_serve_subcommand(parser.add_subparsers())
    argv = ["serve"]
    for action in sub._actions:  # noqa: SLF001 - the options as the subcommand declares them
        opt = next((o for o in action.option_strings if o.startswith("--")), None)
        if opt is None:
            continue
        var = "CHEERS_" + opt[2:].replace("-", "_").upper()
        if var not in env:
            continue
        if action.nargs == 0:  # a flag
            if env[var].strip() not in ("", "0", "false", "False"):
                argv.append(opt)
        else:
            for value in shlex.split(env[var]) if action.default == [] else [env[var]]:
                argv += [opt, value]
    return parser.parse_args(argv)


def app_from_env() -> Any:
    """The FastAPI application for the model and settings the environment names (loads and warms the model)."""
    import torch

    from cheers.options import load_pipeline
    from cheers.serve.app import create_app
    from cheers.serve.runner import warm_up

    a = args_from_env()
    settings = settings_from_args(a)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = load_pipeline(a)
    if settings.warmup:
        warm_up(model)
    return create_app(model, settings)
