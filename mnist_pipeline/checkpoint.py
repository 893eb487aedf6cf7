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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_pipeline.fileio import sha256_file, write_torch
from mnist_pipeline.models import build_model

FORMAT = "mnist-pipeline-checkpoint/1"
REQUIRED_KEYS = ("format", "model", "model_kwargs", "state_dict", "normalisation", "classes", "params", "data")


class CheckpointError(RuntimeError):
    pass


def make_checkpoint(
    model_name: str,
    model_kwargs: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    normalisation: dict[str, float],
    classes: list[str],
    params: dict[str, Any],
    data: dict[str, str],
    best: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "state_dict": state_dict,
        "normalisation": normalisation,
        "classes": classes,
        "params": params,
        "data": data,
        "best": best,
    }


def _load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except Exception as exc:  # UnpicklingError for pickled code, RuntimeError for a broken zip
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a valid {what} (it is corrupt, truncated, or carries pickled objects, "
            f"which weights_only loading refuses): {first}"
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = _load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (written by `stages/train.py`)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    model = build_model(ckpt["model"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def data_hashes(paths: dict[str, Path]) -> dict[str, str]:
    return {name: sha256_file(path) for name, path in paths.items()}


def fingerprint(params: dict[str, Any], data: dict[str, str], code_files: list[Path]) -> str:
    """What a training run depends on: its params, its data and the code that trains."""
    digest = hashlib.sha256(json.dumps({"params": params, "data": data, "torch": torch.__version__},
                                       sort_keys=True).encode())
    for path in sorted(code_files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def resume_path(folder: Path, key: str) -> Path:
    return folder / f"{key[:20]}.pt"


def save_resume_state(folder: Path, key: str, state: dict[str, Any]) -> Path:
    path = resume_path(folder, key)
    write_torch(path, {"fingerprint": key, "state": state})
    return path


def load_resume_state(folder: Path, key: str) -> dict[str, Any] | None:
    """The state saved for exactly this fingerprint, or None."""
    path = resume_path(folder, key)
    if not path.exists():
        return None
    blob = _load(path, "resume state")
    if not isinstance(blob, dict) or blob.get("fingerprint") != key:
        return None
    return blob["state"]
