"""What a server is told: its limits, and how they reach worker processes.

Imported by the command (`server.py`) and by the app (`app.py`) alike, and importing nothing
heavy itself, so the supervisor of several workers stays small and the two modules need not
import each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mnist_pipeline.defaults import (
    DEFAULT_FEEDBACK_MAX_BYTES,
    DEFAULT_FEEDBACK_MIN_FREE,
    DEFAULT_MAX_UPLOAD,
    DEFAULT_MODEL,
)

__all__ = [
    "DEFAULT_FEEDBACK_MAX_BYTES",
    "DEFAULT_FEEDBACK_MIN_FREE",
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_MODEL",
    "Settings",
    "from_env",
    "to_env",
]
DEFAULT_MAX_QUEUE = 16  # requests admitted per worker (parsing, waiting or in the pool); more get 503
# Decoded pixels per uploaded image. The worst case, an RGBA or palette PNG, peaks near 8 bytes a
# decoded pixel while it is prepared: 10 MP × 2 threads stays inside a 250 MB worker.
WEB_MAX_PIXELS = 10_000_000
DEFAULT_FEEDBACK_RATE = 1.0  # corrections per second per client, sustained (a person clicks far less)
DEFAULT_FEEDBACK_BURST = 20  # ... and at once
SETTINGS_ENV = "MNIST_SERVE_SETTINGS"  # worker processes build their app from it (app.app_from_env)


@dataclass(frozen=True)
class Settings:
    """One worker's limits; `threads` None means the cores this process may use."""

    max_upload: int = DEFAULT_MAX_UPLOAD
    threads: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_pixels: int = WEB_MAX_PIXELS
    feedback: str | None = None  # the store (a folder or a postgresql:// URL): POST /feedback is on; None: off
    feedback_rate: float = DEFAULT_FEEDBACK_RATE
    feedback_burst: int = DEFAULT_FEEDBACK_BURST
    feedback_max_bytes: int = DEFAULT_FEEDBACK_MAX_BYTES
    feedback_min_free: int = DEFAULT_FEEDBACK_MIN_FREE  # a SQLite store refuses past this much free disk
    trust_proxy: tuple[str, ...] = ()  # proxies whose X-Forwarded-For (and user_header) are believed
    user_header: str | None = None  # the header in which a trusted proxy names the user it signed in
    tokens: str | None = None  # a file of hashed API tokens: POST /feedback then needs a signed-in user or one


def to_env(model_path: Path, settings: Settings) -> str:
    return json.dumps({"model_path": str(model_path.resolve()), **asdict(settings)})


def from_env() -> tuple[Path, Settings]:
    values = json.loads(os.environ[SETTINGS_ENV])
    values["trust_proxy"] = tuple(values["trust_proxy"])
    return Path(values.pop("model_path")), Settings(**values)
