"""The shipped recipes: params.yaml's default and the two record recipes, seeds 1–3, same run.

    python benchmarks/bench_defaults.py          # needs data/processed (dvc repro preprocess)

Each recipe is `dvc exp run -S` overrides of params.yaml, trained as the train stage trains it
(benchmarks/common.py's train_and_score) at seeds 1–3, seed by seed through the recipes so
the hour's drift falls on all alike. Three seeds, not five: the claims are means to a tenth of a
point, and the seed-to-seed spread (0.04–0.06 points) puts three seeds' mean within about 0.04 of
five's, at 21 minutes instead of 35 on the CI machine:
- `mlp-default`: params.yaml as committed (`dvc repro`);
- `cnn`: `-S model=cnn`, the record CNN (19,936 parameters, 9 test-time views);
- `mlp-distilled`: the record MLP, distilled from `cnn` of the same seed (what the teacher
  stage trains). Its cost is both trainings: the teacher's seconds count to it.
Writes benchmarks/results/defaults.json; the README's headline and docs/frontier.md quote it.
"""

from __future__ import annotations

import time

import common
from common import Recipe
from mnist_pipeline.params import Params

SEEDS = (1, 2, 3)

# The record MLP: what params.yaml shipped at f1c286a (docs/frontier.md), as overrides of today's file.
DISTILLED = ["mlp.train.distill.teacher=cnn", "mlp.train.epochs=32", "mlp.train.batch_size=256",
             "mlp.train.lr=0.1", "mlp.train.label_smoothing=0"]
RECIPES = [
    Recipe("mlp-default", "params.yaml (`dvc repro`)", []),
    Recipe("cnn", "the record CNN (`-S model=cnn`)", ["model=cnn"]),
    Recipe("mlp-distilled", "the record MLP, distilled from `cnn`", DISTILLED, teacher="cnn", distill=(0.5, 1.0)),
]


def plan(base: Params) -> list[dict]:
    """What it trains from params.yaml `base`: tests/test_bench_provenance.py changes each key and checks that
    exactly the keys depends.py declares for it move this."""
    return [common.trained_with(common.recipe_params(r, seed, base)) for seed in SEEDS for r in RECIPES]


def shipped(summary: dict, summaries: list[dict]) -> dict:
    """A recipe's figures at the test-time views it ships with, its teacher's seconds counted in."""
    model = summary["model"]
    views = common.defaults().section(model)["views"]
    teacher = next((s for s in summaries if s["name"] == summary["teacher"]), None)
    seconds = summary["train_seconds"]["mean"] + (teacher["train_seconds"]["mean"] if teacher else 0.0)
    return {"recipe": summary["name"], "model": model, "views": views, "params": summary["params"],
            "overrides": summary["overrides"], "test_acc": summary[f"test_acc_views{views}"],
            "val_acc": summary[f"val_acc_views{views}"], "train_seconds": summary["train_seconds"]["mean"],
            "teacher_seconds": teacher["train_seconds"]["mean"] if teacher else None,
            "total_train_seconds": round(seconds, 2)}


def save(summaries: list[dict], started: float) -> None:
    common.save("defaults", {"seeds": list(SEEDS), "recipes": summaries,
                             "shipped": [shipped(s, summaries) for s in summaries],
                             "params": {m: common.defaults().section(m) for m in ("mlp", "cnn")},
                             "bench_seconds": round(time.perf_counter() - started, 1)})


def main() -> None:
    started = time.perf_counter()
    common.measure(RECIPES, SEEDS, after_round=lambda summaries: save(summaries, started))


if __name__ == "__main__":
    main()
