"""Records of the official JSON-lines training format (spec §D.3): what a line is, and its validation.

A `Record` is one raw line and where it came from ("file:line"); `parse_record` decodes and validates it into a
`ParsedRecord` (turns with their roles, image paths resolved against the source's data root). Every problem is a
`DataError("file:line: cause")`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataError", "Record", "ParsedRecord", "parse_record", "check_turns"]

_RECORD_KEYS = ("id", "image", "conversations")
_TURN_KEYS = ("from", "value")
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class DataError(ValueError):
    """A data problem, reported as `where: cause` (where = `file:line` for records of a jsonl file)."""

    def __init__(self, where: str, cause: str):
        self.where = where
        self.cause = cause
        super().__init__(f"{where}: {cause}")


@dataclass(frozen=True)
class Record:
    """One raw line of a jsonl file and where it came from."""

    raw: bytes
    where: str  # "path:line"
    data_root: Path
    source: str = ""  # name given by a MixedSource


@dataclass
class ParsedRecord:
    id: str
    turns: list[tuple[str, str]]  # (role in {"system", "user", "assistant"}, raw value)
    images: list[Path]
    where: str


def check_turns(conversations: Any) -> list[tuple[str, str]]:
    """Validate a conversation; returns (role, value) pairs. Raises ValueError(cause)."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of turns")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise ValueError(f"turn {k} is a {type(turn).__name__}, expected an object with 'from' and 'value'")
        if "role" in turn and "from" not in turn:  # also accept the {"role", "content"} message form
            role, value = turn.get("role"), turn.get("content")
            role = {"user": "human", "assistant": "gpt"}.get(role, role)
            extra = set(turn) - {"role", "content"}
        else:
            role, value = turn.get("from"), turn.get("value")
            extra = set(turn) - set(_TURN_KEYS)
        if extra:
            raise ValueError(f"turn {k} has unknown key(s) {sorted(extra)}; expected 'from' and 'value'")
        if role is None or value is None:
            raise ValueError(f"turn {k} lacks 'from' or 'value'")
        if not isinstance(role, str) or role not in _ROLES:
            raise ValueError(f"turn {k} has unknown role {role!r}; expected 'human' or 'gpt'")
        if not isinstance(value, str):
            raise ValueError(f"turn {k} 'value' must be a string, got {type(value).__name__}")
        turns.append((role, value))
    start = 1 if turns[0][0] == "system" else 0
    body = turns[start:]
    for k, (role, _) in enumerate(body):
        want = "human" if k % 2 == 0 else "gpt"
        if role != want:
            if k == 0:
                raise ValueError(f"conversation must start with a human turn, turn {k + start} is '{role}'")
            raise ValueError(f"roles must alternate human/gpt: turn {k + start} is '{role}', expected '{want}'")
    if not body or body[-1][0] != "gpt":
        raise ValueError("conversation must end with a gpt turn (nothing to learn otherwise)")
    return [(_ROLES[r], v) for r, v in turns]


def _image_paths(value: Any, data_root: Path) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")] if value.strip() else []
    elif isinstance(value, list):
        parts = value
    else:
        raise ValueError(f"'image' must be a path, a 'src, tgt' string or a list of paths, got {type(value).__name__}")
    out = []
    for k, p in enumerate(parts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"image path {k} is {p!r}, expected a non-empty string")
        path = Path(p.strip()).expanduser()
        out.append(path if path.is_absolute() else data_root / path)
    return out


def parse_record(record: Record) -> ParsedRecord:
    """Decode and validate one jsonl line. Raises `DataError(file:line, cause)`."""
    where = record.where
    try:
        text = record.raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(where, f"line is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    text = text.lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(where, f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(where, f"record must be a JSON object, got {type(obj).__name__}")
    extra = set(obj) - set(_RECORD_KEYS)
    if extra:
        raise DataError(where, f"unknown key(s) {sorted(extra)}; allowed: {', '.join(_RECORD_KEYS)}")
    if "conversations" not in obj:
        raise DataError(where, "missing 'conversations'")
    rid = obj.get("id", "")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DataError(where, f"'id' must be a string or an integer, got {type(rid).__name__}")
    try:
        turns = check_turns(obj["conversations"])
        images = _image_paths(obj.get("image"), record.data_root)
    except ValueError as err:
        raise DataError(where, str(err)) from None
    return ParsedRecord(id=str(rid), turns=turns, images=images, where=where)
