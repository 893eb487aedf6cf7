"""Tiny generated MNIST-format datasets, so tests never touch the network."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import torch

from mnist_pipeline.datasets import DATASETS

SPEC = DATASETS["mnist"]


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """Serialise a uint8 tensor as an IDX payload (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, tensor.ndim]) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    return header + tensor.to(torch.uint8).contiguous().numpy().tobytes()


# One fixed 7×7 binary glyph per class, shared by every generated dataset.
GLYPHS = torch.rand(10, 7, 7, generator=torch.Generator().manual_seed(1234)) > 0.5


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: the class's glyph drawn 14×14 at a jittered position, on noise,
    in a class-specific brightness (a cue even a two-layer, globally pooled CNN learns in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.int32)
    offsets = torch.randint(4, 11, (n, 2), generator=g)
    for i, y in enumerate(labels.tolist()):
        glyph = GLYPHS[y].repeat_interleave(2, 0).repeat_interleave(2, 1)
        r, c = offsets[i].tolist()
        images[i, r : r + 14, c : c + 14][glyph] = 93 + 18 * y
    return images.to(torch.uint8), labels.to(torch.uint8)


def write_mirror(folder: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Write the four .gz files of a tiny dataset into `folder`; return a MNIST_CHECKSUMS json."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_digits(n_train, seed)
    test_x, test_y = synthetic_digits(n_test, seed + 1)
    pins = {}
    for spec, tensor in ((SPEC.train_images, train_x), (SPEC.train_labels, train_y),
                         (SPEC.test_images, test_x), (SPEC.test_labels, test_y)):
        payload = idx_bytes(tensor)
        (folder / spec.name).write_bytes(gzip.compress(payload, mtime=0))
        pins[spec.name] = hashlib.sha256(payload).hexdigest()
    checksums = folder.parent / f"{folder.name}-checksums.json"
    checksums.write_text(json.dumps(pins))
    return checksums
