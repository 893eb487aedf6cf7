"""A 3-seed sweep per model with `dvc exp run --queue`, summarised as mean ± std.

    MNIST_MIRROR=/path/to/mnist python benchmarks/seed_sweep.py          # queue, run, summarise
    python benchmarks/seed_sweep.py --summarise-only                     # just read `dvc exp show`

Each experiment changes `seed` (which drives the train/val split, initialisation, batch
order and augmentation) and `model`; the test set is never used to choose anything.
The summary is read from `dvc exp show --json`, so it also works on experiments you
queued yourself, and is written to benchmarks/results/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

import common  # noqa: E402

def dvc(*args: str) -> str:
    return common.run([common.DVC, *args], common.ROOT)


def experiments(shown: list[dict]) -> list[dict]:
    """Flatten `dvc exp show --json` into {name, params, metrics} rows of finished experiments."""
    rows = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                metrics = ((data.get("metrics") or {}).get("metrics/eval.json") or {}).get("data") or {}
                if metrics and params:
                    rows.append({"name": rev.get("name") or exp.get("name"), "params": params, "metrics": metrics})
    return rows


def summarise(rows: list[dict], prefix: str) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for row in rows:
        if not str(row["name"]).startswith(prefix):
            continue
        entry = table.setdefault(row["params"]["model"], {"seeds": [], "accuracy": [], "params": None})
        entry["seeds"].append(row["params"]["seed"])
        entry["accuracy"].append(row["metrics"]["accuracy"])
        entry["params"] = row["metrics"]["params"]
    for entry in table.values():
        acc = entry["accuracy"]
        entry["mean"] = round(statistics.mean(acc), 5)
        entry["std"] = round(statistics.stdev(acc), 5) if len(acc) > 1 else 0.0
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--prefix", default="sweep-", help="experiment name prefix")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--rev", default="HEAD", help="the commit the experiments were run on (default HEAD)")
    args = parser.parse_args()
    # `dvc exp show` lists the experiments of one baseline commit: pin it, so commits made
    # while the queue runs do not hide the sweep.
    baseline = subprocess.run(["git", "rev-parse", args.rev], cwd=common.ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    show = ["exp", "show", "--json", "--rev", baseline]
    if not args.summarise_only:
        planned = [(model, seed, f"{args.prefix}{model}-{seed}") for model in args.models for seed in args.seeds]
        existing = {row["name"] for row in experiments(json.loads(dvc(*show)))}
        stale = [name for _, _, name in planned if name in existing]
        if stale:  # an earlier sweep: replace it rather than fail on the names
            dvc("exp", "remove", *stale)
        for model, seed, name in planned:
            dvc("exp", "run", "--queue", "-S", f"model={model}", "-S", f"seed={seed}", "-n", name)
        dvc("queue", "start", "-j", "1")  # one at a time: each already uses every core
        while any(state in dvc("queue", "status") for state in ("Queued", "Running")):
            time.sleep(10)
    table = summarise(experiments(json.loads(dvc(*show))), args.prefix)
    for model, entry in table.items():
        print(f"{model}: {entry['params']:,} params, test accuracy {entry['mean']:.4f} ± {entry['std']:.4f} "
              f"over seeds {entry['seeds']}: {entry['accuracy']}")
    common.save("sweep", {"baseline": baseline, "experiments": table})


if __name__ == "__main__":
    main()
