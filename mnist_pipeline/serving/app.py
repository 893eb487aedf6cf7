"""The HTTP API and the draw-a-digit page, as an ASGI app (Starlette); `mnist-serve` runs it.

    GET  /          the page (served from the package, works offline)
    GET  /healthz   {"status": "ok", "model_sha256", "version", ...}
    GET  /model     the model card: model_card.json beside the model, or one folder up (the pipeline
                    keeps it in git as models/model_card.json, beside the DVC-tracked models/export/)
    POST /predict   multipart form, one or more `file` fields → {"digit", "label", "probabilities", "input", …}
                    for one file, a list (one entry per file, bad ones with their own "error") for several
    POST /feedback  (with `--feedback` only) multipart `file` and `label` (0–9) → 201 {"id", "label", "digit"}
                    once its transaction has committed (docs/feedback.md); 429 past the per-client rate, 503
                    with Retry-After while the store is down or locked, 507 when it or its disk is full

The model is one ONNX file, or a model base path of numbered versions (registry.py, written by
`mnist-promote`): then the server serves the pinned or newest version and follows it, loading a new
one beside the old and switching between requests.

Starlette gives routing and streaming multipart parsing without FastAPI's request-model layer
(this API has one form field). Images are prepared by `images.prepare`, exactly as
`mnist-predict` does, and run through onnxruntime (`exported.load_model`); torch is never
imported. The form is read by `uploads.py` for both POST routes: the body is counted while it
streams and refused with 413 past the limit (or at once, from Content-Length), so a large upload
is never held in memory. Every error is JSON `{"error": …}` with its status; no traceback
reaches a client. Collecting corrections is `collect.py`'s.

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
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mnist_pipeline import registry
from mnist_pipeline.exported import Model, load_model
from mnist_pipeline.serving.collect import Collector, read_feedback
from mnist_pipeline.serving.identity import Identities, load_tokens
from mnist_pipeline.serving.settings import WEB_MAX_PIXELS, Settings, from_env
from mnist_pipeline.serving.uploads import (
    NO_FILE,
    Body,
    Upload,
    as_upload,
    bounded_form,
    compact_json,
    error,
    prepared,
    settle,
)

__all__ = ["WEB_MAX_PIXELS", "app_from_env", "compact_json", "create_app", "png_data_url"]

MAX_FILES = 16
FOLLOW_SECONDS = 1.0  # how often a server on a model base path looks for a promotion or a rollback
PAGE = Path(__file__).parent / "static" / "index.html"


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
                model_sha256=model.sha256,
            )
    if len(entries) == 1:
        entry = entries[0]
        if "error" in entry:
            return entry["status"], compact_json({"error": entry["error"]})
        return 200, compact_json(entry)
    return 200, compact_json(entries)


async def read_uploads(request: Request, max_upload: int) -> list[Upload] | Response:
    """The form's `file` fields, read with the body counted as it streams; or the refusal."""
    form = await bounded_form(request, max_upload, max_files=MAX_FILES, max_fields=MAX_FILES)
    if isinstance(form, Response):
        return form
    try:
        values = form.getlist("file")
        if not values:
            return error(422, NO_FILE)
        return [await as_upload(value) for value in values]
    finally:
        await form.close()


@dataclass(frozen=True)
class Served:
    """What answers: a model, its card and its version (None for a single model file)."""

    model: Model
    card: dict[str, Any]
    version: int | None


