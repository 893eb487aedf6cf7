"""Training speed: the project's in-memory loop against a tutorial DataLoader, same run.

    python benchmarks/bench_train.py            # needs data/processed (dvc repro preprocess)

For the default MLP and CNN of params.yaml:
- project: the shipped Trainer (uint8 tensors in memory, batched augmentation), full
  default training; seconds per epoch, images/s, wall time to reach 97.5 % (MLP) or
  99.0 % / 99.4 % (CNN) validation accuracy;
- baseline: torchvision's `datasets.MNIST` with a per-sample DataLoader (batch 256, shuffle):
  `RandomAffine` with the same rotation, zoom and shift as params.yaml's augmentation, then
  `ToTensor` + `Normalize`; the same model, optimizer, schedule and loss (no weight
  averaging, so it does slightly less work). Run twice: num_workers=0, as CPU tutorials
  write it, and num_workers=2 with persistent workers (its best normal setting on this
  2-core machine; pinned memory only helps copies to a GPU, so it is off on a CPU);
- epoch times on both sides include the validation pass;
- the CNN's training FLOPs per image, counted by torch.utils.flop_counter (forward +
  backward), against this machine's fp32 matmul rate measured in the same run.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import common
from mnist_pipeline.data import stratified_split
from mnist_pipeline.engine import Trainer, make_optimizer, make_schedule, predict_logits, seed_everything
from mnist_pipeline.models import build_model, count_parameters

TARGETS = {"mlp": (0.975,), "cnn": (0.99, 0.994)}


def train_flops_per_image(name: str, params, batch: int = 256) -> float:
    model = build_model(name, **params.model_kwargs())
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def project_run(name: str, params, data, norm) -> dict:
    seed_everything(params.seed)
    model = build_model(name, **params.model_kwargs())
    trainer = Trainer(model, data["train"], data["val"], params.train, norm.mean, norm.std, params.seed,
                      torch.device("cpu"))
    epochs, start = [], time.perf_counter()
    while not trainer.finished:
        t0 = time.perf_counter()
        stats = trainer.run_epoch()
        epochs.append({"epoch": stats.epoch, "seconds": time.perf_counter() - t0,
                       "elapsed": time.perf_counter() - start, "val_acc": stats.val_acc})
    return {"epochs": epochs, "params": count_parameters(model)}


def baseline_run(name: str, params, data, norm, max_epochs: int, workers: int) -> dict:
    from torchvision import datasets, transforms

    seed_everything(params.seed)
    with tempfile.TemporaryDirectory() as tmp:
        aug = params.train.augment
        steps = [transforms.RandomAffine(aug.rotate, translate=(aug.shift / 28, aug.shift / 28),
                                         scale=(1 - aug.scale, 1 + aug.scale))] if aug.enabled else []
        steps += [transforms.ToTensor(), transforms.Normalize((norm.mean,), (norm.std,))]
        full = datasets.MNIST(common.mnist_folder(Path(tmp)), train=True, download=False,
                              transform=transforms.Compose(steps))
        train_idx, _ = stratified_split(full.targets, params.data.val_size, params.seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(full, train_idx.tolist()),
                                             batch_size=params.train.batch_size, shuffle=True, num_workers=workers,
                                             persistent_workers=workers > 0,
                                             pin_memory=torch.cuda.is_available())
        model = build_model(name, **params.model_kwargs())
        tp = params.train
        optimizer = make_optimizer(model, tp)
        schedule = make_schedule(optimizer, tp, math.ceil(len(train_idx) / tp.batch_size))
        epochs, start = [], time.perf_counter()
        for epoch in range(1, max_epochs + 1):
            t0 = time.perf_counter()
            model.train()
            for x, y in loader:
                loss = F.cross_entropy(model(x), y, label_smoothing=tp.label_smoothing)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.after_batch()
            val_x, val_y = data["val"]
            acc = float((predict_logits(model, val_x, norm.mean, norm.std, 1000, torch.device("cpu"))
                         .argmax(1) == val_y).double().mean())
            seconds = time.perf_counter() - t0  # validation included, as in the project's epochs
            schedule.after_epoch(acc)
            epochs.append({"epoch": epoch, "seconds": seconds, "elapsed": time.perf_counter() - start, "val_acc": acc})
    return {"epochs": epochs}


def models(base) -> list[tuple[str, object]]:
    """The default MLP and CNN of params.yaml `base`, each with its own recipe."""
    return [(name, base.model_copy(update={"model": name})) for name in ("mlp", "cnn")]


def plan(base) -> list[dict]:
    """What it trains from `base` (tests/test_bench_provenance.py checks it against depends.py's keys)."""
    return [{**common.trained_with(p), "seed": p.seed, "val_size": p.data.val_size} for _, p in models(base)]


def time_to(epochs: list[dict], target: float) -> float | None:
    return next((e["elapsed"] for e in epochs if e["val_acc"] >= target), None)


def summary(run: dict, n_train: int, targets: tuple[float, ...]) -> dict:
    seconds = statistics.median(e["seconds"] for e in run["epochs"])
    return {"seconds_per_epoch": round(seconds, 3), "images_per_second": round(n_train / seconds, 1),
            "epochs_run": len(run["epochs"]), "best_val_acc": max(e["val_acc"] for e in run["epochs"]),
            **{f"seconds_to_val_{t:.3f}": (round(time_to(run["epochs"], t), 2) if time_to(run["epochs"], t)
                                           else None) for t in targets}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-epochs", type=int, default=3, help="epochs of the slow baseline per model")
    args = parser.parse_args()
    params, data, norm = common.defaults(), common.processed(), common.stats()
    n_train = len(data["train"][0])
    peak = common.matmul_gflops()
    print(f"fp32 matmul: {peak:.1f} GFLOP/s")
    results: dict = {"matmul_gflops": round(peak, 1), "models": {}}
    for name, p in models(params):
        project = project_run(name, p, data, norm)
        baseline = baseline_run(name, p, data, norm, args.baseline_epochs, workers=0)
        baseline2 = baseline_run(name, p, data, norm, args.baseline_epochs, workers=2)
        ours, theirs = summary(project, n_train, TARGETS[name]), summary(baseline, n_train, TARGETS[name])
        theirs2 = summary(baseline2, n_train, TARGETS[name])
        flops = train_flops_per_image(name, p)
        entry = {"params": project["params"], "project": ours, "baseline": theirs, "baseline_workers2": theirs2,
                 "epoch_speedup": round(theirs["seconds_per_epoch"] / ours["seconds_per_epoch"], 2),
                 "epoch_speedup_vs_workers2": round(theirs2["seconds_per_epoch"] / ours["seconds_per_epoch"], 2),
                 "train_flops_per_image": round(flops),
                 "fraction_of_matmul_rate": round(flops * ours["images_per_second"] / (peak * 1e9), 3),
                 "project_epochs": project["epochs"], "baseline_epochs": baseline["epochs"],
                 "baseline_workers2_epochs": baseline2["epochs"]}
        results["models"][name] = entry
        print(f"{name}: {ours['seconds_per_epoch']:.2f} s/epoch vs baseline {theirs['seconds_per_epoch']:.2f} "
              f"(num_workers=0), {theirs2['seconds_per_epoch']:.2f} (num_workers=2) "
              f"→ {entry['epoch_speedup']:.1f}× / {entry['epoch_speedup_vs_workers2']:.1f}× faster; {flops / 1e6:.1f} MFLOP/image → "
              f"{entry['fraction_of_matmul_rate']:.0%} of the matmul rate; "
              + ", ".join(f"{k}: {v}" for k, v in ours.items() if k.startswith("seconds_to")))
    common.save("train", results)


if __name__ == "__main__":
    main()
