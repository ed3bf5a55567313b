"""Typed reads of request fields that name the offending field when a value is missing or wrong."""

from __future__ import annotations

import math
from typing import Any, Collection

from cheers.serve.errors import bad, json_type

MISSING = object()  # default of a required field


class Fields:
    """Typed reads from a JSON object (or form fields, whose values are strings) that name the field on error."""

    def __init__(self, data: Any, prefix: str = "", form: bool = False, what: str = "request body"):
        if not isinstance(data, dict):
            raise bad(f"{prefix or what} must be a JSON object, got {json_type(data)}", prefix or None)
        self.data = data
        self.prefix = prefix
        self.form = form

    def param(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def only(self, allowed: Collection[str]) -> None:
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            names = ", ".join(f"'{u}'" for u in unknown)
            raise bad(f"unknown field{'s' if len(unknown) > 1 else ''} {names}"
                      f"{' in ' + self.prefix if self.prefix else ''}; accepted fields: {', '.join(sorted(allowed))}",
                      self.param(unknown[0]), code="unknown_field")

    def raw(self, name: str, default: Any = MISSING) -> Any:
        """The value as sent (an empty form field counts as absent); `default`, or an error when it is MISSING."""
        v = self.data.get(name)
        if v is None or (self.form and v == ""):
            if default is MISSING:
                raise bad(f"missing required field '{self.param(name)}'", self.param(name), code="missing_field")
            return default
        return v

    def str(self, name: str, default: Any = MISSING, choices: Collection[str] | None = None,
            nonempty: bool = False) -> Any:
        v = self.raw(name, default)
        if v is default:
            return v
        if not isinstance(v, str):
            raise bad(f"'{self.param(name)}' must be a string, got {json_type(v)}", self.param(name))
        if nonempty and not v.strip():
            raise bad(f"'{self.param(name)}' must not be empty", self.param(name))
        if choices is not None and v not in choices:
            raise bad(f"'{self.param(name)}' must be one of {', '.join(choices)}; got {v!r}", self.param(name))
        return v

    def int(self, name: str, default: Any = MISSING, lo: int | None = None, hi: int | None = None) -> Any:
        v = self.raw(name, default)
        if v is default:
            return v
        if self.form and isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:
                raise bad(f"'{self.param(name)}' must be an integer, got {v!r}", self.param(name)) from None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(f"'{self.param(name)}' must be an integer, got {json_type(v)}", self.param(name))
        check_range(self.param(name), v, lo, hi)
        return v

    def float(self, name: str, default: Any = MISSING, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> Any:
        v = self.raw(name, default)
        if v is default:
            return v
        if self.form and isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise bad(f"'{self.param(name)}' must be a number, got {v!r}", self.param(name)) from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(f"'{self.param(name)}' must be a finite number, got {json_type(v)}", self.param(name))
        if lo_open and lo is not None and v <= lo:
            raise bad(f"'{self.param(name)}' must be > {lo}, got {v}", self.param(name))
        check_range(self.param(name), v, None if lo_open else lo, hi)
        return float(v)

    def interval(self, name: str, default: tuple[float, float]) -> tuple[float, float]:
        """[lo, hi] (a form field: "lo,hi") with 0 <= lo <= hi <= 1."""
        v = self.raw(name, default)
        if v is default:
            return v
        if self.form and isinstance(v, str):
            v = v.split(",")
        try:
            lo, hi = (float(x) for x in v if not isinstance(x, bool))
        except (TypeError, ValueError):
            raise bad(f"'{self.param(name)}' must be two numbers [lo, hi], got {v!r}", self.param(name)) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
            raise bad(f"'{self.param(name)}' must satisfy 0 <= lo <= hi <= 1, got [{lo}, {hi}]", self.param(name))
        return lo, hi

    def bool(self, name: str, default: Any = MISSING) -> Any:
        v = self.raw(name, default)
        if v is default:
            return v
        if self.form and isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
            return v.lower() in ("true", "1")
        if not isinstance(v, bool):
            raise bad(f"'{self.param(name)}' must be true or false, got {json_type(v)}", self.param(name))
        return v


def check_range(param: str, v: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and v < lo:
        raise bad(f"'{param}' must be >= {lo}, got {v}", param)
    if hi is not None and v > hi:
        raise bad(f"'{param}' must be <= {hi}, got {v}", param)
