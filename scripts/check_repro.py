"""Rerun the pipeline and compare it with the committed metrics (CI's reproduction check).

    MNIST_MIRROR=/path/to/mnist python scripts/check_repro.py [--tolerance 0.001]

Runs `dvc repro --no-run-cache`, then `dvc metrics diff` against HEAD. Fails (exit 1) when the test
accuracy moved by more than the tolerance (0.1 point). Any byte-level difference in
dvc.lock or in the git-kept outputs is reported but does not fail: another CPU or BLAS
build may differ in the last bits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

METRICS = "metrics/eval.json"
DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"


def accuracy_change(diff: dict) -> float:
    """New minus committed test accuracy, from `dvc metrics diff --json` (0 when unchanged)."""
    entry = diff.get(METRICS, {}).get("accuracy")
    return float(entry.get("diff") or 0.0) if entry else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.001, help="largest accepted accuracy change (0.001)")
    args = parser.parse_args(argv)

    # --no-run-cache: outputs must be computed again, not restored from an earlier run's record.
    subprocess.run([DVC, "repro", "--no-run-cache"], check=True)
    table = subprocess.run([DVC, "metrics", "diff", "--md"], capture_output=True, text=True, check=True).stdout
    print("== dvc metrics diff (committed → rerun)\n" + (table.strip() or "no change"))
    diff = json.loads(subprocess.run([DVC, "metrics", "diff", "--json"], capture_output=True, text=True,
                                     check=True).stdout or "{}")
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, check=True).stdout.strip()
    print("== byte-level: " + ("identical to the commit" if not changed else "these files differ (reported, "
                                "not a failure):\n" + changed))
    moved = accuracy_change(diff)
    if abs(moved) > args.tolerance:
        print(f"error: test accuracy moved by {moved * 100:+.2f} points (tolerance ±{args.tolerance * 100:.2f})",
              file=sys.stderr)
        return 1
    print(f"test accuracy within ±{args.tolerance * 100:.2f} points of the committed value ({moved * 100:+.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
