"""Fail when the committed dvc.lock no longer matches the code, params or commands it records.

    python scripts/check_lock.py [REPO]

Runs `dvc status` and reports every stage whose command changed, whose params changed, or
whose dependency or git-kept output differs from what dvc.lock says. Data that is merely
absent (a fresh clone with an empty cache: "deleted", "not in cache") is not a change. CI
runs this through tests/test_lock.py; a pre-commit hook can run it as it is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ABSENT = {"deleted", "not in cache"}


def stale_entries(status: dict) -> list[str]:
    """'stage: what changed' for each change in `dvc status --json` that is not just missing data."""
    found = []
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed"
                found.append(f"{stage}: {change}")
                continue
            for kind, entries in change.items():
                for path, state in entries.items():
                    if isinstance(state, dict):  # params: {key: "modified" | "new" | "deleted"}
                        found += [f"{stage}: {kind[:-1]} {path} {key} {how}" for key, how in state.items()]
                    elif state not in ABSENT:
                        found.append(f"{stage}: {kind[:-1]} {path} {state}")
    return found


def main(argv: list[str] | None = None) -> int:
    repo = Path((argv or sys.argv[1:] or ["."])[0])
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    result = subprocess.run([dvc, "status", "--json"], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: `dvc status` failed: {result.stderr.strip()}", file=sys.stderr)
        return 2
    stale = stale_entries(json.loads(result.stdout or "{}"))
    if stale:
        print("dvc.lock is stale: code, params or outputs changed since it was written:\n  " + "\n  ".join(stale)
              + "\nRun `dvc repro` (with MNIST_MIRROR where there is no internet) and commit dvc.lock and the "
              "metrics with the change.", file=sys.stderr)
        return 1
    print("dvc.lock matches the code, params and commands")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
