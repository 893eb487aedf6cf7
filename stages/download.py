"""download stage: fetch the dataset's four IDX files and verify each one.

Params: dataset.
Writes: OUT_DIR/ holding the decompressed train/t10k images/labels IDX files, each verified against
pinned checksums (decompressed, so dvc.lock's hash is the same whichever mirror served them).
Environment: MNIST_MIRROR, a folder or file:// / http(s):// URL tried before the public mirrors;
MNIST_CHECKSUMS, a JSON file of extra payload sha256s per dataset (private data).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnist_pipeline import stage
from mnist_pipeline.datasets import DATASETS
from mnist_pipeline.download import download
from mnist_pipeline.fileio import remove_stale_temps


def main(argv: list[str] | None = None) -> int:
    args, params = stage.parse(__doc__, lambda p: p.add_argument("out_dir", type=Path), argv)
    for stale in remove_stale_temps(args.out_dir):  # the output persists across runs: no leftovers in it
        print(f"removed {stale}, left by an interrupted download", file=sys.stderr)
    fetched = download(DATASETS[params.dataset], args.out_dir, log=lambda msg: print(msg, file=sys.stderr))
    for name, source in fetched.items():
        how = "already present, verified" if source == "present" else f"verified, from {source}"
        print(f"{args.out_dir / name}: {how}")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
