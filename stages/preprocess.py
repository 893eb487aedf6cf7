"""preprocess stage: parse the IDX files, split train/val, write tracked uint8 tensors.

Params: seed, dataset, data (val_size).
Reads: RAW_DIR/ (the verified IDX files).
Writes: OUT_DIR/{train,val,test}.pt ({"images": uint8 N×28×28, "labels": int64 N}) and
OUT_DIR/stats.json (normalisation mean/std from the train split, classes, counts).
The same raw files and params give byte-identical outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnist_pipeline.data import normalisation_stats, save_split, stratified_split
from mnist_pipeline.datasets import DATASETS, DatasetError, read_split
from mnist_pipeline.fileio import write_json
from mnist_pipeline.params import load_params_or_exit, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)

    spec = DATASETS[params.dataset]
    try:
        train_x, train_y = read_split(args.raw_dir, spec.train_images, spec.train_labels, len(spec.classes))
        test_x, test_y = read_split(args.raw_dir, spec.test_images, spec.test_labels, len(spec.classes))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if params.data.val_size >= len(train_x):
        print(f"error: params.yaml: data.val_size = {params.data.val_size} is invalid: expected fewer than "
              f"the {len(train_x)} training images in {args.raw_dir}", file=sys.stderr)
        return 2

    train_idx, val_idx = stratified_split(train_y, params.data.val_size, params.seed)
    splits = {"train": (train_x[train_idx], train_y[train_idx]), "val": (train_x[val_idx], train_y[val_idx]),
              "test": (test_x, test_y)}
    for name, (images, labels) in splits.items():
        save_split(args.out_dir / f"{name}.pt", images, labels)
    mean, std = normalisation_stats(splits["train"][0])
    write_json(args.out_dir / "stats.json", {
        "dataset": params.dataset,
        "classes": list(spec.classes),
        "mean": mean,
        "std": std,
        "counts": {name: len(labels) for name, (_, labels) in splits.items()},
    })
    print(", ".join(f"{name}: {len(labels)} images" for name, (_, labels) in splits.items())
          + f"; mean {mean:.4f}, std {std:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
