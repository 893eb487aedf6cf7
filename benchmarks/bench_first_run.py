"""A newcomer's first `dvc repro`: a fresh clone, an empty DVC cache, the default params.

    MNIST_MIRROR=/path/to/mnist python benchmarks/bench_first_run.py [--repeats 3]

Each repeat clones this repository at HEAD into a new folder (nothing cached, nothing
pulled), runs `dvc repro` there with MNIST_MIRROR, and times it as a command, with each
stage timed from DVC's "Running stage" line to the next (so DVC's hashing of a stage's
outputs counts to that stage). Each repeat does so twice, in alternating order: with the
portable kernels every user gets (mnist_pipeline/kernels.py) and with `MNIST_KERNELS=native`,
so their ratio is measured side by side; the goal is the portable run's. Then, in the last clone, a no-op `dvc repro`. Beside them, in
the same run, the fixed costs every stage pays on this machine: `dvc version` (the CLI's
start-up) and a bare `python -c "import torch"`.
Goal (issues 23, 29): the median first run takes at most 90 s on the 2-core machine.
Writes benchmarks/results/first_run.json; the README's quick start quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from mnist_pipeline import kernels

GOAL_SECONDS = 90.0


def seconds_of(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    common.run(cmd, cwd, env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not os.environ.get("MNIST_MIRROR"):
        sys.exit("set MNIST_MIRROR to a local copy of the four MNIST files")
    runs: dict[str, list[dict]] = {kernels.PORTABLE: [], kernels.NATIVE: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode in list(runs) if i % 2 == 0 else list(runs)[::-1]:
                repo = common.clone(Path(tmp), f"clone-{i}-{mode}", shared_cache=False)
                # The clone's own code runs its stages, not an installed copy.
                env = {**kernels.child_env(mode), "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(repo)}
                seconds, stages = common.timed_stages([common.DVC, "repro"], repo, env)
                timing = json.loads((repo / "logs" / "train_timing.json").read_text())
                evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
                runs[mode].append({"seconds": round(seconds, 1), "stages": stages,
                                   "dvc_outside_stages": round(seconds - sum(stages.values()), 1),
                                   "train_seconds": timing["train_seconds"], "kernels": timing["kernels"],
                                   "test_accuracy": evaluation["accuracy"]})
                print(f"first run {i + 1}, {mode}: {seconds:.1f} s (train {timing['train_seconds']:.1f} s, test "
                      f"accuracy {evaluation['accuracy']:.4f}); stages: {stages}", flush=True)
        env = {**kernels.child_env(kernels.PORTABLE), "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(repo)}
        noop = statistics.median(seconds_of([common.DVC, "repro"], repo, env) for _ in range(3))
        dvc_version = statistics.median(seconds_of([common.DVC, "version"], repo, env) for _ in range(3))
        torch_import = statistics.median(seconds_of([sys.executable, "-c", "import torch"], repo, env)
                                         for _ in range(3))
    native = statistics.median(r["seconds"] for r in runs[kernels.NATIVE])
    native_train = statistics.median(r["train_seconds"] for r in runs[kernels.NATIVE])
    runs_native, runs = runs[kernels.NATIVE], runs[kernels.PORTABLE]
    median = statistics.median(r["seconds"] for r in runs)
    print(f"median first run {median:.1f} s (goal ≤ {GOAL_SECONDS:.0f} s); no-op {noop:.2f} s; "
          f"dvc version {dvc_version:.2f} s; import torch {torch_import:.2f} s")
    train = statistics.median(r["train_seconds"] for r in runs)
    print(f"native kernels: median {native:.1f} s (portable / native {median / native:.2f}×; training "
          f"{train / native_train:.2f}×)")
    common.save("first_run", {"repeats": args.repeats, "runs": runs, "median_seconds": round(median, 1),
                              "goal_seconds": GOAL_SECONDS, "met": median <= GOAL_SECONDS,
                              "native": {"runs": runs_native, "median_seconds": round(native, 1),
                                         "portable_over_native": round(median / native, 2),
                                         "train_portable_over_native": round(train / native_train, 2)},
                              "noop_repro_seconds": round(noop, 2), "dvc_version_seconds": round(dvc_version, 2),
                              "import_torch_seconds": round(torch_import, 2),
                              "matmul_gflops": round(common.matmul_gflops(), 1),
                              "params": {"model": common.defaults().model,
                                         "mlp": common.defaults().section("mlp")}})


if __name__ == "__main__":
    main()
