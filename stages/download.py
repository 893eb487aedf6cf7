"""download stage: fetch the dataset's four IDX files and verify each one.

Params: dataset.
Writes: OUT_DIR/ holding train/t10k images/labels .gz, each verified against pinned checksums.
Environment: MNIST_MIRROR, a folder or file:// / http(s):// URL tried before the public mirrors.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnist_pipeline.datasets import DATASETS, DatasetError, download
from mnist_pipeline.params import load_params_or_exit, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)

    spec = DATASETS[params.dataset]
    try:
        fetched = download(spec, args.out_dir, log=lambda msg: print(msg, file=sys.stderr))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, source in fetched.items():
        print(f"{args.out_dir / name}: {'already present, verified' if source == 'present' else 'verified, from ' + source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
