"""Request bodies off the wire: the content type, the size limit, JSON decoding (off the event loop), text that
cannot be encoded, and the multipart form of image edits."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from cheers.serve.errors import ApiError, bad

# a \uD800-\uDFFF escape: the only way a JSON text that is valid UTF-8 can carry an unpaired surrogate
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


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


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def require_json(request: Request, form_too: bool = False) -> None:
    """415 unless the body is declared JSON (or a form where the endpoint documents one): a web page can send
    text/plain or form bodies to any site without asking, but not application/json."""
    ctype = media_type(request)
    if ctype == "application/json" or (form_too and is_form(request)):
        return
    accepted = "application/json or multipart/form-data" if form_too else "application/json"
    raise ApiError(415, f"Content-Type must be {accepted}, got {ctype or 'none'!r}", code="unsupported_media_type")


async def json_body(request: Request, limit: int) -> Any:
    """The body decoded as JSON (any value: the parsers say what they expected). Decoding runs in a worker
    thread: a body near the size limit takes long enough to stall every other request on the event loop."""
    require_json(request)
    raw = await read_body(request, limit)
    return await asyncio.to_thread(decode_json, raw)


def decode_json(raw: bytes) -> Any:
    """JSON bytes -> value; a 400 naming the problem for anything that is not JSON the server can use."""
    if not raw.strip():
        raise bad("empty request body: send a JSON object", code="invalid_json")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("request body is not UTF-8 encoded JSON", code="invalid_json") from None
    except json.JSONDecodeError as err:
        raise bad(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}", code="invalid_json") from None
    except RecursionError:
        raise bad("malformed JSON: nested too deeply", code="invalid_json") from None
    except ValueError as err:  # e.g. an integer literal of thousands of digits
        raise bad(f"malformed JSON: {str(err).split(';')[0]}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        check_encodable(value, "")
    return value


def check_encodable(value: Any, path: str) -> None:
    """400 naming the first string (or key) with an unpaired UTF-16 surrogate: no tokenizer or response can
    encode one."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise bad(f"'{path or 'request body'}' contains an unpaired UTF-16 surrogate "
                      f"(\\u{ord(value[err.start]):04x}); send valid Unicode text", path or None,
                      code="invalid_unicode") from None
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_encodable(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            try:
                k.encode("utf-8")
            except UnicodeEncodeError:
                raise bad(f"a field name in '{path or 'request body'}' contains an unpaired UTF-16 surrogate; send "
                          "valid Unicode text", path or None, code="invalid_unicode") from None
            check_encodable(v, f"{path}.{k}" if path else k)


def is_form(request: Request) -> bool:
    """Whether the body is a form (multipart or url-encoded) rather than JSON."""
    return media_type(request) in ("multipart/form-data", "application/x-www-form-urlencoded")


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
        check_encodable(name, "")
        if isinstance(value, UploadFile):
            if name not in ("image", "image[]"):
                raise bad(f"unexpected file field '{name}' (only 'image' is accepted; masks are not supported)",
                          name, code="unknown_field")
            if upload is not None:
                raise bad("one source image per edit request", name)
            upload = (value.filename or "upload", await value.read())
        else:
            check_encodable(value, name)
            if name in fields:
                raise bad(f"field '{name}' given twice", name)
            fields[name] = value
    await form.close()
    for name in ("image", "image[]"):
        if name in fields:
            raise bad(f"'{name}' must be an uploaded file, not a text field", name, code="invalid_image")
    return fields, upload
