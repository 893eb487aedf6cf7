"""The processed-data folder: split files and stats.json, written and read here only.

    data/processed/{train,val,test}.pt   {"images": uint8 N×28×28, "labels": int64 N}
    data/processed/stats.json            dataset, classes, normalisation mean/std (train split), counts

Every reader checks what it gets and names the file when it is not what preprocess
wrote, so a stale or damaged folder is one clear error, not a traceback.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mnist_pipeline.errors import DatasetError
from mnist_pipeline.fileio import write_json, write_torch

SPLITS = ("train", "val", "test")
STATS = "stats.json"
Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Stats:
    dataset: str
    classes: list[str]
    mean: float
    std: float
    counts: dict[str, int]


def split_path(folder: Path, name: str) -> Path:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
    return folder / f"{name}.pt"


def save(folder: Path, splits: dict[str, Split], stats: Stats) -> None:
    for name, (images, labels) in splits.items():
        write_torch(split_path(folder, name), {"images": images.contiguous(), "labels": labels.contiguous()})
    write_json(folder / STATS, asdict(stats))


def load_split(folder: Path, name: str) -> Split:
    """Load one split, checking what it holds; errors name the file."""
    path = split_path(folder, name)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (run `dvc repro preprocess`)") from None
    except Exception as exc:  # a truncated zip, a pickled object: all mean "not our file"
        raise DatasetError(f"{path}: not a readable tensor file ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or set(blob) != {"images", "labels"}:
        raise DatasetError(f"{path}: expected a dict with 'images' and 'labels'")
    images, labels = blob["images"], blob["labels"]
    if (
        not isinstance(images, torch.Tensor)
        or not isinstance(labels, torch.Tensor)
        or images.dtype != torch.uint8
        or images.ndim != 3
        or labels.dtype != torch.int64
        or labels.shape != images.shape[:1]
    ):
        raise DatasetError(
            f"{path}: expected uint8 images N×H×W and int64 labels N, got "
            f"{getattr(images, 'dtype', type(images).__name__)} {list(getattr(images, 'shape', []))} and "
            f"{getattr(labels, 'dtype', type(labels).__name__)} {list(getattr(labels, 'shape', []))}"
        )
    return images, labels


def load_stats(folder: Path) -> Stats:
    """Read and validate stats.json; errors name the file and the bad field."""
    path = folder / STATS
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (run `dvc repro preprocess`)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc}); run `dvc repro -f preprocess`") from None
    fields = ("dataset", "classes", "mean", "std", "counts")
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise DatasetError(f"{path}: expected an object with exactly {', '.join(fields)}")
    number = (int, float)
    checks = {
        "dataset": isinstance(raw["dataset"], str),
        "classes": isinstance(raw["classes"], list)
        and len(raw["classes"]) >= 2
        and all(isinstance(c, str) for c in raw["classes"]),
        "mean": isinstance(raw["mean"], number) and not isinstance(raw["mean"], bool) and math.isfinite(raw["mean"]),
        "std": isinstance(raw["std"], number)
        and not isinstance(raw["std"], bool)
        and math.isfinite(raw["std"])
        and raw["std"] > 0,
        "counts": isinstance(raw["counts"], dict) and all(isinstance(v, int) for v in raw["counts"].values()),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise DatasetError(f"{path}: invalid {bad[0]} {raw[bad[0]]!r}; run `dvc repro -f preprocess`")
    return Stats(**raw)
