"""evaluate stage: score the checkpoint on the test split (the only stage that reads it).

Params: evaluate (batch_size).
Reads: CHECKPOINT, DATA_DIR/test.pt, HISTORY (training curves).
Writes: --metrics (accuracy, loss, macro F1, per-class precision/recall/F1, errors, params),
--confusion ({actual, predicted} rows for DVC's confusion template) and, in --plots,
confusion.png, misclassified.png and curves.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from mnist_pipeline import checkpoint, reports
from mnist_pipeline.data import load_split
from mnist_pipeline.datasets import DatasetError
from mnist_pipeline.engine import predict_logits, select_device
from mnist_pipeline.fileio import write_json
from mnist_pipeline.models import count_parameters
from mnist_pipeline.params import load_params_or_exit, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data_dir", type=Path)
    for option in ("history", "metrics", "confusion", "plots"):
        parser.add_argument(f"--{option}", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)

    try:
        ckpt = checkpoint.load_checkpoint(args.checkpoint)
        images, labels = load_split(args.data_dir / "test.pt")
        device = select_device()
    except (checkpoint.CheckpointError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    model = checkpoint.model_from_checkpoint(ckpt).to(device)
    norm, classes = ckpt["normalisation"], ckpt["classes"]
    logits = predict_logits(model, images, norm["mean"], norm["std"], params.evaluate.batch_size, device)

    metrics = reports.classification_metrics(logits, labels, classes, count_parameters(model))
    write_json(args.metrics, metrics)
    predicted = logits.argmax(1)
    write_json(args.confusion, reports.confusion_rows(labels, predicted, classes))
    reports.plot_confusion(reports.confusion_matrix(labels, predicted, len(classes)), classes,
                           args.plots / "confusion.png")
    reports.plot_misclassified(images, labels, logits, classes, args.plots / "misclassified.png")
    reports.plot_history(pd.read_csv(args.history), args.plots / "curves.png")
    print(f"test accuracy {metrics['accuracy']:.4f} ({metrics['errors']} errors of {metrics['samples']}), "
          f"loss {metrics['loss']:.4f}, macro F1 {metrics['macro_f1']:.4f} → {args.metrics}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
