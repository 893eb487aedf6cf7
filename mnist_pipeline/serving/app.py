"""The HTTP API and the draw-a-digit page, as an ASGI app (Starlette); `mnist-serve` runs it.

    GET  /          the page (served from the package, works offline)
    GET  /healthz   {"status": "ok", ...}
    GET  /model     the model card: model_card.json beside the model, or one folder up (the pipeline
                    keeps it in git as models/model_card.json, beside the DVC-tracked models/export/)
    POST /predict   multipart form, one or more `file` fields → {"digit", "label", "probabilities", "input", …}
                    for one file, a list (one entry per file, bad ones with their own "error") for several
    POST /feedback  (with `--feedback` only) multipart `file` and `label` (0–9) → 201 {"id", "label", "digit"}
                    once the correction is on disk (docs/feedback.md); 429 past the per-client rate, 507 when
                    the store is full

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
import math
import os
import time
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
from mnist_pipeline.feedback.store import Record, Store, StoreFull, correction
from mnist_pipeline.fileio import sha256_file
from mnist_pipeline.images import FORMAT_NAMES, ImageError, TooLarge, UnsupportedFormat, prepare
from mnist_pipeline.serving.settings import WEB_MAX_PIXELS, Settings, from_env

__all__ = ["WEB_MAX_PIXELS", "app_from_env", "compact_json", "create_app", "png_data_url"]

MAX_FILES = 16
IO_THREADS = 4  # per worker: appends waiting on fdatasync at once
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


class RateLimit:
    """A token bucket per client: `rate` a second sustained, `burst` at once. Memory is bounded: past
    `max_clients` buckets, the idle (full) ones are forgotten, and if none is idle, all are."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self.buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, when)

    def wait(self, client: str, now: float) -> float:
        """0 and a token taken if `client` may go on; else the seconds until it may."""
        tokens, when = self.buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        if client not in self.buckets and len(self.buckets) >= self.max_clients:
            full = [c for c, (t, w) in self.buckets.items() if t + (now - w) * self.rate >= self.burst]
            for c in full or list(self.buckets):
                del self.buckets[c]
        self.buckets[client] = (tokens - 1, now)
        return 0.0


def read_label(value: Any) -> int | str:
    """The form's label as a digit, or why it is not one."""
    if value is None:
        return "no `label` field: send the digit 0–9 as form field `label`"
    if not isinstance(value, str) or len(value) != 1 or value not in "0123456789":
        shown = value if isinstance(value, str) else "a file"
        return f"label must be one digit 0–9, got {shown[:40]!r}"
    return int(value)


class Collector:
    """POST /feedback: one worker's store writer, rate limit and model identity."""

    def __init__(self, settings: Settings, model_path: Path) -> None:
        assert settings.feedback is not None
        self.store = Store(Path(settings.feedback), settings.feedback_max_bytes)
        self.limit = RateLimit(settings.feedback_rate, settings.feedback_burst)
        self.model_id = sha256_file(model_path)
        # fdatasync waits on the disk, not the CPU: a pool of its own keeps the CPU pool preparing
        # images meanwhile, and threads that append together share one fdatasync (Store.append).
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="feedback-io")

    def scored(self, model: Model, upload: Upload, label: int, client: str, max_pixels: int) -> Record | Response:
        """The correction to record, or the refusal: CPU work, run in the worker's pool."""
        entry, kind, data = upload
        digit = prepared(entry, kind, data, max_pixels)
        if digit is None:
            return error(entry["status"], entry["error"])
        probs = model.probabilities(digit[None])[0]
        return correction(digit, label, probs, self.model_id, self.store.submitter("client", client), "web", data, kind)

    def append(self, record: Record) -> tuple[int, bytes]:
        """(status, JSON body) once the record is on disk: waiting on the disk, run in the I/O pool."""
        try:
            self.store.append(record)
        except StoreFull as exc:
            return 507, compact_json({"error": str(exc)})
        return 201, compact_json({"id": record.id, "label": record.label, "digit": record.answer})


async def read_feedback(request: Request, max_upload: int) -> tuple[Upload, int] | Response:
    """The form's one `file` and its `label`, read with the body counted as it streams; or the refusal."""
    limited = Request(request.scope, counting(request.receive, max_upload))
    try:
        form = await limited.form(max_files=1, max_fields=1)
    except BodyTooLarge:
        return error(413, f"request body is over the {max_upload:,} byte limit")
    except MultiPartException as exc:
        return error(400, f"malformed multipart body: {exc.message}")
    try:
        upload = form.get("file")
        if upload is None:
            return error(422, "no `file` field: send the image as multipart form field `file`")
        if not isinstance(upload, UploadFile):
            return error(422, "the `file` field must be a file upload")
        label = read_label(form.get("label"))
        if isinstance(label, str):
            return error(422, label)
        kind = (upload.content_type or "").split(";")[0].strip().lower()
        return ({"file": upload.filename or "upload"}, kind, await upload.read()), label
    finally:
        await form.close()


class Service:
    """The routes of one worker: its model, its card, its pool and its admission count."""

    def __init__(self, model_path: Path, settings: Settings) -> None:
        self.settings = settings
        self.model = load_model(model_path, threads=1)
        self.card = model_card(model_path, self.model.classes)
        self.page = PAGE.read_bytes()
        self.collector = Collector(settings, model_path) if settings.feedback else None
        if self.collector is not None:  # the page shows its correction buttons
            self.page = self.page.replace(b"<body>", b'<body data-feedback="1">', 1)
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
                "feedback": self.collector is not None,
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

    async def feedback(self, request: Request) -> Response:
        collector = self.collector
        assert collector is not None
        refused = self.refusal(request)
        if refused is not None:
            return refused
        client = request.client.host if request.client else "unknown"
        wait = collector.limit.wait(client, time.monotonic())
        if wait:
            response = error(429, f"too many corrections from this client; retry in {math.ceil(wait)} s")
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        self.admitted += 1
        try:
            parsed = await read_feedback(request, self.settings.max_upload)
            if isinstance(parsed, Response):
                return parsed
            upload, label = parsed
            loop = asyncio.get_running_loop()
            record = await loop.run_in_executor(
                self.pool, collector.scored, self.model, upload, label, client, self.settings.max_pixels
            )
            if isinstance(record, Response):
                return record
            status, body = await loop.run_in_executor(collector.io, collector.append, record)
            return Response(body, status_code=status, media_type="application/json")
        finally:
            self.admitted -= 1

    def routes(self) -> list[Route]:
        routes = [
            Route("/", self.index),
            Route("/healthz", self.healthz),
            Route("/model", self.card_json),
            Route("/predict", self.predict, methods=["POST"]),
        ]
        if self.collector is not None:
            routes.append(Route("/feedback", self.feedback, methods=["POST"]))
        return routes


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
