"""Byte sizes as the command line accepts them."""

from __future__ import annotations

import argparse

import pytest

from cheers.serve.settings import ServeSettings, parse_size


def test_parse_size():
    assert parse_size("25MB") == 25 * 2**20 and parse_size("512KB") == 512 * 1024 and parse_size("100") == 100
    assert parse_size("1.5k") == 1536
    assert parse_size("1GB") == 2**30 and parse_size(" 2 MiB ") == 2 * 2**20 and parse_size(4096) == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="not a size: 'lots'"):
        parse_size("lots")


def test_public_settings_hide_the_key():
    pub = ServeSettings(api_key="secret", max_batch=4).public()
    assert "api_key" not in pub and pub["api_key_required"] is True and pub["max_batch"] == 4
    assert "secret" not in repr(pub) and ServeSettings().public()["api_key_required"] is False
