"""The accuracy side of the pool-placement choice (models.py): the project's CNN, which
max-pools right after a stage's last convolution (before BatchNorm and ReLU), against the
textbook conv → BN → ReLU → pool with the same widths, both trained with the CNN's recipe
from params.yaml on the same split, seeds and data, one after the other in the same run.

    python benchmarks/bench_pool.py [--seeds 42]      # needs data/processed (dvc repro preprocess)

They are different models (BatchNorm's scale can be negative, and its statistics are taken
over a different map), so equal speed-adjusted accuracy has to be measured, not assumed.
Reports best validation accuracy (what the pipeline selects on), test accuracy of that
epoch's weights and training seconds. Writes benchmarks/results/pool.json.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

import common  # noqa: E402
from bench_ops import cnn_pool_last
from mnist_pipeline.engine import Trainer, predict_logits, seed_everything
from mnist_pipeline.models import CNN, count_parameters


def run(variant: str, params, data, norm, seed: int) -> dict:
    seed_everything(seed)
    channels = [list(s) for s in params.cnn.channels]
    model = CNN(channels, params.cnn.dropout) if variant == "pool_before_bn_relu" else cnn_pool_last(channels)
    trainer = Trainer(model, data["train"], data["val"], params.cnn.train, norm.mean, norm.std, seed,
                      torch.device("cpu"))
    seconds = trainer.fit()
    model.load_state_dict(trainer.best.state)
    x, y = data["test"]
    test = float((predict_logits(model.eval(), x, norm.mean, norm.std, 1000, torch.device("cpu")).argmax(1) == y)
                 .double().mean())
    return {"params": count_parameters(model), "best_val_acc": round(trainer.best.val_acc, 5),
            "test_acc": round(test, 5), "train_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    args = parser.parse_args()
    params, data, norm = common.defaults(), common.processed(), common.stats()
    results: dict = {"seeds": args.seeds, "variants": {}}
    for variant in ("pool_before_bn_relu", "pool_after_bn_relu"):
        runs = [run(variant, params, data, norm, seed) for seed in args.seeds]
        summary = {key: round(statistics.mean(r[key] for r in runs), 5) for key in ("best_val_acc", "test_acc",
                                                                                     "train_seconds")}
        results["variants"][variant] = {"params": runs[0]["params"], "runs": runs, "mean": summary}
        print(f"{variant}: val {summary['best_val_acc']:.4f}, test {summary['test_acc']:.4f}, "
              f"{summary['train_seconds']:.0f} s of training")
    v = results["variants"]
    results["time_ratio_after_vs_before"] = round(v["pool_after_bn_relu"]["mean"]["train_seconds"]
                                                  / v["pool_before_bn_relu"]["mean"]["train_seconds"], 2)
    common.save("pool", results)


if __name__ == "__main__":
    main()
