"""mnist-serve: the exported model over HTTP, and a draw-a-digit page.

    mnist-serve [--model models/export/model.onnx] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 4]
                [--workers 1] [--threads CORES] [--max-queue 16]

    GET  /          the page (served from the package, works offline)
    GET  /healthz   {"status": "ok", ...}
    GET  /model     the model card: model_card.json beside the model, or one folder up (the pipeline
                    keeps it in git as models/model_card.json, beside the DVC-tracked models/export/)
    POST /predict   multipart form, one or more `file` fields → {"digit", "label", "probabilities", "input", …}
                    for one file, a list (one entry per file, bad ones with their own "error") for several

Built on Starlette and uvicorn: an ASGI app is what the Python web ecosystem deploys and
proxies, Starlette gives routing and streaming multipart parsing without FastAPI's
request-model layer (this API has one form field), and uvicorn with uvloop/httptools is
the fast single-process server for it. Images are prepared by `images.prepare`, exactly as
`mnist-predict` does, and run through onnxruntime (`exported.load_model`); torch is never
imported. The body is counted while it streams and refused with 413 past the limit (or at
once, from Content-Length), so a large upload is never held in memory. Every error is
JSON `{"error": …}` with its status; no traceback reaches a client.

The event loop only parses requests and writes answers. Decoding, preparation, inference
and the answer's JSON run in a pool of `--threads` threads (default: the cores this process
may use; Pillow, numpy and onnxruntime release the GIL for their work), so `/healthz` and
small requests are answered while large ones are prepared. Each image is bounded before it
is decoded: WEB_MAX_PIXELS decoded pixels (a JPEG is decoded at reduced scale, so a phone
photo fits), far below the CLI's limit, because an anonymous client is not the user. At most
`--max-queue` requests are admitted at once per worker; more get 503 with `Retry-After`, so
the backlog (and the bodies it holds) stays bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.supervisors import Multiprocess

from mnist_pipeline.errors import ModelFileError
from mnist_pipeline.exported import load_model
from mnist_pipeline.images import FORMAT_NAMES, ImageError, TooLarge, UnsupportedFormat, prepare

DEFAULT_MODEL = Path("models/export/model.onnx")
DEFAULT_MAX_UPLOAD = 4 << 20  # bytes per request: a phone photo fits, a flood does not
MAX_FILES = 16
# Decoded pixels per uploaded image. The worst case, an RGBA or palette PNG, peaks near 8 bytes a
# decoded pixel while it is prepared: 10 MP × 2 threads stays inside a 250 MB worker.
WEB_MAX_PIXELS = 10_000_000
DEFAULT_MAX_QUEUE = 16  # requests admitted per worker (parsing, waiting or in the pool); more get 503
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
        except ImageError as exc:  # the documented refusals; anything else is a bug and answers 500
            entry.update(status=status_of(exc), error=str(exc))
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


# Worker processes (--workers > 1) are started afresh by uvicorn and build their app from this.
SETTINGS_ENV = "MNIST_SERVE_SETTINGS"


def app_from_env() -> Starlette:
    settings = json.loads(os.environ[SETTINGS_ENV])
    return create_app(Path(settings.pop("model_path")), **settings)


def model_problem(path: Path) -> str | None:
    """Why `path` cannot be served, found in a forked child so that this process stays small
    (each worker loads its own copy; the supervisor needs none)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(_try_load, (path,))


def _try_load(path: Path) -> str | None:
    try:
        load_model(path, threads=1)
    except ModelFileError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-serve", description="Serve the exported model over HTTP.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"ONNX model (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD / 2**20,
                        help="largest request body accepted, in MB (default 4)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes sharing the port (default 1; each holds its own model)")
    parser.add_argument("--threads", type=int, default=None,
                        help="per worker: threads that prepare images and run the model (default: the cores)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"per worker: requests admitted at once; more get 503 (default {DEFAULT_MAX_QUEUE})")
    args = parser.parse_args(argv)
    for name in ("workers", "threads", "max_queue"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    settings = {"max_upload": int(args.max_upload_mb * 2**20), "threads": args.threads, "max_queue": args.max_queue}
    try:
        app = create_app(args.model, **settings) if args.workers == 1 else None
        problem = model_problem(args.model) if args.workers > 1 else None
    except ModelFileError as exc:
        problem = str(exc)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    sock.listen(2048)  # before the URL is printed, so a client that reads it can connect at once
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving {args.model} on http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
    server = {"log_level": "warning", "access_log": False, "lifespan": "off", "timeout_graceful_shutdown": 5}
    try:
        if args.workers == 1:
            uvicorn.Server(uvicorn.Config(app, **server)).run(sockets=[sock])
        else:
            os.environ[SETTINGS_ENV] = json.dumps({"model_path": str(args.model.resolve()), **settings})
            config = uvicorn.Config("mnist_pipeline.serve:app_from_env", factory=True, workers=args.workers, **server)
            Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the signal it caught
        pass
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
