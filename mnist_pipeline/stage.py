"""Stage plumbing: the shared argument parser, params loading and the one runner.

Every stage script is `main(argv) -> int` run by `run`, which turns a
`PipelineError` into one line on stderr and its exit code (2 for params, 1 for the
rest), and Ctrl-C into exit 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.params import Params, load_params


def parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser every stage script starts from: its summary line and `--params`."""
    result = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    result.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    return result


def parse(
    doc: str, configure: Callable[[argparse.ArgumentParser], object], argv: list[str] | None
) -> tuple[argparse.Namespace, Params]:
    """Parse a stage's arguments and load (and so validate) the whole params file."""
    stage_parser = parser(doc)
    configure(stage_parser)
    args = stage_parser.parse_args(argv)
    return args, load_params(args.params)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's `main`; an expected failure is one line and an exit code, never a traceback."""
    try:
        return main(argv) or 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def package_modules() -> list[Path]:
    """The files of this package's modules loaded in this process, sorted.

    What a stage imports is what its result depends on: the train stage fingerprints
    these files for its resume state, and tests/test_dvc_yaml.py checks that each
    stage's DVC deps are exactly these."""
    return sorted(
        Path(file)
        for name, module in list(sys.modules.items())
        if name.startswith("mnist_pipeline.") and (file := getattr(module, "__file__", None))
    )
