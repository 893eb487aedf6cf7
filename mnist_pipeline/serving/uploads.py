"""Reading a POST's uploads, bounded, for `/predict` and `/feedback` alike.

The body is counted while it streams and refused with 413 past the limit, so a large upload is
never held in memory; a malformed body is a 400; each refusal is JSON `{"error": …}`. An
upload becomes (its answer so far, its media type, its bytes), and `prepared` turns it into the
28×28 input or writes the refusal into that answer.

A refused request's body may still be on its way. A client that sends everything before it
reads (urllib does, with `Connection: close`) then meets a closed socket and sees a broken pipe
instead of the 413. So `settle` reads and drops the rest of the body before the answer goes
out, bounded in bytes and seconds (RFC 9112 §9.6's "lingering close"); past the bound the
answer says `Connection: close`, and the server stops reading.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive

from mnist_pipeline.images import FORMAT_NAMES, ImageError, TooLarge, UnsupportedFormat, prepare

IMAGE_TYPES = {"image/png", "image/jpeg", "image/bmp", "image/x-ms-bmp", "image/gif", "image/tiff", "image/webp"}
NO_FILE = "no `file` field: send the image as multipart form field `file`"
# What the unread rest of a refused body may still cost, read and dropped before the answer.
DRAIN_BYTES = 8 << 20
DRAIN_SECONDS = 5.0
# One upload as parsed: its answer so far ({"file": name} or an error), its media type, its bytes.
Upload = tuple[dict[str, Any], str, bytes]


class BodyTooLarge(Exception):
    pass


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def status_of(exc: ImageError) -> int:
    return 413 if isinstance(exc, TooLarge) else 415 if isinstance(exc, UnsupportedFormat) else 400


class Body:
    """A request's `receive`, noting when the body has been read to its end (or the client left)."""

    def __init__(self, receive: Receive) -> None:
        self.receive, self.ended = receive, False

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.ended = True
        return message


async def settle(body: Body, request: Request, response: Response) -> Response:
    """`response`, sent once the unread rest of the body is read and dropped, within DRAIN_BYTES and
    DRAIN_SECONDS; past them (or when the client waits for `100 Continue`), on a connection that closes."""
    if not body.ended and request.headers.get("expect", "").lower() != "100-continue":

        async def drop() -> None:
            seen = 0
            while not body.ended and seen <= DRAIN_BYTES:
                seen += len((await body()).get("body", b""))

        try:
            await asyncio.wait_for(drop(), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            pass
    if not body.ended:
        response.headers["Connection"] = "close"
    return response


def counting(receive: Receive, limit: int) -> Receive:
    """`receive`, raising BodyTooLarge once the body passes `limit` bytes."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise BodyTooLarge
        return message

    return wrapped


async def bounded_form(request: Request, max_upload: int, max_files: int, max_fields: int) -> FormData | Response:
    """The multipart form, its body counted as it streams; or the refusal (413, 400). Close it after use."""
    limited = Request(request.scope, counting(request.receive, max_upload))
    try:
        return await limited.form(max_files=max_files, max_fields=max_fields)
    except BodyTooLarge:
        return error(413, f"request body is over the {max_upload:,} byte limit")
    except MultiPartException as exc:
        return error(400, f"malformed multipart body: {exc.message}")


async def as_upload(value: UploadFile | str) -> Upload:
    """One `file` field as an upload; a plain text field is its own 422."""
    if not isinstance(value, UploadFile):
        return {"file": None, "status": 422, "error": "the `file` field must be a file upload"}, "", b""
    kind = (value.content_type or "").split(";")[0].strip().lower()
    return {"file": value.filename or "upload"}, kind, await value.read()


def prepared(entry: dict[str, Any], kind: str, data: bytes, max_pixels: int) -> np.ndarray | None:
    """The 28×28 input of one upload, or None with the refusal written into `entry`."""
    if kind and kind not in IMAGE_TYPES and kind != "application/octet-stream":
        entry.update(status=415, error=f"unsupported media type {kind!r}: send {FORMAT_NAMES}")
        return None
    try:
        return prepare(data, max_pixels)
    except ImageError as exc:  # the documented refusals
        entry.update(status=status_of(exc), error=str(exc))
    except Exception:  # a bug in preparation: this file's 500, the others are still answered
        entry.update(status=500, error="internal error while preparing this image")
    return None
