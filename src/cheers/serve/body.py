"""Request bodies off the wire: the size limit, JSON decoding, and the multipart form of image edits."""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from cheers.serve.errors import ApiError, bad


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; 413 as soon as it is known to exceed `limit` bytes."""
    cl = request.headers.get("content-length")
    if cl and cl.isdigit() and int(cl) > limit:
        raise ApiError(413, f"request body is {int(cl)} bytes, over the limit of {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> Any:
    """The body decoded as JSON (any value: the parsers say what they expected)."""
    raw = await read_body(request, limit)
    if not raw.strip():
        raise bad("empty request body: send a JSON object", code="invalid_json")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("request body is not UTF-8 encoded JSON", code="invalid_json") from None
    except json.JSONDecodeError as err:
        raise bad(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}", code="invalid_json") from None
    except RecursionError:
        raise bad("malformed JSON: nested too deeply", code="invalid_json") from None


def is_form(request: Request) -> bool:
    """Whether the body is a form (multipart or url-encoded) rather than JSON."""
    ctype = request.headers.get("content-type", "").lower()
    return ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


async def edit_form(request: Request, limit: int) -> tuple[dict[str, Any], tuple[str, bytes] | None]:
    """An edit's form: its text fields, and the uploaded source image as (filename, bytes) if there is one."""
    raw = await read_body(request, limit)  # read under the size limit first, then let Starlette parse the copy

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=32)
    except Exception as err:  # noqa: BLE001 - malformed multipart data
        raise bad(f"malformed multipart/form-data: {err}", code="invalid_form") from None
    fields: dict[str, Any] = {}
    upload = None
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in ("image", "image[]"):
                raise bad(f"unexpected file field '{name}' (only 'image' is accepted; masks are not supported)",
                          name, code="unknown_field")
            if upload is not None:
                raise bad("one source image per edit request", name)
            upload = (value.filename or "upload", await value.read())
        else:
            if name in fields:
                raise bad(f"field '{name}' given twice", name)
            fields[name] = value
    await form.close()
    for name in ("image", "image[]"):
        if name in fields:
            raise bad(f"'{name}' must be an uploaded file, not a text field", name, code="invalid_image")
    return fields, upload
