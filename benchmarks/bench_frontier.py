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
import statistics
import time
from dataclasses import dataclass, field

import torch

import common
from mnist_pipeline.engine import Distillation, Trainer, predict_logits, seed_everything
from mnist_pipeline.models import build_model, count_parameters
from mnist_pipeline.params import apply_overrides

SEEDS = (1, 2, 3, 4, 5)
VIEWS = (1, 5, 9)
BUDGET = {"cnn": 1.5, "mlp": 2.0}  # training time allowed, × today's recipe of the same model


@dataclass(frozen=True)
class Recipe:
    name: str
    lever: str
    overrides: list[str]
    teacher: str | None = None  # a recipe name: distillation from its model of the same seed
    distill: tuple[float, float] = (0.0, 1.0)  # (weight, temperature)
    model: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", "cnn" if "model=cnn" in self.overrides else "mlp")


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


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((logits.argmax(1) == labels).double().mean()), 4)


def run_seed(recipe: Recipe, seed: int, data: dict, norm, teachers: dict) -> tuple[dict, torch.nn.Module]:
    params = apply_overrides(common.defaults(), recipe.overrides + [f"seed={seed}"])
    seed_everything(seed)
    model = build_model(params.model, **params.model_kwargs())
    distill, teacher_pass = None, 0.0
    if recipe.teacher:
        start = time.perf_counter()
        logits = predict_logits(teachers[recipe.teacher, seed], data["train"][0], norm.mean, norm.std, 1000,
                                torch.device("cpu"))
        teacher_pass = time.perf_counter() - start
        distill = Distillation(logits, *recipe.distill)
    trainer = Trainer(model, data["train"], data["val"], params.train, norm.mean, norm.std, seed,
                      torch.device("cpu"), distill)
    seconds = trainer.fit() + teacher_pass
    model.load_state_dict(trainer.best.state)  # the checkpoint the train stage would write
    row = {"seed": seed, "train_seconds": round(seconds, 2), "best_epoch": trainer.best.epoch}
    for views in VIEWS:
        model.views = views
        for split in ("val", "test"):
            x, y = data[split]
            logits = predict_logits(model, x, norm.mean, norm.std, 1000, torch.device("cpu"))
            row[f"{split}_acc_views{views}"] = accuracy(logits, y)
    model.views = 1
    print(f"  {recipe.name} seed {seed}: {seconds:.1f} s, val {row['val_acc_views1']:.4f}, "
          f"test {row['test_acc_views1']:.4f} (5 views {row['test_acc_views5']:.4f}, "
          f"9 views {row['test_acc_views9']:.4f})", flush=True)
    return row, model


def summarise(recipe: Recipe, runs: list[dict], params: int) -> dict:
    def stat(key: str) -> dict:
        values = [r[key] for r in runs]
        return {"mean": round(statistics.mean(values), 5), "std": round(statistics.stdev(values), 5)}

    return {"name": recipe.name, "model": recipe.model, "lever": recipe.lever, "overrides": recipe.overrides,
            "teacher": recipe.teacher, "distill": list(recipe.distill) if recipe.teacher else None,
            "params": params, "seeds": runs, "train_seconds": stat("train_seconds"),
            **{f"{split}_acc_views{v}": stat(f"{split}_acc_views{v}") for v in VIEWS for split in ("val", "test")}}


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
    data, norm = common.processed(), common.stats()
    kept = {}
    if args.only:
        previous = common.load("frontier")
        if previous and previous.get("commit") == common.STARTED["commit"]:
            kept = {r["name"]: r for r in previous["recipes"] if r["name"] not in args.only}
    wanted = [r for r in RECIPES if not args.only or r.name in args.only]
    needed = {r.teacher for r in wanted if r.teacher} - {r.name for r in wanted}
    if needed:
        parser.error(f"a teacher's models are kept in memory only: run {', '.join(sorted(needed))} too")
    teachers: dict[tuple[str, int], torch.nn.Module] = {}
    teacher_names = {r.teacher for r in wanted if r.teacher}
    runs: dict[str, list[dict]] = {r.name: [] for r in wanted}
    sizes: dict[str, int] = {}
    started = time.perf_counter()
    for seed in SEEDS:
        for recipe in wanted:
            if seed == SEEDS[0]:
                print(f"{recipe.name}: `dvc exp run {' '.join('-S ' + o for o in recipe.overrides)}`", flush=True)
            row, model = run_seed(recipe, seed, data, norm, teachers)
            runs[recipe.name].append(row)
            sizes[recipe.name] = count_parameters(model)
            if recipe.name in teacher_names:
                teachers[recipe.name, seed] = model
        if seed == SEEDS[0]:
            continue  # a mean ± std needs two seeds
        done = {**kept, **{r.name: summarise(r, runs[r.name], sizes[r.name]) for r in wanted}}
        recipes = [done[r.name] for r in RECIPES if r.name in done]
        rows = leaderboard(recipes)
        common.save("frontier", {"seeds": list(SEEDS), "budget_vs_baseline": BUDGET, "recipes": recipes,
                                 "leaderboard": rows, "chosen_on_val": choose(rows),
                                 "bench_seconds": round(time.perf_counter() - started, 1)})

if __name__ == "__main__":
    main()
