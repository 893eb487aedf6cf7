"""The curate stage's two outputs, admitted/ and users/: uint8 images and int64 labels as .npy files.

numpy's own format, read back with `allow_pickle=False`: the train and evaluate stages load them
without pickle and without the store's code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnist_pipeline.errors import DatasetError
from mnist_pipeline.fileio import write_bytes, write_json

if TYPE_CHECKING:
    from mnist_pipeline.feedback.records import Record


def arrays(records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×28×28 images (as MNIST's are stored) and int64 labels."""
    if not records:
        return np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64)
    images = np.stack([r.image for r in records if r.image is not None])
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), np.array([r.label for r in records], np.int64)


def save(folder: Path, records: list[Record], meta: dict[str, Any] | None = None) -> None:
    """images.npy, labels.npy (numpy's own format: readable without pickle) and an optional meta.json."""
    images, labels = arrays(records)
    for name, array in (("images", images), ("labels", labels)):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        write_bytes(folder / f"{name}.npy", buffer.getvalue())
    if meta is not None:
        write_json(folder / "meta.json", meta)


def load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """What `save` wrote, checked; errors name the folder."""
    try:
        images = np.load(folder / "images.npy", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{folder}: not a curated split ({exc}); run `dvc repro curate`") from None
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise DatasetError(f"{folder}: expected uint8 N×28×28 images and N labels; run `dvc repro curate`")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{folder}: labels outside 0–9; run `dvc repro curate`")
    return images, labels


def load_or_empty(folder: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """`load(folder)`, or no images when the stage was run without one (outside the pipeline)."""
    return arrays([]) if folder is None else load(folder)
