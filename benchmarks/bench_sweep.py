"""mnist-sweep against `dvc queue` on this machine: the same 8 real-MNIST trials both ways.

    MNIST_MIRROR=/path/to/mnist python benchmarks/bench_sweep.py       # after `dvc repro` in this workspace

Each side works in its own clone of this repository at HEAD, sharing this workspace's DVC
cache (so the processed data is there, as a team's remote would have it):
- queue: `dvc exp run --queue` with the grid, then `OMP_NUM_THREADS=1 dvc queue start -j 2`
  (queue.json's best setting on 2 cores), timed until the queue is empty;
- sweep: `mnist-sweep` with the same grid, `--cpus-per-trial 1` on the local default (Ray
  started on this machine with its 2 CPUs: 2 trials at a time), timed as a command.
Then the sweep's fixed costs: Ray's start (command start to its "sweeping" line) and one
trial that trains nothing (clone, `dvc exp run` finding every stage up to date, `dvc push`,
`dvc exp push`), and from them the expected time of the same sweep on N machines.
Writes benchmarks/results/sweep_cluster.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SWEEP = shutil.which("mnist-sweep") or "mnist-sweep"
GRID = ["mlp.train.epochs=6", "mlp.train.lr=0.05,0.1", "mlp.train.batch_size=128,256", "seed=1,2"]
TRIALS = 8


def queue(repo: Path, env: dict[str, str]) -> float:
    common.run([common.DVC, "exp", "run", "--queue", *[a for o in GRID for a in ("-S", o)]], repo, env)
    start = time.perf_counter()
    common.run([common.DVC, "queue", "start", "-j", "2"], repo, {**env, "OMP_NUM_THREADS": "1"})
    while True:
        status = common.run([common.DVC, "queue", "status"], repo, env)
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(2)
    seconds = time.perf_counter() - start
    done = status.count("Success")
    if done != TRIALS:
        sys.exit(f"dvc queue: {done} of {TRIALS} succeeded:\n{status}")
    return seconds


def sweep(repo: Path, env: dict[str, str], overrides: list[str], out: Path) -> tuple[float, float, dict]:
    """(wall seconds, seconds until the 'sweeping' line, summary) of one mnist-sweep command."""
    start = time.perf_counter()
    proc = subprocess.Popen(["unshare", "--fork", "--pid", "--mount-proc", "--kill-child=KILL", "--", SWEEP,
                             *[a for o in overrides for a in ("-S", o)], "--cpus-per-trial", "1", "--out", str(out)],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = None
    for line in proc.stdout:
        if started is None and line.startswith("sweeping "):
            started = time.perf_counter() - start
        print("   ", line.rstrip(), flush=True)
    err = proc.stderr.read()
    if proc.wait():
        sys.exit(f"mnist-sweep failed:\n{err[-3000:]}")
    return time.perf_counter() - start, started or float("nan"), json.loads((out / "summary.json").read_text())


def main() -> None:
    if not (common.ROOT / "data" / "processed" / "train.pt").exists():
        sys.exit("run `MNIST_MIRROR=... dvc repro` first: both sides start from the reproduced pipeline")
    # Loopback only, no usage report, no token file left in ~/.ray by the local instance.
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"dvc queue, -j 2 × 1 thread, {TRIALS} trials: {' '.join(GRID)}", flush=True)
        queue_seconds = queue(common.clone(tmp, "queue"), {**env, "PYTHONPATH": str(tmp / "queue")})
        print(f"  {queue_seconds:.1f} s", flush=True)
        repo = common.clone(tmp, "sweep")
        print("mnist-sweep, 2 trials × 1 CPU, the same trials:", flush=True)
        sweep_seconds, ray_start, summary = sweep(repo, env, GRID, tmp / "out")
        if summary["ran"] != TRIALS:
            sys.exit(f"mnist-sweep ran {summary['ran']} of {TRIALS} trials")
        print(f"  {sweep_seconds:.1f} s ({sweep_seconds / queue_seconds:.2f}× the queue's)", flush=True)
        print("mnist-sweep, one trial that trains nothing (its fixed cost):", flush=True)
        _, _, noop = sweep(repo, env, ["seed=42"], tmp / "noop")
    trial_seconds = [t["seconds"] for t in summary["trials"]]
    fixed = noop["trials"][0]["seconds"]
    mean_trial = sum(trial_seconds) / len(trial_seconds)
    # N machines of this kind, 2 trials each at a time: rounds of 2N trials, plus Ray's start.
    expected = {n: round(ray_start + math.ceil(TRIALS / (2 * n)) * mean_trial, 1) for n in (1, 2, 4)}
    common.save("sweep_cluster", {
        "trials": TRIALS, "grid": GRID, "queue_seconds": round(queue_seconds, 1),
        "sweep_seconds": round(sweep_seconds, 1), "sweep_vs_queue": round(sweep_seconds / queue_seconds, 2),
        "ray_start_seconds": round(ray_start, 1), "fixed_seconds_per_trial": fixed,
        "trial_seconds": trial_seconds, "mean_trial_seconds": round(mean_trial, 1),
        "expected_seconds_on_n_machines": expected, "gpu": "untested: no GPU machine in this run"})


if __name__ == "__main__":
    main()
