"""Rerun the pipeline and require the committed bytes (CI's reproduction check).

    MNIST_MIRROR=/path/to/mnist python scripts/check_repro.py

Runs `dvc repro --no-run-cache`, then fails (exit 1) unless `git status` is clean: dvc.lock (the hash
of every output: tensors, checkpoint, exported models, figures) and the outputs git keeps (metrics,
history, confusion data, DVCLive's logs, the model card) must be byte-identical to the commit. With
the portable kernels (mnist_pipeline/kernels.py) that holds on any x86-64 CPU with AVX2, whoever
wrote the lock; `dvc metrics diff` is printed to show what moved when it does not.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"


def changed_files() -> list[str]:
    """Tracked files that differ from HEAD."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                            text=True, check=True).stdout
    return [line[3:] for line in status.splitlines()]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    # --no-run-cache: outputs must be computed again, not restored from an earlier run's record.
    subprocess.run([DVC, "repro", "--no-run-cache"], check=True)
    changed = changed_files()
    if not changed:
        print("== byte-level: identical to the commit (dvc.lock and every output git keeps)")
        return 0
    table = subprocess.run([DVC, "metrics", "diff", "--md"], capture_output=True, text=True, check=True).stdout
    print("== dvc metrics diff (committed → rerun)\n" + (table.strip() or "no change"))
    print("error: the rerun differs from the commit in:\n  " + "\n  ".join(changed), file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
