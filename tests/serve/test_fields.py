"""Typed field reads name the offending field."""

from __future__ import annotations

import pytest

from cheers.serve.errors import ApiError
from cheers.serve.fields import Fields


def test_fields_name_the_offending_field():
    f = Fields({"n": "2", "steps": 0, "extra": 1, "cfg": float("nan")})
    with pytest.raises(ApiError) as e:
        f.only({"n", "steps", "cfg"})
    assert e.value.param == "extra" and "unknown field 'extra'" in e.value.message
    with pytest.raises(ApiError) as e:
        f.int("n")
    assert e.value.param == "n" and "integer" in e.value.message
    with pytest.raises(ApiError) as e:
        f.int("steps", 1, 1, 10)
    assert e.value.param == "steps" and ">= 1" in e.value.message
    with pytest.raises(ApiError) as e:
        f.float("cfg")
    assert e.value.param == "cfg"
    with pytest.raises(ApiError) as e:
        Fields([1, 2])
    assert "must be a JSON object" in e.value.message
    assert Fields({"n": "3"}, form=True).int("n") == 3
