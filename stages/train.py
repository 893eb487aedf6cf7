"""train stage: fit the selected model on the train split, keep the best epoch on val.

Params: seed, dataset, model, mlp, cnn, data, train.
Reads: DATA_DIR/{train,val}.pt and DATA_DIR/stats.json.
Writes: --checkpoint (self-describing, best on val), --metrics (best epoch, val scores),
--history (per-epoch CSV for `dvc plots`), --timing (wall-clock figures, kept apart so the
other outputs stay byte-identical), --live (DVCLive per-epoch logs).
Resume: after every epoch the full training state goes to --state-dir, keyed by a
fingerprint of params, data and code; a rerun after a crash continues from there.
Environment: MNIST_DEVICE=cpu|cuda|mps overrides the detected device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from dvclive import Live

from mnist_pipeline import checkpoint, data, engine, models
from mnist_pipeline.data import load_split
from mnist_pipeline.datasets import DatasetError
from mnist_pipeline.engine import Trainer, TrainingDiverged, seed_everything, select_device
from mnist_pipeline.fileio import atomic_path, write_json, write_torch
from mnist_pipeline.params import as_dict, load_params_or_exit, stage_parser

TRAINING_CODE = [Path(m.__file__) for m in (checkpoint, data, engine, models)] + [Path(__file__)]


def log_epoch(live: Live, stats: engine.EpochStats) -> None:
    live.step = stats.epoch
    for name, value in (("train/loss", stats.train_loss), ("train/acc", stats.train_acc),
                        ("val/loss", stats.val_loss), ("val/acc", stats.val_acc), ("lr", stats.lr)):
        live.log_metric(name, value)
    live.next_step()


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("data_dir", type=Path)
    for option in ("checkpoint", "metrics", "history", "timing", "live", "state_dir"):
        parser.add_argument(f"--{option.replace('_', '-')}", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)

    seed_everything(params.seed)
    try:
        device = select_device()
        train, val = load_split(args.data_dir / "train.pt"), load_split(args.data_dir / "val.pt")
    except (ValueError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats = json.loads((args.data_dir / "stats.json").read_text())
    hashes = checkpoint.data_hashes({s: args.data_dir / f"{s}.pt" for s in ("train", "val")})
    run_params = {k: as_dict(getattr(params, k)) for k in ("seed", "dataset", "model", params.model, "data", "train")}
    model = models.build_model(params.model, **params.model_kwargs())
    trainer = Trainer(model, train, val, params.train, stats["mean"], stats["std"], params.seed, device)
    num_params = models.count_parameters(model)
    print(f"{params.model}: {num_params:,} parameters, {len(train[0]):,} train / {len(val[0]):,} val images, "
          f"device {device}")

    key = checkpoint.fingerprint(run_params, hashes, TRAINING_CODE)
    state_file = checkpoint.resume_path(args.state_dir, key)
    try:
        state = checkpoint.load_resume_state(args.state_dir, key)
    except checkpoint.CheckpointError as exc:
        print(f"warning: ignoring unreadable resume state: {exc}", file=sys.stderr)
        state = None
    if state is not None:
        trainer.load_state_dict(state)
        print(f"resuming after epoch {trainer.epoch} from {state_file}")
    start_epoch = trainer.epoch

    live = Live(str(args.live), dvcyaml=False, save_dvc_exp=False, report=None)
    for past in trainer.history:  # DVC removed the old logs with the stage's outputs
        log_epoch(live, engine.EpochStats(**past))

    def on_epoch(s: engine.EpochStats) -> None:
        checkpoint.save_resume_state(args.state_dir, key, trainer.state_dict())
        log_epoch(live, s)
        print(f"epoch {s.epoch:3d}/{params.train.epochs}  train loss {s.train_loss:.4f} acc {s.train_acc:.4f}  "
              f"val loss {s.val_loss:.4f} acc {s.val_acc:.4f}  lr {s.lr:.3g}", flush=True)

    try:
        seconds = trainer.fit(on_epoch, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"\ninterrupted: the state after epoch {trainer.epoch} is kept in {state_file}; "
              "run `dvc repro` again to resume", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        live.end()

    best = {k: trainer.best[k] for k in ("epoch", "val_acc", "val_loss")}
    write_torch(args.checkpoint, checkpoint.make_checkpoint(
        params.model, params.model_kwargs(), trainer.best["state"], {"mean": stats["mean"], "std": stats["std"]},
        stats["classes"], run_params, hashes, best))
    write_json(args.metrics, {"best_epoch": best["epoch"], "val_acc": round(best["val_acc"], 6),
                              "val_loss": round(best["val_loss"], 6), "epochs_run": trainer.epoch,
                              "stopped_early": trainer.epoch < params.train.epochs, "params": num_params})
    with atomic_path(args.history) as tmp:
        pd.DataFrame(trainer.history).to_csv(tmp, index=False, float_format="%.6f")
    images = len(train[0]) * (trainer.epoch - start_epoch)
    write_json(args.timing, {"train_seconds": round(seconds, 2), "images_per_second": round(images / seconds, 1)
                             if seconds else None, "resumed_from_epoch": start_epoch, "device": str(device)})
    state_file.unlink(missing_ok=True)
    print(f"best epoch {best['epoch']}: val acc {best['val_acc']:.4f}; {seconds:.1f} s → {args.checkpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
