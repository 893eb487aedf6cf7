"""params.yaml's recipes, as shipped, against the recipes they replaced: seeds 1–5, same run.

    python benchmarks/bench_defaults.py          # needs data/processed (dvc repro preprocess)

bench_frontier.py searched; this measures what was chosen exactly as `dvc repro` runs it. The
MLP's teacher is the CNN of the same params at the same seed (what the teacher stage trains),
so the student is measured with the teacher it ships with. The "before" recipes are params.yaml
at the commit frontier.json was measured at, given as `-S` overrides of today's file. Seeds go
round-robin through the four recipes, so the hour's drift falls on all alike.
"""

from __future__ import annotations

import subprocess
import time

import torch

import common
from bench_frontier import BUDGET, SEEDS, Recipe, leaderboard, run_seed, summarise
from mnist_pipeline.models import count_parameters
from mnist_pipeline.params import parse_params, read_yaml


def leaves(value: object, key: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in leaves(item, f"{key}.{name}" if key else name).items()}
    return {key: value}


def overrides_to(before: dict, now: dict, section: str) -> list[str]:
    """`-S` overrides that turn today's `section` into the one before (lists in Hydra's syntax)."""
    old, new = leaves(before[section], section), leaves(now[section], section)
    return [f"{k}={str(v).replace(' ', '') if isinstance(v, list) else v}" for k, v in old.items() if new.get(k) != v]


def merged(base: dict, changes: dict) -> dict:
    return {k: merged(v, changes[k]) if isinstance(v, dict) and isinstance(changes.get(k), dict)
            else changes.get(k, v) for k, v in base.items()}


def recipes() -> list[Recipe]:
    commit = common.load("frontier")["commit"]
    text = subprocess.run(["git", "show", f"{commit}:params.yaml"], cwd=common.ROOT, capture_output=True,
                          text=True, check=True).stdout
    now = common.defaults()
    now_dump = now.model_dump(mode="json")
    # Keys added since (distillation) take today's values, except that nothing distilled then.
    base = now.model_dump(mode="json")
    for model in ("mlp", "cnn"):
        base[model]["train"]["distill"]["teacher"] = "none"
    before = parse_params(merged(base, read_yaml(text))).model_dump(mode="json")
    distill = now.mlp.train.distill
    teacher = "cnn-default" if distill.teacher == "cnn" else None
    return [
        Recipe("cnn-before", "baseline", ["model=cnn"] + overrides_to(before, now_dump, "cnn")),
        Recipe("cnn-default", "params.yaml's CNN recipe", ["model=cnn"]),
        Recipe("mlp-before", "baseline", overrides_to(before, now_dump, "mlp")),
        Recipe("mlp-default", "params.yaml's MLP recipe" + (", distilled from cnn-default" if teacher else ""), [],
               teacher=teacher, distill=(distill.weight, distill.temperature)),
    ]


def main() -> None:
    data, norm = common.processed(), common.stats()
    wanted = recipes()
    teachers: dict[tuple[str, int], torch.nn.Module] = {}
    runs: dict[str, list[dict]] = {r.name: [] for r in wanted}
    started = time.perf_counter()
    for seed in SEEDS:
        for recipe in wanted:
            if seed == SEEDS[0]:
                print(f"{recipe.name}: `dvc exp run {' '.join('-S ' + o for o in recipe.overrides)}`", flush=True)
            row, model = run_seed(recipe, seed, data, norm, teachers)
            runs[recipe.name].append(row)
            teachers[recipe.name, seed] = model
    done = [summarise(r, runs[r.name], count_parameters(teachers[r.name, SEEDS[0]])) for r in wanted]
    common.save("defaults", {"seeds": list(SEEDS), "before": common.load("frontier")["commit"],
                             "budget_vs_baseline": BUDGET, "recipes": done,
                             "leaderboard": leaderboard(done),
                             "params": {m: common.defaults().section(m) for m in ("mlp", "cnn")},
                             "bench_seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
