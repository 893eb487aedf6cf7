"""Self-describing checkpoints and the resume state of an interrupted training.

A checkpoint carries what is needed to rebuild and use the model — model name and
kwargs, normalisation stats, class names, the params and the hashes of the data it
was trained on — and nothing that varies between runs (no timestamps, no paths),
so the same params and data give the same bytes. It holds only tensors and plain
containers and is always loaded with `weights_only=True`: a file carrying pickled
code is refused.

Resume state lives outside DVC's outputs (DVC deletes a stage's outputs before
running it) in a folder keyed by a fingerprint of params, data and code, so state
from other params or other code is never picked up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_pipeline.errors import CheckpointError, first_line
from mnist_pipeline.fileio import sha256_file, write_torch
from mnist_pipeline.models import build_model

FORMAT = "mnist-pipeline-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    model: str  # a key of models.MODELS
    model_kwargs: dict[str, Any]  # its params section, as build_model takes it
    state_dict: dict[str, torch.Tensor]
    normalisation: dict[str, float]  # {"mean", "std"} of the train split, pixel/255 units
    classes: list[str]
    params: dict[str, Any]  # the params sections training read
    data: dict[str, str]  # sha256 of the train and val split files
    best: dict[str, Any]  # {"epoch", "val_acc", "val_loss"} of the kept epoch

    def to_dict(self) -> dict[str, Any]:
        # The key order is part of the file's bytes: keep it.
        return {
            "format": FORMAT,
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "state_dict": self.state_dict,
            "normalisation": self.normalisation,
            "classes": self.classes,
            "params": self.params,
            "data": self.data,
            "best": self.best,
        }

    def build(self) -> nn.Module:
        """The model with its trained weights, in eval mode."""
        try:
            model = build_model(self.model, **self.model_kwargs)
            model.load_state_dict(self.state_dict)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint does not rebuild its {self.model!r} model: {first_line(exc)}") from None
        return model.eval()


def _load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except Exception as exc:  # UnpicklingError for pickled code, RuntimeError for a broken zip
        raise CheckpointError(
            f"{path}: not a valid {what} (it is corrupt, truncated, or carries pickled objects, "
            f"which weights_only loading refuses): {first_line(exc)}"
        ) from None


def load_teacher_logits(path: Path, images: int) -> torch.Tensor:
    """The teacher stage's soft targets: float logits, one row of 10 per training image."""
    logits = _load(path, "teacher logits file")
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or tuple(logits.shape) != (images, 10):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CheckpointError(
            f"{path}: expected the teacher's logits for the {images} training images "
            f"({images}×10 floats), found {shape}; run `dvc repro teacher`"
        )
    return logits


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    write_torch(path, checkpoint.to_dict())


def load_checkpoint(path: Path) -> Checkpoint:
    blob = _load(path, "checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (written by `stages/train.py`)")
    fields = [f for f in Checkpoint.__dataclass_fields__]
    missing = [k for k in fields if k not in blob]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    norm = blob["normalisation"]
    if (
        not isinstance(norm, dict)
        or not all(isinstance(norm.get(k), float) for k in ("mean", "std"))
        or not norm["std"] > 0
    ):
        raise CheckpointError(f"{path}: checkpoint has invalid normalisation {norm!r}")
    if not isinstance(blob["classes"], list) or not all(isinstance(c, str) for c in blob["classes"]):
        raise CheckpointError(f"{path}: checkpoint has invalid classes {blob['classes']!r}")
    if not isinstance(blob["state_dict"], dict) or not isinstance(blob["model_kwargs"], dict):
        raise CheckpointError(f"{path}: checkpoint has no usable state_dict or model_kwargs")
    return Checkpoint(**{k: blob[k] for k in fields})


def data_hashes(paths: dict[str, Path]) -> dict[str, str]:
    return {name: sha256_file(path) for name, path in paths.items()}


def fingerprint(params: dict[str, Any], data: dict[str, str], code_files: list[Path]) -> str:
    """What a training run depends on: its params, its data and the code that trains."""
    digest = hashlib.sha256(
        json.dumps({"params": params, "data": data, "torch": torch.__version__}, sort_keys=True).encode()
    )
    for path in sorted(code_files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class ResumeStore:
    """The saved training state for one fingerprint: `folder/<key[:20]>.pt`."""

    def __init__(self, folder: Path, key: str):
        self.key = key
        self.path = folder / f"{key[:20]}.pt"

    def load(self) -> dict[str, Any] | None:
        """The state saved for exactly this fingerprint, or None."""
        if not self.path.exists():
            return None
        blob = _load(self.path, "resume state")
        if not isinstance(blob, dict) or blob.get("fingerprint") != self.key:
            return None
        return blob["state"]

    def save(self, state: dict[str, Any]) -> None:
        write_torch(self.path, {"fingerprint": self.key, "state": state})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
