"""train stage: fit the selected model on the train split, keep the best epoch on val.

Params: seed, dataset, model, the selected model's section (mlp or cnn: its architecture and
its training recipe, `<model>.train`), data, feedback.repeat.
Reads: DATA_DIR/{train,val}.pt, DATA_DIR/stats.json, --teacher (the teacher stage's logits for
the train split; used when the selected model's train.distill.teacher is not none) and
--corrections (the curate stage's admitted corrections, appended feedback.repeat times; a
correction's soft target is its own label, since the teacher never saw it).
Writes: --checkpoint (self-describing, best on val), --metrics (best epoch, val scores),
--history (per-epoch CSV for `dvc plots`), --timing (wall-clock figures, kept apart so the
other outputs stay byte-identical), --live (DVCLive per-epoch logs).
Resume: after every epoch the full training state goes to --state-dir, keyed by a
fingerprint of params, data and code; a rerun after a crash continues from there.
Environment: MNIST_DEVICE=cpu|cuda|mps overrides the detected device.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch
from dvclive import Live

from mnist_pipeline import kernels, models, processed, stage
from mnist_pipeline.checkpoint import (
    Checkpoint,
    ResumeStore,
    data_hashes,
    fingerprint,
    load_teacher_logits,
    save_checkpoint,
)
from mnist_pipeline.data import label_logits, with_corrections
from mnist_pipeline.engine import Distillation, EpochStats, Trainer, seed_everything, select_device
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.feedback import splits
from mnist_pipeline.fileio import atomic_path, sha256_file, write_json


def configure(parser) -> None:
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--corrections", type=Path, default=None, help="the curate stage's admitted corrections")
    for option in ("teacher", "checkpoint", "metrics", "history", "timing", "live", "state-dir"):
        parser.add_argument(f"--{option}", type=Path, required=True)


def log_epoch(live: Live, stats: EpochStats) -> None:
    live.step = stats.epoch
    for name, value in (
        ("train/loss", stats.train_loss),
        ("train/acc", stats.train_acc),
        ("val/loss", stats.val_loss),
        ("val/acc", stats.val_acc),
        ("lr", stats.lr),
    ):
        live.log_metric(name, value)
    live.next_step()


def resume(trainer: Trainer, store: ResumeStore) -> int:
    """Load the saved state of an interrupted run of the same inputs, if any; the epoch it starts after."""
    try:
        state = store.load()
    except PipelineError as exc:
        print(f"warning: ignoring unreadable resume state: {exc}", file=sys.stderr)
        state = None
    if state is not None:
        trainer.load_state_dict(state)
        print(f"resuming after epoch {trainer.epoch} from {store.path}")
    return trainer.epoch


def write_metrics(args: argparse.Namespace, trainer: Trainer, epochs: int, num_params: int) -> None:
    """metrics/train.json (the best epoch) and the per-epoch history, both byte-stable."""
    best = trainer.best.summary()
    write_json(
        args.metrics,
        {
            "best_epoch": best["epoch"],
            "val_acc": round(best["val_acc"], 6),
            "val_loss": round(best["val_loss"], 6),
            "epochs_run": trainer.epoch,
            "stopped_early": trainer.epoch < epochs,
            "params": num_params,
        },
    )
    with atomic_path(args.history) as tmp:
        pd.DataFrame(trainer.history).to_csv(tmp, index=False, float_format="%.6f")


def main(argv: list[str] | None = None) -> int:
    args, params = stage.parse(__doc__, configure, argv)
    seed_everything(params.seed)
    device = select_device()
    train, val = processed.load_split(args.data_dir, "train"), processed.load_split(args.data_dir, "val")
    stats = processed.load_stats(args.data_dir)
    extra_images, extra_labels = (torch.from_numpy(a) for a in splits.load_or_empty(args.corrections))
    corrected = with_corrections(train, extra_images, extra_labels, params.feedback.repeat)
    distill = None
    if params.teacher != "none":
        d = params.train.distill
        logits = load_teacher_logits(args.teacher, len(train[0]))
        logits = torch.cat([logits, label_logits(extra_labels, len(stats.classes)).repeat(params.feedback.repeat, 1)])
        distill = Distillation(logits, d.weight, d.temperature)
    inputs = {s: processed.split_path(args.data_dir, s) for s in ("train", "val")}
    hashes = data_hashes(inputs if distill is None else {**inputs, "teacher": args.teacher})
    run_params = {
        "seed": params.seed,
        "dataset": params.dataset,
        "model": params.model,
        params.model: params.section(params.model),
        "data": params.section("data"),
    }
    if len(extra_labels):  # without corrections the checkpoint is what it was before feedback existed
        hashes["corrections"] = sha256_file(args.corrections / "images.npy")
        meta = json.loads((args.corrections / "meta.json").read_text())
        run_params["feedback"] = {"corrections": len(extra_labels), "repeat": params.feedback.repeat, **meta}
    train = corrected
    model = models.build_model(params.model, **params.model_kwargs())
    trainer = Trainer(model, train, val, params.train, stats.mean, stats.std, params.seed, device, distill)
    num_params = models.count_parameters(model)
    print(
        f"{params.model}: {num_params:,} parameters, {len(train[0]):,} train / {len(val[0]):,} val images "
        f"({len(extra_labels):,} users' corrections × {params.feedback.repeat}), device {device}"
        + ("" if distill is None else f", distilled from the {params.teacher} teacher")
    )

    store = ResumeStore(args.state_dir, fingerprint(run_params, hashes, stage.package_modules() + [Path(__file__)]))
    start_epoch = resume(trainer, store)

    # DVCLive appends to its files rather than replacing them. That is safe here: DVC deletes
    # the dvclive/ output before the stage runs and records nothing from a stage that died, so
    # a half-written log is never kept; a resumed run replays the saved history instead.
    live = Live(str(args.live), dvcyaml=False, save_dvc_exp=False, report=None)
    for past in trainer.history:
        log_epoch(live, EpochStats(**past))

    saved = start_epoch  # the epoch whose state is on disk: a Ctrl-C can land in the middle of a save

    def on_epoch(s: EpochStats) -> None:
        nonlocal saved
        store.save(trainer.state_dict())
        saved = s.epoch
        log_epoch(live, s)
        print(
            f"epoch {s.epoch:3d}/{params.train.epochs}  train loss {s.train_loss:.4f} acc {s.train_acc:.4f}  "
            f"val loss {s.val_loss:.4f} acc {s.val_acc:.4f}  lr {s.lr:.3g}",
            flush=True,
        )

    try:
        seconds = trainer.fit(on_epoch, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        kept = (
            f"the state after epoch {saved} is kept in {store.path}; run `dvc repro` again to resume"
            if saved
            else "no epoch's state was saved yet; `dvc repro` starts over"
        )
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        return 130
    finally:
        live.end()

    best = trainer.best.summary()
    save_checkpoint(
        args.checkpoint,
        Checkpoint(
            model=params.model,
            model_kwargs=params.model_kwargs(),
            state_dict=trainer.best.weights(),
            normalisation={"mean": stats.mean, "std": stats.std},
            classes=stats.classes,
            params=run_params,
            data=hashes,
            best=best,
        ),
    )
    write_metrics(args, trainer, params.train.epochs, num_params)
    images = len(train[0]) * (trainer.epoch - start_epoch)
    write_json(
        args.timing,
        {
            "train_seconds": round(seconds, 2),
            "images_per_second": round(images / seconds, 1) if seconds else None,
            "resumed_from_epoch": start_epoch,
            "device": str(device),
            "kernels": kernels.describe(),  # which kernels ran: the same bytes come from the same set
        },
    )
    store.clear()
    print(f"best epoch {best['epoch']}: val acc {best['val_acc']:.4f}; {seconds:.1f} s → {args.checkpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
