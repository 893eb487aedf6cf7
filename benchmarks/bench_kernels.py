"""What the portable kernels cost: the train stage with `MNIST_KERNELS=portable` against `native`, side by side.

    MNIST_MIRROR=/path/to/mnist dvc repro && python benchmarks/bench_kernels.py [--repeats 2] [--cnn-epochs 3]

Runs the real train stage (`stages/train.py`, a process of its own each time, as DVC runs it) on the
workspace's processed splits: the default MLP's full recipe, and the CNN's recipe cut to a few epochs
(its epochs cost the same each; 18 of them would measure the same ratio for six times the wall time).
The two kernel sets alternate within each repeat, so drift of the machine's speed hits both. Reports
the training seconds the stage itself logs (`logs/…timing.json`: import and data loading excluded),
the process's wall seconds, the median ratio portable / native, and each run's checkpoint hash:
portable runs must agree with each other. A fresh clone's first `dvc repro` with both sets is
bench_first_run.py's. Goal (issue 29): portable ≤ 1.25× native for the default MLP.
Writes benchmarks/results/kernels.json; docs/reproducibility.md quotes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

import common
from mnist_pipeline import kernels

GOAL_RATIO = 1.25
MODES = (kernels.PORTABLE, kernels.NATIVE)


def train(work: Path, params: Path, mode: str) -> dict[str, object]:
    out = work / "out"
    root = common.ROOT
    cmd = [sys.executable, str(root / "stages" / "train.py"), str(root / "data" / "processed"), "--params",
           str(params), "--teacher", str(root / "models" / "teacher" / "logits.pt"), "--corrections",
           str(root / "data" / "curated" / "admitted"), "--checkpoint", str(out / "model.pt"), "--metrics",
           str(out / "train.json"), "--history", str(out / "history.csv"), "--timing", str(out / "timing.json"),
           "--live", str(out / "live"), "--state-dir", str(work / "state")]
    start = time.perf_counter()
    common.run(cmd, work, kernels.child_env(mode))
    wall = time.perf_counter() - start
    timing = json.loads((out / "timing.json").read_text())
    return {"train_seconds": timing["train_seconds"], "process_seconds": round(wall, 2),
            "kernels": timing["kernels"],
            "checkpoint_sha256": hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cnn-epochs", type=int, default=3)
    args = parser.parse_args()
    base = yaml.safe_load((common.ROOT / "params.yaml").read_text())
    recipes = {"mlp": {**base, "model": "mlp"}, "cnn": {**base, "model": "cnn"}}
    recipes["cnn"]["cnn"] = {**base["cnn"], "train": {**base["cnn"]["train"], "epochs": args.cnn_epochs}}
    results: dict[str, dict[str, list]] = {m: {mode: [] for mode in MODES} for m in recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in recipes.items():
            (Path(tmp) / f"{name}.yaml").write_text(yaml.safe_dump(params))
        for i in range(args.repeats):
            for name in recipes:
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    work = Path(tmp) / f"{name}-{mode}-{i}"
                    work.mkdir()
                    run = train(work, Path(tmp) / f"{name}.yaml", mode)
                    results[name][mode].append(run)
                    print(f"{name} {mode}: {run['train_seconds']:.1f} s training, {run['process_seconds']:.1f} s "
                          f"process ({run['kernels']}) {run['checkpoint_sha256']}", flush=True)
    summary = {}
    for name, by_mode in results.items():
        medians = {mode: statistics.median(r["train_seconds"] for r in by_mode[mode]) for mode in MODES}
        portable_hashes = {r["checkpoint_sha256"] for r in by_mode[kernels.PORTABLE]}
        summary[name] = {
            "epochs": recipes[name][name]["train"]["epochs"],
            "median_train_seconds": medians,
            "ratio": round(medians[kernels.PORTABLE] / medians[kernels.NATIVE], 2),
            "portable_runs_identical": len(portable_hashes) == 1,
            "runs": by_mode,
        }
        print(f"{name}: portable {medians[kernels.PORTABLE]:.1f} s / native {medians[kernels.NATIVE]:.1f} s = "
              f"{summary[name]['ratio']:.2f}×", flush=True)
    mlp_ratio = summary["mlp"]["ratio"]
    common.save("kernels", {"repeats": args.repeats, "goal_ratio": GOAL_RATIO, "met": mlp_ratio <= GOAL_RATIO,
                            "pins": kernels.PINS, "threads": kernels.THREADS, "models": summary})


if __name__ == "__main__":
    main()
