"""The IDX reader: MNIST-format files (gzip-compressed or not) → validated uint8 tensors.

Errors name the file and what is wrong with it (magic number, header, sizes, label
range), so a damaged or foreign file never becomes a silently wrong dataset.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import torch

from mnist_pipeline.datasets import IdxFile
from mnist_pipeline.errors import DatasetError

_IDX_UBYTE = 0x08


def parse_idx(data: bytes, name: str) -> torch.Tensor:
    """Parse an (uncompressed) IDX payload of unsigned bytes into a uint8 tensor."""
    if len(data) < 4:
        raise DatasetError(f"{name}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] == 0:
        raise DatasetError(
            f"{name}: bad magic number 0x{data[:4].hex()} (expected 0x00000801 for labels or 0x00000803 for images)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated header ({len(data)} bytes, {ndim} dimensions declared)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = 1
    for d in dims:
        size *= d
    if len(data) - header != size:
        raise DatasetError(
            f"{name}: header declares dimensions {list(dims)} ({size} bytes of data) "
            f"but the file holds {len(data) - header}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def read_idx(path: Path) -> torch.Tensor:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (run `dvc repro download`)") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: not a valid gzip file: {exc}") from None
    return parse_idx(raw, str(path))


def read_images(path: Path, size: tuple[int, int] = (28, 28)) -> torch.Tensor:
    images = read_idx(path)
    if images.ndim != 3 or tuple(images.shape[1:]) != size:
        raise DatasetError(f"{path}: expected images of shape N×{size[0]}×{size[1]}, got {list(images.shape)}")
    return images


def read_labels(path: Path, num_classes: int) -> torch.Tensor:
    labels = read_idx(path)
    if labels.ndim != 1:
        raise DatasetError(f"{path}: expected a 1-D label file, got shape {list(labels.shape)}")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DatasetError(f"{path}: label {int(labels.max())} is out of range (expected 0..{num_classes - 1})")
    return labels.long()


def read_split(folder: Path, images: IdxFile, labels: IdxFile, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_images(folder / images.payload)
    y = read_labels(folder / labels.payload, num_classes)
    if len(x) != len(y):
        raise DatasetError(
            f"{folder}: {images.payload} holds {len(x)} images but {labels.payload} holds {len(y)} labels"
        )
    return x, y
