"""mnist-serve: the exported model over HTTP, and a draw-a-digit page (the app: `app.py`).

    mnist-serve [--model models/export/model.onnx|models/serving] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 4]
                [--workers 1] [--threads CORES] [--max-queue 16]
                [--feedback [DIR|postgresql://…]] [--feedback-rate 1] [--feedback-burst 20]
                [--feedback-max-mb 1024] [--feedback-reserve-mb 256]
                [--trust-proxy ADDR ...]

uvicorn with uvloop/httptools is the fast single-process server for an ASGI app, what the
Python web ecosystem deploys and proxies; `--workers N` runs N such processes on one socket
under uvicorn's supervisor. This module is the command and that supervisor: it imports the
app (numpy, Pillow, onnxruntime) only where one is served, so the supervisor of several
workers stays small.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from mnist_pipeline.errors import ModelFileError, PipelineError
from mnist_pipeline.serving.identity import USER_HEADERS, load_tokens
from mnist_pipeline.serving.settings import (
    DEFAULT_FEEDBACK_BURST,
    DEFAULT_FEEDBACK_MAX_BYTES,
    DEFAULT_FEEDBACK_MIN_FREE,
    DEFAULT_FEEDBACK_RATE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD,
    DEFAULT_MODEL,
    SETTINGS_ENV,
    Settings,
    to_env,
)


def model_problem(path: Path) -> str | None:
    """Why `path` cannot be served, found in a forked child so that this process stays small
    (each worker loads its own copy; the supervisor needs none)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(_try_load, (path,))


def _try_load(path: Path) -> str | None:
    from mnist_pipeline import registry
    from mnist_pipeline.exported import load_model

    try:
        load_model(registry.resolve(path)[0], threads=1)
    except (ModelFileError, registry.RegistryError) as exc:
        return str(exc)
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mnist-serve", description="Serve the exported model over HTTP.")
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"ONNX model, or a model base path that `mnist-promote` writes, followed (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD / 2**20,
        help="largest request body accepted, in MB (default 4)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes sharing the port (default 1; each holds its own model)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="per worker: threads that prepare images and run the model (default: the cores)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"per worker: requests admitted at once; more get 503 (default {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument(
        "--feedback",
        nargs="?",
        const="feedback",
        default=None,
        metavar="STORE",
        help="collect users' corrections (POST /feedback, buttons on the page) into STORE: a folder for a SQLite "
        "store (default feedback/, what `mnist-feedback snapshot` reads) or a postgresql:// URL that several servers "
        "share; off without this flag",
    )
    parser.add_argument(
        "--feedback-rate",
        type=float,
        default=DEFAULT_FEEDBACK_RATE,
        help=f"per client, for every server of the store: corrections a second (default {DEFAULT_FEEDBACK_RATE:g}); "
        "more get 429",
    )
    parser.add_argument(
        "--feedback-burst",
        type=int,
        default=DEFAULT_FEEDBACK_BURST,
        help=f"per client, for every server of the store: corrections at once (default {DEFAULT_FEEDBACK_BURST})",
    )
    parser.add_argument(
        "--feedback-max-mb",
        type=float,
        default=DEFAULT_FEEDBACK_MAX_BYTES / 2**20,
        help="the store's size bound in MB; past it, 507 (default 1024)",
    )
    parser.add_argument(
        "--feedback-reserve-mb",
        type=float,
        default=DEFAULT_FEEDBACK_MIN_FREE / 2**20,
        help="a SQLite store's disk keeps this much free; past it, 507 (default 256)",
    )
    parser.add_argument(
        "--trust-proxy",
        nargs="+",
        default=[],
        metavar="ADDR",
        help="reverse proxies (addresses or networks) whose X-Forwarded-For names the client (and whose "
        "--user-header names a signed-in user); without it the peer's address is the client and those headers are "
        "ignored, since any client can write them",
    )
    parser.add_argument(
        "--user-header",
        choices=USER_HEADERS,
        default=None,
        help="the header in which a --trust-proxy proxy that signs users in (oauth2-proxy) names the user, who is "
        "then the submitter; the proxy must set or clear it on every request",
    )
    parser.add_argument(
        "--tokens",
        type=Path,
        default=None,
        metavar="FILE",
        help="API tokens (`mnist-feedback token NAME --file FILE` adds one): POST /feedback then needs a user "
        "signed in by a trusted proxy or `Authorization: Bearer TOKEN`, whose name is the submitter; 401 otherwise",
    )
    args = parser.parse_args(argv)
    for proxy in args.trust_proxy:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            parser.error(f"--trust-proxy {proxy!r}: expected an IP address or network such as 10.0.0.0/8")
    if args.user_header and not args.trust_proxy:
        parser.error("--user-header needs --trust-proxy: only a proxy in front can vouch for who signed in")
    if args.feedback_rate <= 0:
        parser.error("--feedback-rate must be above 0")
    for name in ("workers", "threads", "max_queue", "feedback_burst"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the URL is printed so that a client that reads it can connect at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        max_upload=int(args.max_upload_mb * 2**20),
        threads=args.threads,
        max_queue=args.max_queue,
        feedback=args.feedback,
        feedback_rate=args.feedback_rate,
        feedback_burst=args.feedback_burst,
        feedback_max_bytes=int(args.feedback_max_mb * 2**20),
        feedback_min_free=int(args.feedback_reserve_mb * 2**20),
        trust_proxy=tuple(args.trust_proxy),
        user_header=args.user_header,
        tokens=str(args.tokens.resolve()) if args.tokens else None,
    )
    try:
        if args.feedback:
            from mnist_pipeline.feedback.store import Store

            # Made, migrated and checked here, once, before any worker: a store it cannot use stops it now.
            store = Store(args.feedback, settings.feedback_max_bytes, settings.feedback_min_free)
            store.close()
        if args.tokens:
            load_tokens(args.tokens)  # a bad file stops the command, with its line, before any worker starts
        if args.workers == 1:
            from mnist_pipeline.serving.app import create_app

            app = create_app(args.model, settings)
            problem = None
        else:
            problem = model_problem(args.model)
    except PipelineError as exc:  # the model file, or the feedback store
        problem = str(exc)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
    collecting = f"; collecting corrections in {store.where}" if args.feedback else ""
    print(f"serving {args.model} on http://{shown}:{port}/ (Ctrl-C stops){collecting}", flush=True)
    server: dict[str, Any] = {
        "log_level": "warning",
        "access_log": False,
        "lifespan": "off",
        "timeout_graceful_shutdown": 5,
        # identity.py reads the forwarding headers, knowing the peer; uvicorn's own reading would hide it (and
        # believes X-Forwarded-For from 127.0.0.1 by default: a local client could be any submitter).
        "proxy_headers": False,
    }
    try:
        if args.workers == 1:
            uvicorn.Server(uvicorn.Config(app, **server)).run(sockets=[sock])
        else:
            os.environ[SETTINGS_ENV] = to_env(args.model, settings)
            config = uvicorn.Config(
                "mnist_pipeline.serving.app:app_from_env", factory=True, workers=args.workers, **server
            )
            Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the signal it caught
        pass
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
