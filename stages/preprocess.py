"""preprocess stage: parse the IDX files, split train/val, write tracked uint8 tensors.

Params: seed, dataset, data (val_size).
Reads: RAW_DIR/ (the verified IDX files).
Writes: OUT_DIR/{train,val,test}.pt ({"images": uint8 N×28×28, "labels": int64 N}) and
OUT_DIR/stats.json (normalisation mean/std from the train split, classes, counts).
The same raw files and params give byte-identical outputs.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
from pathlib import Path

from mnist_pipeline import processed, stage
from mnist_pipeline.data import normalisation_stats, stratified_split
from mnist_pipeline.datasets import DATASETS
from mnist_pipeline.idx import read_split


def configure(parser) -> None:
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("out_dir", type=Path)


def main(argv: list[str] | None = None) -> int:
    args, params = stage.parse(__doc__, configure, argv)
    spec = DATASETS[params.dataset]
    train_x, train_y = read_split(args.raw_dir, spec.train_images, spec.train_labels, len(spec.classes))
    test_x, test_y = read_split(args.raw_dir, spec.test_images, spec.test_labels, len(spec.classes))

    train_idx, val_idx = stratified_split(train_y, params.data.val_size, params.seed)
    splits = {
        "train": (train_x[train_idx], train_y[train_idx]),
        "val": (train_x[val_idx], train_y[val_idx]),
        "test": (test_x, test_y),
    }
    mean, std = normalisation_stats(splits["train"][0])
    stats = processed.Stats(
        dataset=params.dataset,
        classes=list(spec.classes),
        mean=mean,
        std=std,
        counts={name: len(labels) for name, (_, labels) in splits.items()},
    )
    processed.save(args.out_dir, splits, stats)
    print(
        ", ".join(f"{name}: {count} images" for name, count in stats.counts.items())
        + f"; mean {mean:.4f}, std {std:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
