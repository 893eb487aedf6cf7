"""Shared helpers for the benchmarks: machine description, data, timing, results.

Every benchmark compares against a baseline measured in the same run (this machine is
shared and noisy), reports medians over repeats and ratios, and writes
benchmarks/results/<name>.json; `python benchmarks/report.py` turns them into
benchmarks/results/results.md and the README's results table.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mnist_pipeline.datasets import DATASETS
from mnist_pipeline.processed import SPLITS, Stats, load_split, load_stats
from mnist_pipeline.fileio import write_json
from mnist_pipeline.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int = 2048) -> float:
    """This machine's fp32 matmul rate now: a shared machine's speed varies from hour to hour."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = median_time(lambda: a @ b, repeats=7, warmup=2)
    return 2 * n**3 / seconds / 1e9


def processed() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    folder = ROOT / "data" / "processed"
    if not (folder / "train.pt").exists():
        sys.exit("benchmarks read the processed DVC outputs: run `MNIST_MIRROR=... dvc repro preprocess` first")
    return {split: load_split(folder, split) for split in SPLITS}


def mnist_folder(root: Path) -> Path:
    """The raw files laid out as torchvision.datasets.MNIST expects them (uncompressed), under `root`."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in DATASETS["mnist"].files:
        # The download stage keeps the decompressed files, under the names torchvision reads.
        (raw / f.payload).write_bytes((ROOT / "data" / "raw" / "mnist" / f.payload).read_bytes())
    return root


def stats() -> Stats:
    return load_stats(ROOT / "data" / "processed")


def defaults() -> Params:
    return load_params(ROOT / "params.yaml")


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(name: str, results: dict[str, object]) -> Path:
    path = RESULTS / f"{name}.json"
    write_json(path, {"benchmark": name, "commit": git_rev(), "machine": machine(), **results})
    print(f"→ {path.relative_to(ROOT)}")
    return path
