"""evaluate stage: score the checkpoint on the test split.

Params: evaluate (batch_size).
Reads: CHECKPOINT, DATA_DIR/test.pt, DATA_DIR/val.pt (only to fit the temperature), HISTORY,
--users (the curate stage's user split: submitters' digits never trained on).
Writes: --metrics (accuracy, loss, macro F1, per-class precision/recall/F1, errors, params,
`calibration`: the temperature fitted on val, test ECE and NLL before and after it, and `users`:
accuracy and ECE on the user split, null when there is none), --confusion
({actual, predicted} rows for DVC's confusion template) and four figures: --confusion-png,
--misclassified-png, --curves-png and --reliability-png.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
from pathlib import Path

import pandas as pd
import torch

from mnist_pipeline import calibration, processed, reports, stage
from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.engine import predict_logits, select_device
from mnist_pipeline.errors import DatasetError
from mnist_pipeline.feedback import splits
from mnist_pipeline.fileio import write_json
from mnist_pipeline.models import count_parameters


def configure(parser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--users", type=Path, default=None, help="the curate stage's user split")
    for option in (
        "history",
        "metrics",
        "confusion",
        "confusion-png",
        "misclassified-png",
        "curves-png",
        "reliability-png",
    ):
        parser.add_argument(f"--{option}", type=Path, required=True)


def read_history(path: Path) -> pd.DataFrame:
    columns = {"epoch", "train_loss", "val_loss", "train_acc", "val_acc"}
    try:
        history = pd.read_csv(path)
    except (OSError, ValueError) as exc:  # pandas' parser errors are ValueErrors
        raise DatasetError(f"{path}: not a readable training history ({exc}); run `dvc repro train`") from None
    if not columns <= set(history.columns):
        raise DatasetError(f"{path}: expected the columns {', '.join(sorted(columns))}; run `dvc repro train`")
    return history


def main(argv: list[str] | None = None) -> int:
    args, params = stage.parse(__doc__, configure, argv)
    ckpt = load_checkpoint(args.checkpoint)
    images, labels = processed.load_split(args.data_dir, "test")
    history = read_history(args.history)
    device = select_device()
    model = ckpt.build().to(device)
    norm, classes = ckpt.normalisation, ckpt.classes
    logits = predict_logits(model, images, norm["mean"], norm["std"], params.evaluate.batch_size, device)

    val_images, val_labels = processed.load_split(args.data_dir, "val")
    val_logits = predict_logits(model, val_images, norm["mean"], norm["std"], params.evaluate.batch_size, device)
    calibrated, reliable_before, reliable_after = calibration.report(val_logits, val_labels, logits, labels)

    metrics = reports.classification_metrics(logits, labels, classes, count_parameters(model))
    metrics["calibration"] = calibrated
    user_images, user_labels = (torch.from_numpy(a) for a in splits.load_or_empty(args.users))
    user_logits = predict_logits(model, user_images, norm["mean"], norm["std"], params.evaluate.batch_size, device)
    metrics["users"] = reports.users_metrics(user_logits, user_labels, calibrated["temperature"])
    write_json(args.metrics, metrics)
    predicted = logits.argmax(1)
    write_json(args.confusion, reports.confusion_rows(labels, predicted, classes))
    reports.plot_confusion(reports.confusion_matrix(labels, predicted, len(classes)), classes, args.confusion_png)
    reports.plot_misclassified(images, labels, logits, classes, args.misclassified_png)
    reports.plot_history(history, args.curves_png)
    t = calibrated["temperature"]
    reports.plot_reliability(
        reliable_before, reliable_after, t, (calibrated["ece_before"], calibrated["ece_after"]), args.reliability_png
    )
    print(
        f"test accuracy {metrics['accuracy']:.4f} ({metrics['errors']} errors of {metrics['samples']}), "
        f"loss {metrics['loss']:.4f}, macro F1 {metrics['macro_f1']:.4f}; temperature {t} (fitted on val): "
        f"ECE {calibrated['ece_before']:.2%} → {calibrated['ece_after']:.2%} → {args.metrics}"
    )
    users = metrics["users"]
    if users["samples"]:
        print(f"user split: accuracy {users['accuracy']:.4f} on {users['samples']} digits, ECE {users['ece']:.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
