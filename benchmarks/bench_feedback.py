"""The feedback loop, measured: one loop of users' corrections on digits that are not MNIST's.

The population (benchmarks/writers.py): 60 simulated writers × 10 samples of each digit, drawn
with a stroke model and uploaded as 280×280 PNGs, exactly as a user's drawing. Writers 0–39 send
corrections (the curate stage then holds 30 % of them out as its user split); writers 40–59 never
send anything: their 2,000 digits are the held-out users the table scores, through
`images.prepare` and the exported ONNX model, as `mnist-predict` would, overall and on the
targeted error (their 7s read as 1).

Each scenario is a fresh clone of this repository at the committed model (seed 42), its store
keyed by one salt for all (so each holds out the same writers), then the loop of docs/feedback.md: `mnist-feedback import`, `mnist-feedback snapshot`, `dvc repro`. For
each seed the baseline is the pipeline at that seed without corrections.

- clean: every digit sent, every label right;
- wrong_only: each writer sends only the digits the model at that seed misread, labelled right,
  and confirms ("Right ✓") a tenth of those it read right: what a person on the page does.
  Defended and naive (`feedback.defence: false`); `passed` is the share of the corrections
  admitted or kept in the user split;
- flips: every digit sent, 20 % of the labels replaced by a random other digit (careless users);
- targeted: clean plus one more submitter sending 7s labelled 1, as many as 20 % of all records,
  defended and naive (every adversary is given an identity the user split does not hold out:
  `trained_names`);
- heavy: clean plus one honest writer sending as many records as that adversary, labelled right;
- adaptive_<identities>_<share>: clean plus the adaptive adversary, who reads docs/feedback.md and
  queries the model: for each 7 it labels 1 it sends three digits labelled with the model's second
  guess (wrong, never implausible), under 1 identity or spread over 10, as 20 % or 50 % of all
  records; defended, at seed 42 only.

Every submitter is imported as a CSV name, so anonymous (as on a public page without sign-in): the
honest writers share the anonymous bound with the adversary. In every scenario a reviewer (`mnist-feedback review`) looks at up to REVIEWS corrections of the
held-out submitters, accepting the right labels and rejecting the wrong ones: the user-style digits
no attacker labelled that the gate judges a candidate on, besides the validation split. The model
before the loop is the champion; the model *served* after it is the candidate if the gate blessed
it (`mnist-promote`), else the model before; the held-out figures are the served model's.

Then the store: `snapshot` + `dvc push` of 1,000 new records on top of 10,000 (to a local DVC
remote) against the first 10,000. `/feedback` under load is bench_serve.py's.

    MNIST_MIRROR=… python benchmarks/bench_feedback.py [--seeds 42 1 2]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
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
import yaml

from mnist_pipeline import gate
from mnist_pipeline.exported import load_model
from mnist_pipeline.images import prepare

WRITERS, PER_DIGIT, CORRECTING = 60, 10, 40
ADVERSARIAL, FLIPS, CONFIRMED = 0.2, 0.2, 0.1
REVIEWS = 300  # corrections of held-out submitters a person looks at in each loop
TARGET = (7, 1)  # the adversary's aim: held-out 7s read as 1
SALT = hashlib.sha256(b"bench_feedback").digest()  # the pseudonym key of every scenario's store
SCENARIOS = {  # name: (what is sent, defence)
    "clean": ("all", True),
    "wrong_only_defended": ("wrong_only", True),
    "wrong_only_naive": ("wrong_only", False),
    "flips_defended": ("flips", True),
    "targeted_defended": ("targeted", True),
    "targeted_naive": ("targeted", False),
    "heavy_defended": ("heavy", True),
    "adaptive_1_20": ("adaptive:1:0.2", True),
    "adaptive_10_20": ("adaptive:10:0.2", True),
    "adaptive_1_50": ("adaptive:1:0.5", True),
    "adaptive_10_50": ("adaptive:10:0.5", True),
}
ONE_SEED = {name for name in SCENARIOS if name.startswith("adaptive")}  # run at the first seed only
BIN = Path(common.DVC).parent


def sh(args: list[str], cwd: Path) -> str:
    return common.run(args, cwd)


def set_params(repo: Path, seed: int, defence: bool) -> None:
    text = (repo / "params.yaml").read_text()
    text = re.sub(r"^seed: \d+", f"seed: {seed}", text, count=1, flags=re.M)
    text = re.sub(r"^  defence: (true|false)", f"  defence: {'true' if defence else 'false'}", text, count=1,
                  flags=re.M)
    (repo / "params.yaml").write_text(text)


def predictions(model_path: Path, digits: np.ndarray) -> np.ndarray:
    return load_model(model_path).probabilities(digits).argmax(1)


def scores(predicted: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, share of the target's digits read as the adversary's label)."""
    target = labels == TARGET[0]
    return float((predicted == labels).mean()), float((predicted[target] == TARGET[1]).mean())


