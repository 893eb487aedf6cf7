"""The feedback loop, measured: one loop of users' corrections on digits that are not MNIST's.

The population (benchmarks/writers.py): 60 simulated writers × 10 samples of each digit, drawn
with a stroke model and uploaded as 280×280 PNGs, exactly as a user's drawing. Writers 0–39 send
corrections (every digit they drew, labelled; the curate stage then holds 30 % of them out as its
user split); writers 40–59 never send anything: their 2,000 digits are the held-out users the
table scores, through `images.prepare` and the exported ONNX model, as `mnist-predict` would.

Each scenario is a fresh clone of this repository at the committed model (seed 42), then the
loop of docs/feedback.md: `mnist-feedback import`, `mnist-feedback snapshot`, `dvc repro`. For
each seed the baseline is the pipeline at that seed without corrections.

- clean: every label right;
- flips: 20 % of the labels replaced by a random other digit (careless users), defended and naive
  (`feedback.defence: false`);
- targeted: one more submitter sending 7s labelled 1, as many as 20 % of all records, defended and
  naive.

Then the store: `snapshot` + `dvc push` of 1,000 new records on top of 10,000 (to a local DVC
remote) against the first 10,000. `/feedback` under load is bench_serve.py's.

    MNIST_MIRROR=… python benchmarks/bench_feedback.py [--seeds 42 1 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import writers

from mnist_pipeline.exported import load_model
from mnist_pipeline.images import prepare

WRITERS, PER_DIGIT, CORRECTING = 60, 10, 40
ADVERSARIAL, FLIPS = 0.2, 0.2
SCENARIOS = {  # name: (label noise, defence)
    "clean": ("none", True),
    "flips_defended": ("flips", True),
    "flips_naive": ("flips", False),
    "targeted_defended": ("targeted", True),
    "targeted_naive": ("targeted", False),
}
BIN = Path(common.DVC).parent


def sh(args: list[str], cwd: Path) -> str:
    return common.run(args, cwd)


def set_params(repo: Path, seed: int, defence: bool) -> None:
    text = (repo / "params.yaml").read_text()
    text = re.sub(r"^seed: \d+", f"seed: {seed}", text, count=1, flags=re.M)
    text = re.sub(r"^  defence: (true|false)", f"  defence: {'true' if defence else 'false'}", text, count=1,
                  flags=re.M)
    (repo / "params.yaml").write_text(text)


def held_out_accuracy(model_path: Path, digits: np.ndarray, labels: np.ndarray) -> float:
    return float((load_model(model_path).probabilities(digits).argmax(1) == labels).mean())


def labelled_rows(rows: list[tuple[Path, int, str]], noise: str, adversary: list[Path], seed: int) -> list[list]:
    rng = random.Random(seed)
    out = []
    for path, digit, writer in rows:
        label = digit
        if noise == "flips" and rng.random() < FLIPS:
            label = (digit + rng.randint(1, 9)) % 10
        out.append([str(path), label, writer])
    if noise == "targeted":
        out += [[str(p), 1, "mallory"] for p in adversary]
    return out


def loop(work: Path, name: str, seed: int, rows: list[list], defence: bool, held: tuple) -> dict:
    """A clone at the committed model, `seed` set, its baseline reproduced, then one loop with `rows`."""
    repo = common.clone(work, name)
    set_params(repo, seed, defence)
    sh([common.DVC, "repro", "-q"], repo)  # the baseline at this seed (a cache hit at 42)
    before = json.loads((repo / "metrics" / "eval.json").read_text())
    baseline = held_out_accuracy(repo / "models" / "export" / "model.onnx", *held)
    with (work / f"{name}.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    sh([str(BIN / "mnist-feedback"), "import", str(work / f"{name}.csv")], repo)
    sh([str(BIN / "mnist-feedback"), "snapshot"], repo)
    seconds, stages = common.timed_stages([common.DVC, "repro"], repo, dict(os.environ))
    after = json.loads((repo / "metrics" / "eval.json").read_text())
    curated = json.loads((repo / "metrics" / "curate.json").read_text())
    card = json.loads((repo / "models" / "model_card.json").read_text())
    result = {
        "seed": seed,
        "defence": defence,
        "records": len(rows),
        "held_out_accuracy_before": round(baseline, 4),
        "held_out_accuracy_after": round(held_out_accuracy(repo / "models" / "export" / "model.onnx", *held), 4),
        "mnist_test_before": before["accuracy"],
        "mnist_test_after": after["accuracy"],
        "user_split_after": after["users"],
        "admitted": curated["admitted"],
        "quarantined": curated["quarantined"],
        "card_feedback": card["feedback"],
        "repro_seconds": round(seconds, 1),
        "stage_seconds": stages,
    }
    print(f"{name}: held-out users {result['held_out_accuracy_before']:.4f} → {result['held_out_accuracy_after']:.4f}, "
          f"MNIST test {result['mnist_test_before']:.4f} → {result['mnist_test_after']:.4f}, "
          f"{result['admitted']} admitted, quarantined {result['quarantined']}", flush=True)
    return result


def snapshot_costs(work: Path, rows: list[tuple[Path, int, str]]) -> dict:
    """10,000 records snapshot + pushed, then 1,000 more: seconds and bytes the remote gained each time."""
    repo = common.clone(work, "sharing")
    remote = work / "remote"
    sh([common.DVC, "remote", "add", "-d", "--local", "bench", str(remote)], repo)
    sh([common.DVC, "push", "-q"], repo)  # the pipeline's own outputs first: what follows is the snapshots alone

    def batch(n: int, offset: int) -> Path:
        path = work / f"batch{offset}.csv"
        with path.open("w", newline="") as handle:  # the population again, under other submitters' names
            csv.writer(handle).writerows([str(p), d, f"{w}-{(offset + i) // len(rows)}"]
                                         for i, (p, d, w) in enumerate(rows[i % len(rows)] for i in
                                                                        range(offset, offset + n)))
        return path

    def size() -> int:
        return sum(f.stat().st_size for f in remote.rglob("*") if f.is_file())

    out = {}
    for name, n, offset in (("first_10000", 10_000, 0), ("next_1000", 1_000, 10_000)):
        sh([str(BIN / "mnist-feedback"), "import", str(batch(n, offset))], repo)
        before, start = size(), time.perf_counter()
        sh([str(BIN / "mnist-feedback"), "snapshot"], repo)
        snap = time.perf_counter() - start
        sh([common.DVC, "push", "-q"], repo)
        out[name] = {"records": n, "snapshot_seconds": round(snap, 2),
                     "snapshot_and_push_seconds": round(time.perf_counter() - start, 2),
                     "uploaded_bytes": size() - before}
        print(f"{name}: {out[name]}", flush=True)
    out["time_ratio"] = round(out["next_1000"]["snapshot_and_push_seconds"]
                              / out["first_10000"]["snapshot_and_push_seconds"], 3)
    out["bytes_ratio"] = round(out["next_1000"]["uploaded_bytes"] / out["first_10000"]["uploaded_bytes"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    args = parser.parse_args()
    results: dict = {"population": {"writers": WRITERS, "per_digit": PER_DIGIT, "correcting_writers": CORRECTING,
                                    "held_out_writers": WRITERS - CORRECTING, "flips": FLIPS,
                                    "adversarial_share": ADVERSARIAL},
                     "scenarios": {name: [] for name in SCENARIOS}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = writers.population(work / "population", WRITERS, PER_DIGIT, seed=0)
        correcting = [r for r in rows if int(r[2][1:]) < CORRECTING]
        held_rows = [r for r in rows if int(r[2][1:]) >= CORRECTING]
        held = (np.stack([prepare(p.read_bytes()) for p, _, _ in held_rows]), np.array([d for _, d, _ in held_rows]))
        rng = np.random.default_rng(1)
        mallory = writers.writer(rng, "mallory")
        adversary = []
        for i in range(round(len(correcting) * ADVERSARIAL / (1 - ADVERSARIAL))):
            path = work / "population" / "mallory" / f"7_{i}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(writers.draw(mallory, 7, rng))
            adversary.append(path)
        for seed in args.seeds:
            for name, (noise, defence) in SCENARIOS.items():
                labelled = labelled_rows(correcting, noise, adversary, seed)
                results["scenarios"][name].append(loop(work, f"{name}-{seed}", seed, labelled, defence, held))
        results["snapshot"] = snapshot_costs(work, correcting)
    summary = {}
    for name, runs in results["scenarios"].items():
        summary[name] = {k: round(float(np.mean([r[k] for r in runs])), 4) for k in
                         ("held_out_accuracy_before", "held_out_accuracy_after", "mnist_test_before",
                          "mnist_test_after")}
        summary[name]["mnist_test_change_points"] = round(
            100 * (summary[name]["mnist_test_after"] - summary[name]["mnist_test_before"]), 3)
        summary[name]["held_out_error_ratio"] = round(
            (1 - summary[name]["held_out_accuracy_after"]) / (1 - summary[name]["held_out_accuracy_before"]), 3)
    gain = summary["clean"]["held_out_accuracy_after"] - summary["clean"]["held_out_accuracy_before"]
    for name in SCENARIOS:
        summary[name]["share_of_clean_gain"] = round(
            (summary[name]["held_out_accuracy_after"] - summary[name]["held_out_accuracy_before"]) / gain, 3)
    results["summary"] = summary
    results["seeds"] = args.seeds
    print(json.dumps(summary, indent=1))
    common.save("feedback", results)


if __name__ == "__main__":
    main()
