"""The accuracy frontier: each lever of issue 19 as a recipe, at seeds 1–5, beside today's recipes, same run.

    python benchmarks/bench_frontier.py                 # needs data/processed (dvc repro preprocess)
    python benchmarks/bench_frontier.py --only cnn-long # rerun some recipes; the others are kept
                                                        # only when they were measured at this commit

A recipe is `dvc exp run -S` overrides of params.yaml, so any row can be reproduced as an
experiment. Each runs the shipped Trainer (its epochs include their validation pass, as the
train stage's do) at SEEDS, every seed a fresh model. The baselines are today's recipes
(`mlp-today`, `cnn-today`: params.yaml as committed) run in the same process, so the time
budgets of the issue are ratios measured side by side: the CNN may take 1.5× its baseline's
training seconds, the MLP 2×. The runs go seed by seed through every recipe (seed 1 of each,
then seed 2, …), so the machine's drift over the hour falls on every recipe alike; the file is
saved after each round.

Test-time views (`<model>.views`) change no training: every trained model is also scored with
5 and 9 views, and those rows share its training seconds (inference costs ×5 or ×9).
Distillation rows name their teacher recipe; the teacher of seed s is that recipe's model
of seed s. Its logits for the training images (one inference pass) count to the student's
seconds; its own training seconds are reported beside them, never folded away.
The test set picks nothing: `choose` ranks recipes by mean validation accuracy.
"""

from __future__ import annotations

import argparse
import time


import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

import common  # noqa: E402
from common import SEEDS, VIEWS, Recipe  # noqa: E402

BUDGET = {"cnn": 1.5, "mlp": 2.0}  # training time allowed, × today's recipe of the same model


CNN = ["model=cnn"]
ELASTIC = ["augment.elastic=34", "augment.elastic_sigma=4"]  # Simard et al. 2003's α and σ
RECIPES = [
    Recipe("mlp-today", "baseline", []),
    Recipe("mlp-long", "longer schedule", ["mlp.train.epochs=34"]),
    Recipe("mlp-elastic", "longer schedule, elastic distortions",
           ["mlp.train.epochs=34"] + [f"mlp.train.{o}" for o in ELASTIC]),
    Recipe("cnn-today", "baseline", CNN),
    # The teacher was trained with label smoothing, so its softmax is already soft at T = 1.
    Recipe("mlp-distill", "distillation from cnn-today", ["mlp.train.label_smoothing=0"], teacher="cnn-today",
           distill=(0.5, 1.0)),
    Recipe("mlp-distill-long", "distillation from cnn-today, longer schedule",
           ["mlp.train.label_smoothing=0", "mlp.train.epochs=32"], teacher="cnn-today", distill=(0.5, 1.0)),
    Recipe("cnn-long", "longer schedule", CNN + ["cnn.train.epochs=25"]),
    Recipe("cnn-elastic", "longer schedule, elastic distortions",
           CNN + ["cnn.train.epochs=25"] + [f"cnn.train.{o}" for o in ELASTIC]),
    Recipe("cnn-wide", "architecture: wider early stages at <20k parameters",
           CNN + ["cnn.channels=[[10],[16,20],[32,32]]"]),
    Recipe("cnn-wide-long", "architecture and a longer schedule",
           CNN + ["cnn.channels=[[10],[16,20],[32,32]]", "cnn.train.epochs=22"]),
    Recipe("cnn-details", "optimizer details: lighter label smoothing, shorter warm-up",
           CNN + ["cnn.train.label_smoothing=0.05", "cnn.train.warmup=0.15"]),
]


def leaderboard(recipes: list[dict]) -> list[dict]:
    """One row per recipe and view count, with the time ratio to its model's baseline and its budget."""
    base = {r["model"]: r["train_seconds"]["mean"] for r in recipes if r["lever"] == "baseline"}
    rows = []
    for r in recipes:
        teacher = next((t for t in recipes if t["name"] == r["teacher"]), None)
        for views in VIEWS:
            ratio = round(r["train_seconds"]["mean"] / base[r["model"]], 2) if r["model"] in base else None
            rows.append({
                "recipe": r["name"] if views == 1 else f"{r['name']}+views{views}", "model": r["model"],
                "lever": r["lever"] + ("" if views == 1 else f", {views} test-time views"),
                "overrides": r["overrides"] + ([] if views == 1 else [f"{r['model']}.views={views}"]),
                "params": r["params"], "train_seconds": r["train_seconds"]["mean"],
                "teacher_seconds": teacher["train_seconds"]["mean"] if teacher else None,
                "time_ratio": ratio, "within_budget": ratio is not None and ratio <= BUDGET[r["model"]],
                "inference_views": views,
                "val_acc": r[f"val_acc_views{views}"]["mean"],
                "test_acc": r[f"test_acc_views{views}"], "seeds": len(r["seeds"])})
    return sorted(rows, key=lambda row: (row["model"], -row["val_acc"]))


def choose(rows: list[dict]) -> dict[str, str]:
    """Per model, the best recipe within its time budget, ranked on validation accuracy only."""
    best = {}
    for model in BUDGET:
        within = [r for r in rows if r["model"] == model and r["within_budget"]]
        if within:
            best[model] = max(within, key=lambda r: r["val_acc"])["recipe"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[r.name for r in RECIPES], help="run these recipes only")
    args = parser.parse_args()
    kept = {}
    if args.only:
        previous = common.load("frontier")
        if previous and previous.get("commit") == common.STARTED["commit"]:
            kept = {r["name"]: r for r in previous["recipes"] if r["name"] not in args.only}
    wanted = [r for r in RECIPES if not args.only or r.name in args.only]
    needed = {r.teacher for r in wanted if r.teacher} - {r.name for r in wanted}
    if needed:
        parser.error(f"a teacher's models are kept in memory only: run {', '.join(sorted(needed))} too")
    started = time.perf_counter()

    def save(summaries: list[dict]) -> None:
        done = {**kept, **{r["name"]: r for r in summaries}}
        recipes = [done[r.name] for r in RECIPES if r.name in done]
        rows = leaderboard(recipes)
        common.save("frontier", {"seeds": list(SEEDS), "budget_vs_baseline": BUDGET, "recipes": recipes,
                                 "leaderboard": rows, "chosen_on_val": choose(rows),
                                 "bench_seconds": round(time.perf_counter() - started, 1)})

    common.measure(wanted, after_round=save)


if __name__ == "__main__":
    main()
