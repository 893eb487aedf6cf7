"""The HTTP API and the draw-a-digit page, as an ASGI app (Starlette); `mnist-serve` runs it.

    GET  /          the page (served from the package, works offline)
    GET  /healthz   {"status": "ok", ...}
    GET  /model     the model card: model_card.json beside the model, or one folder up (the pipeline
                    keeps it in git as models/model_card.json, beside the DVC-tracked models/export/)
    POST /predict   multipart form, one or more `file` fields → {"digit", "label", "probabilities", "input", …}
                    for one file, a list (one entry per file, bad ones with their own "error") for several

Starlette gives routing and streaming multipart parsing without FastAPI's request-model layer
(this API has one form field). Images are prepared by `images.prepare`, exactly as
`mnist-predict` does, and run through onnxruntime (`exported.load_model`); torch is never
imported. The body is counted while it streams and refused with 413 past the limit (or at
once, from Content-Length), so a large upload is never held in memory. Every error is
JSON `{"error": …}` with its status; no traceback reaches a client.

The event loop only parses requests and writes answers. Decoding, preparation, inference
and the answer's JSON run in a pool of `threads` threads (default: the cores this process
may use; Pillow, numpy and onnxruntime release the GIL for their work), so `/healthz` and
small requests are answered while large ones are prepared. Each image is bounded before it
is decoded: `settings.WEB_MAX_PIXELS` decoded pixels (a JPEG is decoded at reduced scale, so a phone
photo fits), far below the CLI's limit, because an anonymous client is not the user. At most
`max_queue` requests are admitted at once per worker; more get 503 with `Retry-After`, so
the backlog (and the bodies it holds) stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive

from mnist_pipeline.exported import Model, load_model
from mnist_pipeline.images import FORMAT_NAMES, ImageError, TooLarge, UnsupportedFormat, prepare
from mnist_pipeline.serving.settings import WEB_MAX_PIXELS, Settings, from_env

__all__ = ["WEB_MAX_PIXELS", "app_from_env", "compact_json", "create_app", "png_data_url"]

MAX_FILES = 16
PAGE = Path(__file__).parent / "static" / "index.html"
IMAGE_TYPES = {"image/png", "image/jpeg", "image/bmp", "image/x-ms-bmp", "image/gif", "image/tiff", "image/webp"}
# One upload as parsed: its answer so far ({"file": name} or an error), its media type, its bytes.
Upload = tuple[dict[str, Any], str, bytes]


class BodyTooLarge(Exception):
    pass


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def status_of(exc: ImageError) -> int:
    return 413 if isinstance(exc, TooLarge) else 415 if isinstance(exc, UnsupportedFormat) else 400


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


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def cores() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def png_data_url(digit: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray((digit * 255).round().astype(np.uint8), "L").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def model_card(model_path: Path, classes: list[str]) -> dict[str, Any]:
    for card in (model_path.parent / "model_card.json", model_path.parent.parent / "model_card.json"):
        try:
            return json.loads(card.read_text())
        except (OSError, ValueError):
            continue
    return {
        "model": None,
        "classes": classes,
        "note": f"no readable model_card.json beside {model_path.name} or one folder up",
    }


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


def answer(model: Model, files: list[Upload], max_pixels: int) -> tuple[int, bytes]:
    """(status, JSON body) for the uploads: runs in the pool, off the event loop."""
    entries, digits = [], {}
    for i, (entry, kind, data) in enumerate(files):
        entries.append(entry)
        digit = prepared(entry, kind, data, max_pixels) if "error" not in entry else None
        if digit is not None:
            digits[i] = digit
    if digits:
        for i, probs in zip(digits, model.probabilities(np.stack(list(digits.values()))), strict=True):
            best = int(np.argmax(probs))
            entries[i].update(
                digit=best,
                label=model.classes[best],
                probabilities=[round(float(p), 6) for p in probs],
                input=png_data_url(digits[i]),
            )
    if len(entries) == 1:
        entry = entries[0]
        if "error" in entry:
            return entry["status"], compact_json({"error": entry["error"]})
        return 200, compact_json(entry)
    return 200, compact_json(entries)


async def read_uploads(request: Request, max_upload: int) -> list[Upload] | Response:
    """The form's `file` fields, read with the body counted as it streams; or the refusal."""
    limited = Request(request.scope, counting(request.receive, max_upload))
    try:
        form = await limited.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except BodyTooLarge:
        return error(413, f"request body is over the {max_upload:,} byte limit")
    except MultiPartException as exc:
        return error(400, f"malformed multipart body: {exc.message}")
    try:
        uploads = form.getlist("file")
        if not uploads:
            return error(422, "no `file` field: send the image as multipart form field `file`")
        files: list[Upload] = []
        for upload in uploads:
            if not isinstance(upload, UploadFile):
                files.append(
                    ({"file": None, "status": 422, "error": "the `file` field must be a file upload"}, "", b"")
                )
                continue
            kind = (upload.content_type or "").split(";")[0].strip().lower()
            files.append(({"file": upload.filename or "upload"}, kind, await upload.read()))
        return files
    finally:
        await form.close()


class Service:
    """The routes of one worker: its model, its card, its pool and its admission count."""

    def __init__(self, model_path: Path, settings: Settings) -> None:
        self.settings = settings
        self.model = load_model(model_path, threads=1)
        self.card = model_card(model_path, self.model.classes)
        self.page = PAGE.read_bytes()
        self.pool = ThreadPoolExecutor(settings.threads or cores(), thread_name_prefix="predict")
        self.admitted = 0  # requests between admission and answer; only the event loop's thread touches it

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": self.card.get("model"),
                "classes": len(self.model.classes),
                "admitted": self.admitted,
            }
        )

    async def card_json(self, request: Request) -> Response:
        return JSONResponse(self.card)

    def refusal(self, request: Request) -> Response | None:
        """The answer to a request refused before its body is read, if it is."""
        max_upload = self.settings.max_upload
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload:
            return error(413, f"request body of {int(length):,} bytes is over the {max_upload:,} byte limit")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(422, "expected a multipart/form-data body with a `file` field")
        if self.admitted >= self.settings.max_queue:
            response = error(503, f"busy: {self.admitted} requests in progress; retry in a second")
            response.headers["Retry-After"] = "1"
            return response
        return None

    async def predict(self, request: Request) -> Response:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        self.admitted += 1
        try:
            files = await read_uploads(request, self.settings.max_upload)
            if isinstance(files, Response):
                return files
            status, body = await asyncio.get_running_loop().run_in_executor(
                self.pool, answer, self.model, files, self.settings.max_pixels
            )
            return Response(body, status_code=status, media_type="application/json")
        finally:
            self.admitted -= 1

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index),
            Route("/healthz", self.healthz),
            Route("/model", self.card_json),
            Route("/predict", self.predict, methods=["POST"]),
        ]


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail)


async def internal_error(request: Request, exc: Exception) -> Response:
    return error(500, "internal error")


def create_app(model_path: Path, settings: Settings | None = None) -> Starlette:
    service = Service(model_path, settings or Settings())
    return Starlette(routes=service.routes(), exception_handlers={HTTPException: http_error, Exception: internal_error})


def app_from_env() -> Starlette:
    """The app of a worker process (`--workers` > 1), which uvicorn starts afresh."""
    return create_app(*from_env())
