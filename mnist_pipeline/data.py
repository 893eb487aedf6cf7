"""The seeded stratified split, normalisation, batching and augmentation.

Data stays as uint8 tensors (N×28×28, 47 MB for all of MNIST) and is normalised on
the fly; batches are slices of a seeded permutation and augmentation is one
batched affine warp — no per-sample Python, PIL or DataLoader workers in the loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.errors import DatasetError


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val), each sorted, with every class in val in proportion to its share.

    Per-class quotas use the largest-remainder method so they add up to exactly
    `val_size`; ties go to the lower class index, so the split depends only on the seed.
    """
    n = len(labels)
    if not 0 < val_size < n:
        # params.py bounds val_size by the registry's size; this is a smaller (private or test) dataset.
        raise DatasetError(
            f"data.val_size = {val_size}: this dataset has only {n} training images; set it between 1 and {n - 1}"
        )
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_size / n
    quota = exact.floor().long()
    remainder = exact - quota
    order = sorted(range(len(classes)), key=lambda i: (-float(remainder[i]), i))
    for i in order[: val_size - int(quota.sum())]:
        quota[i] += 1
    generator = torch.Generator().manual_seed(seed)
    val_parts = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        val_parts.append(members[torch.randperm(len(members), generator=generator)[:k]])
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[torch.cat(val_parts)] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def normalisation_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of pixel intensity in [0, 1], in float64 so the result is exact to reproduce."""
    x = images.double().div_(255.0)
    return float(x.mean()), float(x.std())


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W → float N×1×H×W in [0, 1] (ink 1, background 0)."""
    return images.unsqueeze(1).float().div_(255.0)


def standardise(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """[0, 1] pixels → model input, with the train-split statistics: the one normalisation rule. Training,
    evaluation and the exported graphs (`Standardise`) all call it, so `mnist-predict` and `mnist-serve`
    feed [0, 1] pixels and never restate it."""
    return (x - mean) / std


class Standardise(nn.Module):
    """`standardise` as the first layer of an exported model, its statistics baked in."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return standardise(x, self.mean, self.std)


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 N×H×W → float N×1×H×W, standardised with the train-split statistics."""
    return standardise(to_unit(images), mean, std)


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Slices of a seeded permutation (or of 0..n-1 without a generator)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def elastic_field(
    n: int, h: int, w: int, alpha: float, sigma: float, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Random smooth displacements N×H×W×2 in grid_sample's normalised units (Simard et al. 2003):
    uniform noise in [-1, 1] per pixel and axis, blurred by a Gaussian of σ = `sigma` pixels, times
    `alpha` pixels.

    The blurred field has no detail finer than σ, so it is made on a grid `stride` = ⌊σ⌋ times
    coarser and resized: noise averaged over stride² pixels has 1/stride of the std, and a blur of
    σ/stride there gives the same field statistics at stride² times less work (a full-size blur
    costs a CNN's training step a third more)."""
    stride = max(1, min(int(sigma), h, w))
    ch, cw = math.ceil(h / stride), math.ceil(w / stride)
    noise = torch.rand(n, 2, ch, cw, generator=generator).mul_(2 / stride).sub_(1 / stride).to(like.device, like.dtype)
    s = sigma / stride
    radius = math.ceil(3 * s)
    taps = torch.arange(-radius, radius + 1, device=like.device, dtype=like.dtype)
    kernel = torch.exp(-0.5 * (taps / s) ** 2)
    kernel /= kernel.sum()
    noise = F.conv2d(noise, kernel.view(1, 1, 1, -1).expand(2, 1, 1, -1), padding=(0, radius), groups=2)
    noise = F.conv2d(noise, kernel.view(1, 1, -1, 1).expand(2, 1, -1, 1), padding=(radius, 0), groups=2)
    if stride > 1:
        noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
    to_grid = torch.tensor([2 * alpha / w, 2 * alpha / h], device=like.device, dtype=like.dtype)
    return noise.permute(0, 2, 3, 1) * to_grid


def random_affine(
    x: torch.Tensor,
    rotate: float,
    scale: float,
    shift: float,
    generator: torch.Generator,
    elastic: float = 0.0,
    elastic_sigma: float = 4.0,
) -> torch.Tensor:
    """Warp a batch N×C×H×W of [0, 1] images (background 0) with one random rotation
    (±degrees), zoom (±fraction) and shift (±pixels) per image, plus an elastic distortion of
    strength `elastic` pixels when it is above 0, in one grid_sample call."""
    n, _, h, w = x.shape
    draws = torch.rand(n, 4, generator=generator).mul_(2).sub_(1).to(x.device)  # uniform in [-1, 1)
    angle = draws[:, 0] * (rotate * math.pi / 180)
    zoom = 1 + draws[:, 1] * scale
    # The grid maps output to input coordinates, so it takes the inverse zoom, and
    # shifts in normalised [-1, 1] units (2 / size per pixel).
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = draws[:, 2] * (2 * shift / w), draws[:, 3] * (2 * shift / h)
    # The sampling grid maps each output pixel centre (normalised to [-1, 1], align_corners=False)
    # to an input position. Built by broadcasting rather than F.affine_grid, which takes 4.6×
    # as long for a batch of 256 on the 2-core CPU (benchmarks/results/ops.json).
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    ys = ((torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1)[:, None]
    cos, sin, tx, ty = (v.to(x.dtype)[:, None, None] for v in (cos, sin, tx, ty))
    grid = torch.stack([cos * xs - sin * ys + tx, sin * xs + cos * ys + ty], dim=-1)
    if elastic > 0:  # drawn after the affine parameters, so a run without it draws the same numbers as before
        grid = grid + elastic_field(n, h, w, elastic, elastic_sigma, generator, x)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def with_corrections(
    train: tuple[torch.Tensor, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, repeat: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The train split with users' admitted corrections appended `repeat` times (appended, so the
    split's own images keep their indices, and an empty set returns the split itself)."""
    if len(labels) == 0:
        return train
    return (
        torch.cat([train[0], images.repeat(repeat, 1, 1)]),
        torch.cat([train[1], labels.repeat(repeat)]),
    )


def label_logits(labels: torch.Tensor, classes: int, margin: float = 10.0) -> torch.Tensor:
    """Stand-in teacher logits that agree with `labels` (for corrections the teacher never saw)."""
    return torch.nn.functional.one_hot(labels, classes).float() * margin
