"""How many `dvc queue` workers on this machine, and how many torch threads each.

    MNIST_MIRROR=/path/to/mnist python benchmarks/bench_queue.py [--experiments 4] [--epochs 4]

In a fresh clone of this repository (committed state, real MNIST), queues the same kind
of sweep three times — different seeds each time, so no result comes from DVC's
run-cache — and times `dvc queue start -j N` until the queue is empty:

  - j1 × all threads: one worker, torch on every core (the default)
  - j2 × 1 thread:    two workers, OMP_NUM_THREADS=1 each (cores split between them)
  - j2 × all threads: two workers that each take every core (oversubscribed)

Workers inherit the environment of `dvc queue start`, so OMP_NUM_THREADS set there is
what each experiment's torch uses. Writes benchmarks/results/queue.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

import common  # noqa: E402

DVC = shutil.which("dvc") or "dvc"
CONFIGS = [("j1 x all threads", 1, None), ("j2 x 1 thread", 2, "1"), ("j2 x all threads", 2, None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=4, help="experiments per sweep (4)")
    parser.add_argument("--epochs", type=int, default=4, help="mlp.train.epochs of each experiment (4)")
    args = parser.parse_args()
    if "MNIST_MIRROR" not in os.environ:
        raise SystemExit("set MNIST_MIRROR (the benchmark downloads real MNIST into a fresh clone)")
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        repo = common.clone(Path(tmp), "repo", shared_cache=False)
        env["PYTHONPATH"] = str(repo)
        common.run([DVC, "repro", "preprocess"], repo, env)  # the data, once
        rows, seed = {}, 100
        for label, workers, threads in CONFIGS:
            for _ in range(args.experiments):
                seed += 1
                common.run([DVC, "exp", "run", "--queue", "-S", f"seed={seed}", "-S", f"mlp.train.epochs={args.epochs}",
                    "-n", f"q{seed}"], repo, env)
            run_env = {**env, **({"OMP_NUM_THREADS": threads} if threads else {})}
            start = time.perf_counter()
            common.run([DVC, "queue", "start", "-j", str(workers)], repo, run_env)
            while any(s in common.run([DVC, "queue", "status"], repo, env) for s in ("Queued", "Running")):
                time.sleep(1)
            seconds = time.perf_counter() - start
            failed = common.run([DVC, "queue", "status"], repo, env).count("Failed")
            rows[label] = {"workers": workers, "omp_num_threads": threads or "unset (all cores)",
                           "seconds": round(seconds, 1), "seconds_per_experiment": round(seconds / args.experiments, 1),
                           "failed": failed}
            print(f"{label}: {seconds:.1f} s for {args.experiments} experiments ({failed} failed)")
    base = rows[CONFIGS[0][0]]["seconds"]
    for row in rows.values():
        row["speedup_vs_j1"] = round(base / row["seconds"], 2)
    best = min(rows, key=lambda k: rows[k]["seconds"])
    common.save("queue", {"experiments": args.experiments, "epochs": args.epochs, "sweeps": rows, "best": best})


if __name__ == "__main__":
    main()
