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
is decoded: WEB_MAX_PIXELS decoded pixels (a JPEG is decoded at reduced scale, so a phone
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
from collections.abc import Awaitable, Callable
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

from mnist_pipeline.exported import load_model
from mnist_pipeline.images import FORMAT_NAMES, ImageError, TooLarge, UnsupportedFormat, prepare
from mnist_pipeline.serve import DEFAULT_MAX_QUEUE, DEFAULT_MAX_UPLOAD, SETTINGS_ENV

MAX_FILES = 16
# Decoded pixels per uploaded image. The worst case, an RGBA or palette PNG, peaks near 8 bytes a
# decoded pixel while it is prepared: 10 MP × 2 threads stays inside a 250 MB worker.
WEB_MAX_PIXELS = 10_000_000
PAGE = Path(__file__).parent / "static" / "index.html"
IMAGE_TYPES = {"image/png", "image/jpeg", "image/bmp", "image/x-ms-bmp", "image/gif", "image/tiff", "image/webp"}


class BodyTooLarge(Exception):
    pass


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def status_of(exc: ImageError) -> int:
    return 413 if isinstance(exc, TooLarge) else 415 if isinstance(exc, UnsupportedFormat) else 400


def counting(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """`receive`, raising BodyTooLarge once the body passes `limit` bytes."""
    seen = 0

    async def wrapped() -> dict:
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
    return {"model": None, "classes": classes, "note": f"no readable model_card.json beside {model_path.name} "
                                                       "or one folder up"}


def create_app(model_path: Path, max_upload: int = DEFAULT_MAX_UPLOAD, threads: int | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_pixels: int = WEB_MAX_PIXELS) -> Starlette:
    model = load_model(model_path, threads=1)
    card = model_card(model_path, model.classes)
    page = PAGE.read_bytes()
    pool = ThreadPoolExecutor(threads or cores(), thread_name_prefix="predict")
    admitted = 0  # requests between admission and answer; only the event loop's thread touches it

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": card.get("model"), "classes": len(model.classes),
                             "admitted": admitted})

    async def card_json(request: Request) -> Response:
        return JSONResponse(card)

    def prepared(entry: dict[str, Any], kind: str, data: bytes) -> np.ndarray | None:
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

    def answer(files: list[tuple[dict[str, Any], str, bytes]]) -> tuple[int, bytes]:
        """(status, JSON body) for the uploads: runs in the pool, off the event loop."""
        entries, digits = [], {}
        for i, (entry, kind, data) in enumerate(files):
            entries.append(entry)
            digit = prepared(entry, kind, data) if "error" not in entry else None
            if digit is not None:
                digits[i] = digit
        if digits:
            for i, probs in zip(digits, model.probabilities(np.stack(list(digits.values()))), strict=True):
                best = int(np.argmax(probs))
                entries[i].update(digit=best, label=model.classes[best],
                                  probabilities=[round(float(p), 6) for p in probs], input=png_data_url(digits[i]))
        if len(entries) == 1:
            entry = entries[0]
            if "error" in entry:
                return entry["status"], compact_json({"error": entry["error"]})
            return 200, compact_json(entry)
        return 200, compact_json(entries)

    async def predict(request: Request) -> Response:
        nonlocal admitted
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload:
            return error(413, f"request body of {int(length):,} bytes is over the {max_upload:,} byte limit")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(422, "expected a multipart/form-data body with a `file` field")
        if admitted >= max_queue:
            response = error(503, f"busy: {admitted} requests in progress; retry in a second")
            response.headers["Retry-After"] = "1"
            return response
        admitted += 1
        try:
            return await parse_and_answer(request)
        finally:
            admitted -= 1

    async def parse_and_answer(request: Request) -> Response:
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
            files = []
            for upload in uploads:
                if not isinstance(upload, UploadFile):
                    files.append(({"file": None, "status": 422, "error": "the `file` field must be a file upload"},
                                  "", b""))
                    continue
                kind = (upload.content_type or "").split(";")[0].strip().lower()
                files.append(({"file": upload.filename or "upload"}, kind, await upload.read()))
        finally:
            await form.close()
        status, body = await asyncio.get_running_loop().run_in_executor(pool, answer, files)
        return Response(body, status_code=status, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, exc.detail)

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error(500, "internal error")

    return Starlette(
        routes=[Route("/", index), Route("/healthz", healthz), Route("/model", card_json),
                Route("/predict", predict, methods=["POST"])],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )


def app_from_env() -> Starlette:
    """The app of a worker process (`--workers` > 1), which uvicorn starts afresh."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    return create_app(Path(settings.pop("model_path")), **settings)
