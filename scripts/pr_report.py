"""Build the pull-request report that the CI workflow posts with `cml comment create`.

    python scripts/pr_report.py --base origin/main --out report.md

Markdown with `dvc metrics diff <base> --md`, `dvc params diff <base> --md` and the
confusion matrix and curves images, referenced by relative path: CML uploads local images
a report links to (its convention), so the comment shows them. Run it after `dvc repro`
or `dvc pull`, so the images are this revision's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

IMAGES = {"Confusion matrix (test)": "plots/figures/confusion.png",
          "Loss, accuracy and error rate per epoch": "plots/figures/curves.png"}
DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"


def dvc_md(*args: str) -> str:
    result = subprocess.run([DVC, *args, "--md"], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: dvc {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip() or "_no change_"


def report(base: str, root: Path = Path(".")) -> str:
    missing = [path for path in IMAGES.values() if not (root / path).is_file()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing: run `dvc repro` or `dvc pull` first")
    parts = [f"## Model report against `{base}`",
             "### Metrics", dvc_md("metrics", "diff", base),
             "### Params", dvc_md("params", "diff", base)]
    for title, path in IMAGES.items():
        parts += [f"### {title}", f"![{title}](./{path})"]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="origin/main", help="the revision to compare with (origin/main)")
    parser.add_argument("--out", type=Path, default=Path("report.md"))
    args = parser.parse_args(argv)
    args.out.write_text(report(args.base))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