def labelled_rows(rows: list[tuple[Path, int, str]], sent: str, extra: list[Path], seed: int,
                  predicted: np.ndarray, adaptive: list[tuple[Path, int]]) -> list[list]:
    """The CSV rows one scenario imports; `predicted` is the model's reading of each of `rows`, `adaptive` the
    adaptive adversary's digits with the labels it chose."""
    rng = random.Random(seed)
    out = []
    for (path, digit, writer), answer in zip(rows, predicted, strict=True):
        label = digit
        if sent == "wrong_only" and answer == digit and rng.random() >= CONFIRMED:
            continue
        if sent == "flips" and rng.random() < FLIPS:
            label = (digit + rng.randint(1, 9)) % 10
        out.append([str(path), label, writer])
    if sent == "targeted":
        out += [[str(p), TARGET[1], trained_names("mallory", 1)[0]] for p in extra if p.parent.name == "mallory"]
    if sent == "heavy":
        out += [[str(p), int(p.name[0]), trained_names("hank", 1)[0]] for p in extra if p.parent.name == "hank"]
    if sent.startswith("adaptive"):
        _, identities, share = sent.split(":")
        n = round(len(out) * float(share) / (1 - float(share)))
        names = trained_names("adaptive", int(identities))
        out += [[str(path), label, names[i % len(names)]] for i, (path, label) in enumerate(adaptive[:n])]
    return out


def trained_names(prefix: str, n: int) -> list[str]:
    """The first `n` names prefix0, prefix1, … that the user split does not hold out (under SALT and params.yaml's
    split): the worst case, every record of theirs reaches training. (About 30 % of random identities would be
    held out: scored, never trained on; at one salt the targeted adversary was, and its row measured nothing.)"""
    from mnist_pipeline.feedback.curate import held_out
    from mnist_pipeline.feedback.records import pseudonym

    split = yaml.safe_load((common.ROOT / "params.yaml").read_text())["feedback"]
    names = (f"{prefix}{k}" for k in range(1000))
    return [name for name in names
            if not held_out(pseudonym(SALT, "import", name), split["user_split"], split["split_key"])][:n]


def adaptive_labels(model: Path, files: list[Path]) -> list[tuple[Path, int]]:
    """The adaptive adversary's labels: every fourth file is a 7, called 1; the others get the model's second guess."""
    probs = load_model(model).probabilities(np.stack([prepare(p.read_bytes()) for p in files]))
    return [(p, TARGET[1] if i % 4 == 0 else int(np.argsort(q)[-2])) for i, (p, q) in
            enumerate(zip(files, probs, strict=True))]


def review(repo: Path, rows: list[list], policy: dict) -> dict:
    """A person reviews up to REVIEWS corrections of held-out submitters: accept the right labels, reject the wrong."""
    from mnist_pipeline.feedback.curate import held_out

    exported = [json.loads(line) for line in sh([str(BIN / "mnist-feedback"), "export"], repo).splitlines()]
    corrections = [r for r in exported if r["kind"] == "correction"]
    assert len(corrections) == len(rows)  # imported in order, one record a row
    truth = {r["id"]: digit_of(Path(row[0])) == int(row[1]) for r, row in zip(corrections, rows, strict=True)}
    held = [r["id"] for r in corrections if held_out(r["submitter"], policy["user_split"], policy["split_key"])]
    chosen = random.Random(0).sample(held, min(REVIEWS, len(held)))
    args = [a for i in chosen for a in (("--accept" if truth[i] else "--reject"), i)]
    if args:
        sh([str(BIN / "mnist-feedback"), "review", *args], repo)
    return {"reviewed": len(chosen), "accepted": sum(truth[i] for i in chosen)}


def digit_of(path: Path) -> int:
    """The digit a population file shows: writers.py and this file name each `<digit>_<n>.png`."""
    return int(path.name[0])


