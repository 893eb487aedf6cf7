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

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mnist_pipeline.datasets import DATASETS
from mnist_pipeline.engine import Distillation, Trainer, predict_logits, seed_everything
from mnist_pipeline.fileio import write_json
from mnist_pipeline.models import build_model, count_parameters
from mnist_pipeline.params import Params, apply_overrides, load_params
from mnist_pipeline.processed import SPLITS, Stats, load_split, load_stats

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


def clone(folder: Path, name: str, shared_cache: bool = True) -> Path:
    """A fresh clone of this repository at HEAD in folder/name. With `shared_cache`, it uses this workspace's
    DVC cache and its outputs are checked out; without, it starts as a newcomer's clone does: nothing cached."""
    repo = folder / name
    run(["git", "clone", "-q", str(ROOT), str(repo)], folder)
    if shared_cache:
        run([DVC, "config", "--local", "cache.dir", str(ROOT / ".dvc" / "cache")], repo)
        run([DVC, "checkout", "-q"], repo)
    return repo


def timed_stages(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Run a `dvc repro`: (its wall seconds, {stage: seconds from its "Running stage" line to the next})."""
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    output = []
    with subprocess.Popen(cmd, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if found := re.match(r"Running stage '([^']+)'", line):
                marks.append((found[1], time.perf_counter()))
    total = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{''.join(output)}")
    ends = [t for _, t in marks[1:]] + [start + total]
    return total, {name: round(end - begin, 1) for (name, begin), end in zip(marks, ends, strict=True)}


# ---------------------------------------------------------------- training recipes at several seeds

SEEDS = (1, 2, 3, 4, 5)
VIEWS = (1, 5, 9)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Recipe:
    """`dvc exp run -S` overrides of params.yaml; `teacher` names the recipe whose model of the same
    seed it distils from (its logits for the train split, one inference pass, count to its seconds)."""

    name: str
    lever: str
    overrides: list[str]
    teacher: str | None = None
    distill: tuple[float, float] = (0.0, 1.0)  # (weight, temperature)


def recipe_params(recipe: Recipe, seed: int, base: Params | None = None) -> Params:
    """params.yaml (or `base`) with the recipe's overrides at `seed`: what `dvc exp run -S` would train."""
    return apply_overrides(base or defaults(), recipe.overrides + [f"seed={seed}"])


def trained_with(params: Params) -> dict:
    """Everything of `params` that train_and_score reads (tests/test_bench_provenance.py compares it with the keys
    depends.py declares): the model, its architecture and views, its recipe."""
    return {"model": params.model, "kwargs": params.model_kwargs(), "train": params.train.model_dump()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((logits.argmax(1) == labels).double().mean()), 4)


def train_and_score(recipe: Recipe, seed: int, data: dict, norm: Stats,
                    teachers: dict[tuple[str, int], nn.Module]) -> tuple[dict, nn.Module]:
    """Seed, build, train (as the train stage does) and score one recipe: val and test accuracy with 1, 5
    and 9 test-time views of the kept epoch's weights; with its model, to be a later recipe's teacher."""
    params = recipe_params(recipe, seed)
    used = trained_with(params)
    seed_everything(seed)
    model = build_model(used["model"], **used["kwargs"])
    distill, teacher_pass = None, 0.0
    if recipe.teacher:
        start = time.perf_counter()
        logits = predict_logits(teachers[recipe.teacher, seed], data["train"][0], norm.mean, norm.std, 1000, CPU)
        teacher_pass = time.perf_counter() - start
        distill = Distillation(logits, *recipe.distill)
    trainer = Trainer(model, data["train"], data["val"], params.train, norm.mean, norm.std, seed, CPU, distill)
    seconds = trainer.fit() + teacher_pass
    model.load_state_dict(trainer.best.weights())  # the checkpoint the train stage would write
    row: dict[str, float | int | str] = {"seed": seed, "model": used["model"], "train_seconds": round(seconds, 2),
                                         "best_epoch": trainer.best.epoch}
    for views in VIEWS:
        model.views = views
        for split in ("val", "test"):
            x, y = data[split]
            row[f"{split}_acc_views{views}"] = accuracy(predict_logits(model, x, norm.mean, norm.std, 1000, CPU), y)
    model.views = 1
    print(f"  {recipe.name} seed {seed}: {seconds:.1f} s, val {row['val_acc_views1']:.4f}, "
          f"test {row['test_acc_views1']:.4f} (5 views {row['test_acc_views5']:.4f}, "
          f"9 views {row['test_acc_views9']:.4f})", flush=True)
    return row, model


def summarise(recipe: Recipe, runs: list[dict], params: int) -> dict:
    """A recipe's runs with mean ± std of each figure over the seeds."""
    def stat(key: str) -> dict:
        values = [r[key] for r in runs]
        return {"mean": round(statistics.mean(values), 5), "std": round(statistics.stdev(values), 5)}

    return {"name": recipe.name, "model": runs[0]["model"], "lever": recipe.lever, "overrides": recipe.overrides,
            "teacher": recipe.teacher, "distill": list(recipe.distill) if recipe.teacher else None,
            "params": params, "seeds": runs, "train_seconds": stat("train_seconds"),
            **{f"{split}_acc_views{v}": stat(f"{split}_acc_views{v}") for v in VIEWS for split in ("val", "test")}}


def measure(recipes: list[Recipe], seeds: tuple[int, ...] = SEEDS,
            after_round: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every recipe at every seed, seed by seed (seed 1 of each, then seed 2, …) so that the machine's drift
    over the run falls on all alike; a teacher recipe must come before its students. `after_round` gets the
    summaries after each round from the second on (a mean ± std needs two seeds)."""
    data, norm = processed(), stats()
    teachers: dict[tuple[str, int], nn.Module] = {}
    runs: dict[str, list[dict]] = {r.name: [] for r in recipes}
    sizes: dict[str, int] = {}
    summaries: list[dict] = []
    for seed in seeds:
        for recipe in recipes:
            if seed == seeds[0]:
                print(f"{recipe.name}: `dvc exp run {' '.join('-S ' + o for o in recipe.overrides)}`", flush=True)
            row, model = train_and_score(recipe, seed, data, norm, teachers)
            runs[recipe.name].append(row)
            sizes[recipe.name] = count_parameters(model)
            teachers[recipe.name, seed] = model
        if seed != seeds[0]:
            summaries = [summarise(r, runs[r.name], sizes[r.name]) for r in recipes]
            if after_round:
                after_round(summaries)
    return summaries
