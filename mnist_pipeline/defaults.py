"""Defaults the commands share: where the exported model is, and the bounds on what a user hands in.

`mnist-serve`, `mnist-predict` and `mnist-feedback` all read them, so they live below all three
(importing nothing) rather than in one command's module that the others would reach up into.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = Path("models/export/model.onnx")  # what the export stage writes
DEFAULT_MAX_UPLOAD = 4 << 20  # bytes per request or file: a phone photo fits, a flood does not
DEFAULT_FEEDBACK_MAX_BYTES = 1 << 30  # the feedback store's bound; past it, 507
DEFAULT_FEEDBACK_MIN_FREE = 256 << 20  # a SQLite store refuses rather than take its disk's last bytes: 507
