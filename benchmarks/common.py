"""Shared helpers for the benchmarks: machine description, data, timing, results.

Every benchmark compares against a baseline measured in the same run (this machine is
shared and noisy), reports medians over repeats and ratios, and writes
benchmarks/results/<name>.json; `python benchmarks/report.py` turns them into
benchmarks/results/results.md and the README's results table.

A results file names the commit of the code that ran. The working tree is read when the
benchmark starts and again when it saves: if either differs from HEAD (results files and
prose excepted), `save` refuses, unless MNIST_BENCH_ALLOW_DIRTY=1, and then the file says
`"dirty": true` with a SHA-256 of the difference. Commit the benchmark, then measure.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
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
DVC = shutil.which("dvc") or "dvc"
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


ALLOW_DIRTY_ENV = "MNIST_BENCH_ALLOW_DIRTY"
# Outputs and prose: editing them does not change what a benchmark runs.
NOT_CODE = (":(exclude)benchmarks/results", ":(exclude)*.md", ":(exclude)docs")


def _git(root: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout


def provenance(root: Path = ROOT) -> dict[str, object]:
    """{"commit": HEAD, "dirty": bool[, "diff_sha256": …]}: the code in `root`'s working tree."""
    try:
        head = _git(root, "rev-parse", "HEAD").decode().strip()
        changed = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--", ".", *NOT_CODE)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": True}
    if not changed:
        return {"commit": head, "dirty": False}
    digest = hashlib.sha256(_git(root, "diff", "HEAD", "--binary", "--", ".", *NOT_CODE))
    for name in sorted(filter(None, _git(root, "ls-files", "-o", "--exclude-standard", "-z", "--", ".",
                                         *NOT_CODE).split(b"\0"))):
        digest.update(name + b"\0" + (root / name.decode()).read_bytes())
    return {"commit": head, "dirty": True, "diff_sha256": digest.hexdigest()}


STARTED = provenance()  # the code as the benchmark started (imported first thing by every benchmark)


def traced(started: dict[str, object], now: dict[str, object], allow_dirty: bool) -> dict[str, object]:
    """What a results file records about its code; SystemExit when it cannot be traced to a commit."""
    if started == now and not now["dirty"]:
        return now
    if not allow_dirty:
        what = "changed while it ran" if started != now else "has uncommitted changes"
        raise SystemExit(f"not recording: the working tree {what} (git status), so no commit names the code "
                         f"that ran. Commit, then measure; or set {ALLOW_DIRTY_ENV}=1 to record it marked dirty.")
    return {**now, "dirty": True, "diff_sha256": now.get("diff_sha256", started.get("diff_sha256"))}


def load(name: str) -> dict | None:
    """A results file's contents, or None when there is none yet."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def save(name: str, results: dict[str, object]) -> Path:
    path = RESULTS / f"{name}.json"
    code = traced(STARTED, provenance(), os.environ.get(ALLOW_DIRTY_ENV) == "1")
    write_json(path, {"benchmark": name, **code, "machine": machine(), **results})
    print(f"→ {path.relative_to(ROOT)}")
    return path


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """A command's stdout; the benchmark ends with its output when it fails."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def clone(folder: Path, name: str) -> Path:
    """A clone of this repository at HEAD in folder/name, sharing this workspace's DVC cache, its outputs checked out."""
    repo = folder / name
    run(["git", "clone", "-q", str(ROOT), str(repo)], folder)
    run([DVC, "config", "--local", "cache.dir", str(ROOT / ".dvc" / "cache")], repo)
    run([DVC, "checkout", "-q"], repo)
    return repo
