"""The `serve` subcommand: its defaults, option checks, and an import that stays light for `cheers --help`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cheers.serve.cli import add_serve_subcommand, settings_from_args

REPO = Path(__file__).resolve().parents[2]


def _parse(*args: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_subcommand(p.add_subparsers())
    return p.parse_args(["serve", *args])


def test_default_host_is_loopback():
    a = _parse()
    assert a.host == "127.0.0.1" and a.port == 8000 and a.max_batch == 16


def test_options_become_settings(monkeypatch):
    monkeypatch.setenv("CHEERS_API_KEY", "from-env")
    s = settings_from_args(_parse("--max-batch", "4", "--max-wait-ms", "7.5", "--max-body-size", "2MB",
                                  "--no-warmup", "--threads", "2"))
    assert (s.max_batch, s.max_wait_ms, s.max_body_bytes, s.warmup, s.threads) == (4, 7.5, 2 * 2**20, False, 2)
    assert s.api_key == "from-env"
    assert settings_from_args(_parse("--api-key", "given")).api_key == "given"


@pytest.mark.parametrize("args, message", [(("--max-batch", "0"), "--max-batch must be >= 1"),
                                           (("--max-queue", "-1"), "--max-queue must be >= 1"),
                                           (("--max-wait-ms", "-5"), "--max-wait-ms must be >= 0"),
                                           (("--max-running", "0"), "--max-running must be >= 1"),
                                           (("--shutdown-grace", "-1"), "--shutdown-grace must be >= 0")])
def test_out_of_range_options_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        settings_from_args(_parse(*args))


def test_registering_the_subcommand_loads_neither_torch_nor_fastapi():
    code = ("import argparse, sys, cheers.serve; cheers.serve.add_serve_subcommand(argparse.ArgumentParser()"
            ".add_subparsers()); print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'uvicorn') if m in "
            "sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_an_empty_api_key_is_refused(monkeypatch):
    monkeypatch.delenv("CHEERS_API_KEY", raising=False)
    with pytest.raises(ValueError, match="--api-key is empty, which would leave the server without authentication"):
        settings_from_args(_parse("--api-key", ""))
    with pytest.raises(ValueError, match="--api-key is empty"):
        settings_from_args(_parse("--api-key", "  "))
    monkeypatch.setenv("CHEERS_API_KEY", "")
    with pytest.raises(ValueError, match="CHEERS_API_KEY is empty"):
        settings_from_args(_parse())
    assert settings_from_args(_parse("--api-key", "k")).api_key == "k"  # the option wins over the variable
    monkeypatch.delenv("CHEERS_API_KEY")
    s = settings_from_args(_parse("--allowed-host", "box.lan", "--allowed-host", "gpu7:8000"))
    assert s.api_key is None and s.allowed_hosts == ("box.lan", "gpu7:8000")


def test_create_app_refuses_an_empty_key():
    pytest.importorskip("fastapi")
    from cheers.serve.app import create_app
    from cheers.serve.settings import ServeSettings

    with pytest.raises(ValueError, match="API key is empty"):
        create_app(object(), ServeSettings(api_key=""))


def test_quantize_option_reaches_the_served_model(monkeypatch):
    import cheers.serve.cli as serve_cli
    from cheers.quantize import mode_of

    served = {}
    monkeypatch.setattr(serve_cli, "serve", lambda model, settings: served.update(model=model))
    assert serve_cli.cmd_serve(_parse("--model", "cheers-tiny", "--quantize", "int8-weight", "--no-warmup")) == 0
    assert mode_of(served["model"].model) == "int8-weight"
    with pytest.raises(ValueError, match="quantize mode 'int9' is unknown"):
        serve_cli.cmd_serve(_parse("--model", "cheers-tiny", "--quantize", "int9", "--no-warmup"))
