"""Micro-benchmarks behind three speed choices the code's comments cite, each against its
alternative in the same run (interleaved rounds, medians; the host is noisy):

    python benchmarks/bench_ops.py

- pool placement: the project's CNN (max-pool right after a stage's last conv, before
  BatchNorm and ReLU) against the textbook conv → BN → ReLU → pool with the same widths;
  one SGD training step on a batch of 256 (models.py). Their accuracy is compared by
  training, not here: see README "Results".
- memory format: the same CNN's training step in channels_last against contiguous NCHW
  (engine.uses_channels_last).
- sampling grid: the augmentation's grid built by broadcasting against F.affine_grid from
  the same 2×3 matrices, batch 256 (data.random_affine).

Writes benchmarks/results/ops.json.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

import common  # noqa: E402
from mnist_pipeline.models import CNN

BATCH, ROUNDS, STEPS = 256, 7, 10


def cnn_pool_last(channels: list[list[int]], num_classes: int = 10) -> nn.Module:
    """conv → BN → ReLU per layer, 2×2 max-pool after each stage but the last (the textbook order)."""
    layers: list[nn.Module] = []
    width = 1
    for i, stage in enumerate(channels):
        for out in stage:
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def train_step(model: nn.Module, channels_last: bool) -> Callable[[], None]:
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, 1, 28, 28)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = torch.randint(0, 10, (BATCH,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def grids() -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    draws = torch.rand(BATCH, 4, generator=g) * 2 - 1
    cos, sin = torch.cos(draws[:, 0]), torch.sin(draws[:, 0])
    tx, ty = draws[:, 2] * 0.1, draws[:, 3] * 0.1
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # N×2×3

    def broadcast() -> torch.Tensor:  # as data.random_affine builds it
        xs = (torch.arange(28, dtype=torch.float32) * 2 + 1) / 28 - 1
        ys = ((torch.arange(28, dtype=torch.float32) * 2 + 1) / 28 - 1)[:, None]
        c, s, a, b = (v[:, None, None] for v in (cos, sin, tx, ty))
        return torch.stack([c * xs - s * ys + a, s * xs + c * ys + b], dim=-1)

    def affine() -> torch.Tensor:
        return F.affine_grid(theta, [BATCH, 1, 28, 28], align_corners=False)

    assert torch.allclose(broadcast(), affine(), atol=1e-5), "the two grids must be the same grid"
    return broadcast, affine


def compare(fns: dict[str, Callable[[], object]], steps: int = STEPS) -> dict[str, float]:
    """Median milliseconds per call, rounds interleaved so that load spikes hit every side."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            samples[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: round(statistics.median(v), 3) for name, v in samples.items()}


def main() -> None:
    channels = [list(s) for s in common.defaults().cnn.channels]
    torch.manual_seed(0)
    ours = CNN(channels, 0.0)
    pool = compare({"pool_before_bn_relu": train_step(ours, True),
                    "pool_after_bn_relu": train_step(cnn_pool_last(channels), True)})
    memory = compare({"channels_last": train_step(CNN(channels, 0.0), True),
                      "contiguous_nchw": train_step(CNN(channels, 0.0), False)})
    broadcast, affine = grids()
    grid = compare({"broadcast": broadcast, "affine_grid": affine}, steps=200)
    results = {
        "batch": BATCH, "cnn_channels": channels,
        "pool_placement_ms_per_step": pool,
        "pool_before_speedup": round(pool["pool_after_bn_relu"] / pool["pool_before_bn_relu"], 2),
        "memory_format_ms_per_step": memory,
        "channels_last_speedup": round(memory["contiguous_nchw"] / memory["channels_last"], 2),
        "grid_ms": grid,
        "broadcast_grid_speedup": round(grid["affine_grid"] / grid["broadcast"], 2),
    }
    for key in ("pool_before_speedup", "channels_last_speedup", "broadcast_grid_speedup"):
        print(f"{key}: {results[key]}×")
    common.save("ops", results)


if __name__ == "__main__":
    main()
