"""teacher stage: train the selected model's distillation teacher once, and write its soft targets.

Params: seed, dataset, ${model}.train.distill.teacher (which teacher, if any), cnn (the teacher's
model and recipe), data. A student's own recipe is not among them, so tuning the student never
retrains its teacher.
Reads: DATA_DIR/{train,val}.pt and DATA_DIR/stats.json.
Writes: OUT/logits.pt, the teacher's logits for the train split's images in their order (N×10
float32, one view), or a 0×10 tensor when the selected model has no teacher (the stage then
takes seconds); OUT/checkpoint.pt, the teacher itself, when there is one; --metrics (its
validation scores and size); --timing (its training seconds, kept apart so the outputs stay
byte-identical). DVC caches OUT and `dvc push` sends it to the remote: a team trains it once.
Environment: MNIST_DEVICE=cpu|cuda|mps overrides the detected device.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
from pathlib import Path

import torch

from mnist_pipeline import models, processed, stage
from mnist_pipeline.checkpoint import Checkpoint, data_hashes, save_checkpoint
from mnist_pipeline.engine import Trainer, predict_logits, seed_everything, select_device
from mnist_pipeline.fileio import write_json, write_torch

LOGITS, CHECKPOINT = "logits.pt", "checkpoint.pt"


def configure(parser) -> None:
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out", type=Path)
    for option in ("metrics", "timing"):
        parser.add_argument(f"--{option}", type=Path, required=True)


def main(argv: list[str] | None = None) -> int:
    args, params = stage.parse(__doc__, configure, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if params.teacher == "none":
        write_torch(args.out / LOGITS, torch.empty(0, 10))
        write_json(args.metrics, {"teacher": "none"})
        write_json(args.timing, {"train_seconds": 0.0})
        print("no teacher: the selected model's distill.teacher is none")
        return 0
    teacher = params.teacher_params
    seed_everything(params.seed)
    device = select_device()
    train, val = processed.load_split(args.data_dir, "train"), processed.load_split(args.data_dir, "val")
    stats = processed.load_stats(args.data_dir)
    model = models.build_model(teacher.model, **teacher.model_kwargs())
    trainer = Trainer(model, train, val, teacher.train, stats.mean, stats.std, params.seed, device)
    print(f"teacher {teacher.model}: {models.count_parameters(model):,} parameters, {teacher.train.epochs} epochs")
    seconds = trainer.fit(
        lambda s: print(f"teacher epoch {s.epoch:3d}/{teacher.train.epochs}  val acc {s.val_acc:.4f}", flush=True)
    )
    model.load_state_dict(trainer.best.weights())
    with models.single_view(model):
        logits = predict_logits(model, train[0], stats.mean, stats.std, 1000, device)
    best = trainer.best.summary()
    hashes = data_hashes({s: processed.split_path(args.data_dir, s) for s in ("train", "val")})
    save_checkpoint(
        args.out / CHECKPOINT,
        Checkpoint(
            model=teacher.model,
            model_kwargs=teacher.model_kwargs(),
            state_dict=trainer.best.weights(),
            normalisation={"mean": stats.mean, "std": stats.std},
            classes=stats.classes,
            params={
                "seed": params.seed,
                "dataset": params.dataset,
                teacher.model: teacher.section(teacher.model),
                "data": params.section("data"),
            },
            data=hashes,
            best=best,
        ),
    )
    write_torch(args.out / LOGITS, logits)
    write_json(
        args.metrics,
        {
            "teacher": teacher.model,
            "best_epoch": best["epoch"],
            "val_acc": round(best["val_acc"], 6),
            "val_loss": round(best["val_loss"], 6),
            "params": models.count_parameters(model),
        },
    )
    write_json(args.timing, {"train_seconds": round(seconds, 2), "device": str(device)})
    print(f"teacher best epoch {best['epoch']}: val acc {best['val_acc']:.4f}; {seconds:.1f} s → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