def loop(work: Path, name: str, seed: int, sent: str, defence: bool, population: dict) -> dict:
    """A clone at the committed model, `seed` set, its baseline reproduced and made the champion, then one loop of
    what `sent` says, reviewed, gated, and served only if blessed."""
    repo = common.clone(work, name)
    set_params(repo, seed, defence)
    # One key for every scenario's store, as one project's stores share it: the same writers are held out
    # in each, so scenarios differ only in what is sent.
    salt = repo.parent / f"{repo.name}.salt"
    salt.write_bytes(SALT)
    sh([str(BIN / "mnist-feedback"), "salt", "--import", str(salt)], repo)
    sh([common.DVC, "repro", "-q"], repo)  # the baseline at this seed (a cache hit at 42)
    model = repo / "models" / "export" / "model.onnx"
    before_model = repo.parent / f"{name}.before.onnx"
    before_model.write_bytes(model.read_bytes())
    champion = {"version": None, **gate.identity((repo / "models" / "checkpoint.pt").read_bytes(), model)}
    (repo / "models" / "champion.json").write_text(json.dumps(champion, indent=2) + "\n")  # the model before the loop
    before = json.loads((repo / "metrics" / "eval.json").read_text())
    held_x, held_y = population["held"]
    baseline, target_before = scores(predictions(model, held_x), held_y)
    adaptive = adaptive_labels(model, population["adaptive"]) if sent.startswith("adaptive") else []
    rows = labelled_rows(population["correcting"], sent, population["extra"], seed,
                         predictions(model, population["correcting_x"]), adaptive)
    with (work / f"{name}.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    sh([str(BIN / "mnist-feedback"), "import", str(work / f"{name}.csv")], repo)
    policy = yaml.safe_load((repo / "params.yaml").read_text())["feedback"]
    reviewed = review(repo, rows, policy)
    sh([str(BIN / "mnist-feedback"), "snapshot"], repo)
    seconds, stages = common.timed_stages([common.DVC, "repro"], repo, dict(os.environ))
    after = json.loads((repo / "metrics" / "eval.json").read_text())
    curated = json.loads((repo / "metrics" / "curate.json").read_text())
    card = json.loads((repo / "models" / "model_card.json").read_text())
    verdict = json.loads((repo / "metrics" / "gate.json").read_text())
    candidate, candidate_target = scores(predictions(model, held_x), held_y)
    served = model if verdict["blessed"] else before_model
    accuracy, target_after = scores(predictions(served, held_x), held_y)
    result = {
        "seed": seed,
        "defence": defence,
        "records": len(rows),
        "held_out_accuracy_before": round(baseline, 4),
        "held_out_accuracy_after": round(accuracy, 4),
        "target_error_before": round(target_before, 4),
        "target_error_after": round(target_after, 4),
        "candidate_held_out_accuracy": round(candidate, 4),
        "candidate_target_error": round(candidate_target, 4),
        "blessed": verdict["blessed"],
        "gate_reasons": verdict["reasons"],
        "gate_images": {k: v["overall"]["images"] for k, v in verdict.get("slices", {}).items()},
        "mnist_test_before": before["accuracy"],
        "mnist_test_after": after["accuracy"] if verdict["blessed"] else before["accuracy"],
        "candidate_mnist_test": after["accuracy"],
        "candidate_user_split": after["users"],
        "admitted": curated["admitted"],
        "passed": round((curated["admitted"] + curated["user_split"]["samples"]) / curated["corrections"], 4),
        "quarantined": curated["quarantined"],
        "review": reviewed,
        "candidate_card_feedback": card["feedback"],
        "repro_seconds": round(seconds, 1),
        "stage_seconds": stages,
    }
    print(f"{name}: {'blessed' if verdict['blessed'] else 'NOT blessed'} {verdict['reasons']}; served: held-out users "
          f"{result['held_out_accuracy_before']:.4f} → {result['held_out_accuracy_after']:.4f}, "
          f"7 read as 1 {target_before:.4f} → {target_after:.4f}, "
          f"MNIST test {result['mnist_test_before']:.4f} → {result['mnist_test_after']:.4f}; "
          f"candidate {candidate:.4f}, "
          f"7 as 1 {candidate_target:.4f}; {result['admitted']} admitted, {result['passed']:.1%} passed, "
          f"quarantined {result['quarantined']}", flush=True)
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
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS),
                        help="a subset, to try the benchmark out (the report needs them all)")
    args = parser.parse_args()
    results: dict = {"population": {"writers": WRITERS, "per_digit": PER_DIGIT, "correcting_writers": CORRECTING,
                                    "held_out_writers": WRITERS - CORRECTING, "flips": FLIPS, "confirmed": CONFIRMED,
                                    "adversarial_share": ADVERSARIAL, "target": list(TARGET)},
                     "scenarios": {name: [] for name in args.scenarios}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = writers.population(work / "population", WRITERS, PER_DIGIT, seed=0)
        correcting = [r for r in rows if int(r[2][1:]) < CORRECTING]
        held_rows = [r for r in rows if int(r[2][1:]) >= CORRECTING]
        rng = np.random.default_rng(1)
        extra = []  # mallory's 7s, then hank's digits: as many records each as 20 % of all
        for name, digits in (("mallory", [TARGET[0]]), ("hank", list(range(10)))):
            hand = writers.writer(rng, name)
            (work / "population" / name).mkdir()
            for i in range(round(len(correcting) * ADVERSARIAL / (1 - ADVERSARIAL))):
                path = work / "population" / name / f"{digits[i % len(digits)]}_{i}.png"
                path.write_bytes(writers.draw(hand, digits[i % len(digits)], rng))
                extra.append(path)
        adaptive = []  # the adaptive adversary's digits: a 7 in every four, the others every digit in turn
        hand = writers.writer(rng, "adaptive")
        (work / "population" / "adaptive").mkdir()
        for i in range(len(correcting)):  # as many as the clean records: 50 % of all at most
            digit = TARGET[0] if i % 4 == 0 else (i // 4) % 10
            path = work / "population" / "adaptive" / f"{digit}_{i}.png"
            path.write_bytes(writers.draw(hand, digit, rng))
            adaptive.append(path)
        population = {
            "adaptive": adaptive,
            "correcting": correcting,
            "correcting_x": np.stack([prepare(p.read_bytes()) for p, _, _ in correcting]),
            "held": (np.stack([prepare(p.read_bytes()) for p, _, _ in held_rows]),
                     np.array([d for _, d, _ in held_rows])),
            "extra": extra,
        }
        for seed in args.seeds:
            for name in args.scenarios:
                if name in ONE_SEED and seed != args.seeds[0]:
                    continue
                sent, defence = SCENARIOS[name]
                results["scenarios"][name].append(loop(work, f"{name}-{seed}", seed, sent, defence, population))
        results["snapshot"] = snapshot_costs(work, correcting)
    summary = {}
    for name, runs in results["scenarios"].items():
        summary[name] = {k: round(float(np.mean([r[k] for r in runs])), 4) for k in
                         ("held_out_accuracy_before", "held_out_accuracy_after", "target_error_before",
                          "target_error_after", "mnist_test_before", "mnist_test_after", "passed",
                          "candidate_held_out_accuracy", "candidate_target_error")}
        summary[name]["blessed"] = [r["blessed"] for r in runs]
        summary[name]["mnist_test_change_points"] = round(
            100 * (summary[name]["mnist_test_after"] - summary[name]["mnist_test_before"]), 3)
        summary[name]["held_out_error_ratio"] = round(
            (1 - summary[name]["held_out_accuracy_after"]) / (1 - summary[name]["held_out_accuracy_before"]), 3)
    for name in args.scenarios:
        reference = "wrong_only_naive" if name.startswith("wrong_only") else "clean"
        if reference not in summary:
            continue
        ref = summary[reference]
        if name in ONE_SEED:  # against the clean loop at the same seed
            first = results["scenarios"][reference][0]
            ref = {k: first[k] for k in ("held_out_accuracy_before", "held_out_accuracy_after", "target_error_after",
                                         "mnist_test_after")}
            summary[name]["reference_target_error_after"] = ref["target_error_after"]
            summary[name]["mnist_test_against_reference_points"] = round(
                100 * (summary[name]["mnist_test_after"] - ref["mnist_test_after"]), 3)
        gain = ref["held_out_accuracy_after"] - ref["held_out_accuracy_before"]
        summary[name]["share_of_reference_gain"] = round(
            (summary[name]["held_out_accuracy_after"] - summary[name]["held_out_accuracy_before"]) / gain, 3)
        summary[name]["reference"] = reference
    results["summary"] = summary
    results["seeds"] = args.seeds
    print(json.dumps(summary, indent=1))
    common.save("feedback", results)


if __name__ == "__main__":
    main()