class Service:
    """The routes of one worker: its model, its card, its pool and its admission count."""

    def __init__(self, model_path: Path, settings: Settings) -> None:
        self.settings = settings
        path, version = registry.resolve(model_path)
        model = load_model(path, threads=1)
        self.served = Served(model, model_card(path, model.classes), version)  # swapped whole: never mixed
        if version is not None:  # a model base path: follow its promotions and rollbacks
            threading.Thread(target=self.follow, args=(model_path,), name="follow", daemon=True).start()
        self.page = PAGE.read_bytes()
        self.collector = Collector(settings) if settings.feedback else None
        tokens = load_tokens(Path(settings.tokens)) if settings.tokens else None
        self.identities = Identities(settings.trust_proxy, tokens, settings.user_header)
        if self.collector is not None:  # the page shows its correction buttons
            self.page = self.page.replace(b"<body>", b'<body data-feedback="1">', 1)
        self.pool = ThreadPoolExecutor(settings.threads or cores(), thread_name_prefix="predict")
        self.admitted = 0  # requests between admission and answer; only the event loop's thread touches it

    def follow(self, base: Path) -> None:
        """Load the version the base path names beside the one serving, then switch: a request takes the model
        once, when it is handed to the pool, so the old one finishes what it has. A version that does not load
        is reported once and never served (a published version does not change)."""
        failed: set[int] = set()
        problem = ""
        while True:
            time.sleep(FOLLOW_SECONDS)
            serving = self.served.version
            try:
                version = registry.current(base)
            except Exception as exc:  # whatever the folder holds, the thread goes on and the server keeps its model
                if str(exc) != problem:
                    problem = str(exc)
                    print(f"warning: {problem}; still serving version {serving}", file=sys.stderr, flush=True)
                continue
            problem = ""
            if version is None or version == serving or version in failed:
                continue
            path = registry.model_path(base, version)
            try:
                model = load_model(path, threads=1)
                card = model_card(path, model.classes)
            except Exception as exc:  # whatever a bad file raises, the server keeps the model it has
                failed.add(version)
                print(
                    f"warning: version {version} does not load ({exc}); still serving version {serving}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            self.served = Served(model, card, version)
            print(f"serving version {version} ({model.sha256[:12]}) from {path}", flush=True)

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        served = self.served
        return JSONResponse(
            {
                "status": "ok",
                "model": served.card.get("model"),
                "model_sha256": served.model.sha256,  # the ONNX file that answers, as loaded
                "version": served.version,  # in a model base path; None for one model file
                "classes": len(served.model.classes),
                "admitted": self.admitted,
                "feedback": self.collector is not None,
            }
        )

    async def card_json(self, request: Request) -> Response:
        return JSONResponse(self.served.card)

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

    async def admit(self, request: Request, serve: Callable[[Request], Awaitable[Response]]) -> Response:
        """A POST refused before its body is read, or counted as admitted while `serve` answers it; either
        way the answer goes out once the unread rest of the body is dealt with (`uploads.settle`)."""
        body = Body(request.receive)
        request = Request(request.scope, body)
        response = self.refusal(request)
        if response is None:
            self.admitted += 1
            try:
                response = await serve(request)
            finally:
                self.admitted -= 1
        return await settle(body, request, response)

    async def predict(self, request: Request) -> Response:
        return await self.admit(request, self.predicted)

    async def predicted(self, request: Request) -> Response:
        files = await read_uploads(request, self.settings.max_upload)
        if isinstance(files, Response):
            return files
        status, body = await asyncio.get_running_loop().run_in_executor(
            self.pool, answer, self.served.model, files, self.settings.max_pixels
        )
        return Response(body, status_code=status, media_type="application/json")

    async def feedback(self, request: Request) -> Response:
        return await self.admit(request, self.collected)

    async def collected(self, request: Request) -> Response:
        collector = self.collector
        assert collector is not None
        # Who sent it is decided from the peer and the headers, before any of the body is read.
        who = self.identities.of(request.client.host if request.client else "unknown", request.headers)
        if isinstance(who, str):
            return error(401, who, {"WWW-Authenticate": "Bearer"})
        submitter = collector.submitter(who)
        refused = await collector.admitted(submitter)
        if refused is not None:
            return refused
        parsed = await read_feedback(request, self.settings.max_upload)
        if isinstance(parsed, Response):
            return parsed
        upload, label = parsed
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(
            self.pool, collector.scored, self.served.model, upload, label, submitter, self.settings.max_pixels
        )
        if isinstance(record, Response):
            return record
        return await collector.commit(record)

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
