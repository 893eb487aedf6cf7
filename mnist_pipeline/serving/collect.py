"""POST /feedback: users' corrections, read, rate-limited, scored and written to the store.

One worker's `Collector` holds the store writer, the per-client rate limit (shared by the server's
workers) and the identity of the model that answered. Reading the form is `uploads.py`'s, as for
`/predict`; what happens to a correction after it is on disk is docs/feedback.md's.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mnist_pipeline.exported import Model
from mnist_pipeline.feedback.store import Record, Store, StoreFull, correction
from mnist_pipeline.fileio import sha256_file
from mnist_pipeline.serving.settings import Settings
from mnist_pipeline.serving.uploads import NO_FILE, Upload, as_upload, bounded_form, compact_json, error, prepared

IO_THREADS = 4  # per worker: appends waiting on fdatasync at once


class RateLimit:
    """A token bucket per client, `rate` a second sustained and `burst` at once, shared by every worker
    of one server: the buckets live in a file each worker maps (`path`, made by `mnist-serve`; a private
    one without it), a fixed table of `slots` (the client's hash, its tokens, when), so N workers do not
    give a client N buckets. One decision holds the file's lock for microseconds. Memory is the table:
    a new client whose probe window is taken replaces the client idle longest there (forgotten, it
    starts again from a full bucket)."""

    SLOT = struct.Struct("<Qdd")
    PROBES = 16

    def __init__(self, rate: float, burst: int, path: Path | None = None, slots: int = 1 << 14) -> None:
        self.rate, self.burst, self.slots = rate, burst, slots
        size = slots * self.SLOT.size
        if path is None:
            self._file = tempfile.TemporaryFile()
            fd = self._file.fileno()
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "r+b")
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)  # zeros: every slot empty
        self._map = mmap.mmap(fd, size)
        self._lock = threading.Lock()  # flock excludes other processes; this, the threads of this one

    def _slot(self, key: int, now: float) -> tuple[int, float, float]:
        """(offset, tokens, when) of `key`'s slot, claimed for it if it had none."""
        first = key % self.slots
        oldest: tuple[float, int] | None = None
        for i in range(self.PROBES):
            offset = ((first + i) % self.slots) * self.SLOT.size
            held, tokens, when = self.SLOT.unpack_from(self._map, offset)
            if held == key:
                return offset, tokens, when
            if held == 0:
                return offset, float(self.burst), now
            if oldest is None or when < oldest[0]:
                oldest = (when, offset)
        assert oldest is not None
        return oldest[1], float(self.burst), now

    def wait(self, client: str, now: float) -> float:
        """0 and a token taken if `client` may go on; else the seconds until it may."""
        key = int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest(), "little") | 1  # never 0
        with self._lock:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            try:
                offset, tokens, when = self._slot(key, now)
                tokens = min(float(self.burst), tokens + max(0.0, now - when) * self.rate)
                taken = tokens >= 1
                self.SLOT.pack_into(self._map, offset, key, tokens - 1 if taken else tokens, now)
            finally:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        return 0.0 if taken else (1 - tokens) / self.rate


def read_label(value: Any) -> int | str:
    """The form's label as a digit, or why it is not one."""
    if value is None:
        return "no `label` field: send the digit 0–9 as form field `label`"
    if not isinstance(value, str) or len(value) != 1 or value not in "0123456789":
        shown = value if isinstance(value, str) else "a file"
        return f"label must be one digit 0–9, got {shown[:40]!r}"
    return int(value)


async def read_feedback(request: Request, max_upload: int) -> tuple[Upload, int] | Response:
    """The form's one `file` and its `label`, read with the body counted as it streams; or the refusal."""
    form = await bounded_form(request, max_upload, max_files=1, max_fields=1)
    if isinstance(form, Response):
        return form
    try:
        value = form.get("file")
        if value is None:
            return error(422, NO_FILE)
        upload = await as_upload(value)
        if "error" in upload[0]:
            return error(upload[0]["status"], upload[0]["error"])
        label = read_label(form.get("label"))
        if isinstance(label, str):
            return error(422, label)
        return upload, label
    finally:
        await form.close()


class Collector:
    """POST /feedback: one worker's store writer, rate limit and model identity."""

    def __init__(self, settings: Settings, model_path: Path) -> None:
        assert settings.feedback is not None
        self.store = Store(Path(settings.feedback), settings.feedback_max_bytes)
        limits = Path(settings.feedback_limits) if settings.feedback_limits else None
        self.limit = RateLimit(settings.feedback_rate, settings.feedback_burst, limits)
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
