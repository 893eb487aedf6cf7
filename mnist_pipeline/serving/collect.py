"""POST /feedback: users' corrections, read, rate-limited, scored and committed to the store.

One worker's `Collector` holds its handle on the store (whose rate buckets every worker and server
of the store shares), its group-commit writer and the identity of the model that answered. Reading
the form is `uploads.py`'s, as for `/predict`; what happens to a correction after it is committed is
docs/feedback.md's.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mnist_pipeline.exported import Model
from mnist_pipeline.feedback.records import Record, correction
from mnist_pipeline.feedback.store import Store, StoreError, StoreFull, StoreUnavailable, Writer
from mnist_pipeline.serving.identity import Identity
from mnist_pipeline.serving.settings import Settings
from mnist_pipeline.serving.uploads import NO_FILE, Upload, as_upload, bounded_form, compact_json, error, prepared

IO_THREADS = 4  # per worker: rate-limit decisions waiting on the database at once


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


def refusal(exc: StoreError) -> Response:
    """503 with Retry-After for a store that is down or locked, 507 for a full one, 503 for a damaged one."""
    status = 507 if isinstance(exc, StoreFull) else 503
    response = error(status, str(exc))
    if isinstance(exc, StoreUnavailable):
        response.headers["Retry-After"] = "1"
    return response


class Collector:
    """POST /feedback: one worker's store handle and group-commit writer."""

    def __init__(self, settings: Settings) -> None:
        assert settings.feedback is not None
        # The command opened (and checked) the store before the workers: a worker only connects.
        self.store = Store(settings.feedback, settings.feedback_max_bytes, settings.feedback_min_free, check=False)
        self.writer = Writer(self.store)
        self.rate, self.burst = settings.feedback_rate, settings.feedback_burst
        # The rate decision waits on the database, not the CPU: a pool of its own keeps the CPU pool busy.
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="feedback-io")

    def submitter(self, who: Identity) -> str:
        """The pseudonym of a request's submitter (identity.py decides who that is)."""
        return self.store.submitter(who.kind, who.name)

    async def admitted(self, submitter: str) -> Response | None:
        """None if `submitter` may send one more correction now; else the 429 (or the store's refusal)."""
        try:
            # A SQLite store's mapped table decides in microseconds, on the loop, unless another process holds it.
            wait = self.store.try_wait(submitter, self.rate, self.burst)
            if wait is None:
                wait = await asyncio.get_running_loop().run_in_executor(
                    self.io, self.store.wait, submitter, self.rate, self.burst
                )
        except StoreError as exc:
            return refusal(exc)
        if not wait:
            return None
        response = error(429, f"too many corrections from this submitter; retry in {math.ceil(wait)} s")
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response

    def scored(self, model: Model, upload: Upload, label: int, submitter: str, max_pixels: int) -> Record | Response:
        """The correction to record, or the refusal: CPU work, run in the worker's pool."""
        entry, kind, data = upload
        digit = prepared(entry, kind, data, max_pixels)
        if digit is None:
            return error(entry["status"], entry["error"])
        probs = model.probabilities(digit[None])[0]
        return correction(digit, label, probs, model.sha256, submitter, "web", data, kind)

    async def commit(self, record: Record) -> Response:
        """201 once the transaction holding `record` has committed durably; else the store's refusal."""
        try:
            await asyncio.wrap_future(self.writer.submit(record))
        except StoreError as exc:
            return refusal(exc)
        return Response(
            compact_json({"id": record.id, "label": record.label, "digit": record.answer}),
            status_code=201,
            media_type="application/json",
        )
