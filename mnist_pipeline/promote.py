"""mnist-promote: a blessed model becomes the next served version; a rollback is one command.

    mnist-promote [--to models/serving]        the exported model, if the gate blessed these very bytes
    mnist-promote rollback [--to DIR]          serve the version before the one served (a running
                                               `mnist-serve --model DIR` switches within seconds)
    mnist-promote pin N | unpin [--to DIR]     serve version N whatever is newer; serve the newest again
    mnist-promote list [--to DIR]              the versions, their models, which one is served

Promotion reads metrics/gate.json (the gate stage's verdict) and refuses unless it blessed the
checkpoint and ONNX file that are here now, against the champion that models/champion.json names now.
It publishes the ONNX file with its model card and verdict as a new numbered version (registry.py),
unpins, and makes it the champion: commit models/champion.json (and `dvc push`, which keeps its
checkpoint) so that the next candidate is judged against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mnist_pipeline import gate as gating
from mnist_pipeline import registry
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import sha256_file, write_json

DEFAULT_BASE = Path("models/serving")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: no {what} ({exc}); run `dvc repro`") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: not a {what}")
    return data


def promote(base: Path, gate: Path, model: Path, checkpoint: Path, card: Path, champion: Path) -> tuple[int, str]:
    """Publish the blessed model: (its version, its SHA-256)."""
    verdict = read_json(gate, "gate verdict")
    if verdict.get("blessed") is not True:
        reasons = "; ".join(verdict.get("reasons") or []) or "no reason recorded"
        raise PipelineError(f"{gate}: the candidate is not blessed ({reasons}); nothing promoted")
    here = gating.identity(checkpoint.read_bytes(), model)
    if verdict.get("candidate") != here:
        raise PipelineError(f"{gate} blessed another model than {model} and {checkpoint}; run `dvc repro` first")
    if verdict.get("champion") != gating.read_champion(champion):
        raise PipelineError(f"{gate} judged against another champion than {champion} names; run `dvc repro` first")
    newest = max(registry.versions(base), default=None)
    if newest is not None and sha256_file(registry.model_path(base, newest)) == here["model_sha256"]:
        # Published already: by this command cut short before it wrote the champion record, or by an earlier run.
        # Finish the job rather than refuse it, or the next gate judges against a model no one serves.
        version = newest
    else:
        files = {registry.MODEL: model, "gate.json": gate}
        if card.is_file():
            files["model_card.json"] = card
        version = registry.publish(base, files, expected_sha256=here["model_sha256"])
    registry.pin(base, None)
    write_json(champion, {"version": version, **here})  # last: until it is written, running this again finishes
    return version, here["model_sha256"]


def listing(base: Path) -> list[str]:
    served = registry.current(base)
    pin = registry.pinned(base)
    lines = []
    for v in registry.versions(base):
        mark = " ← served" + (" (pinned)" if pin == v else "") if v == served else ""
        lines.append(f"{v}: {sha256_file(registry.model_path(base, v))}{mark}")
    return lines or [f"{base}: no versions"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-promote", description=__doc__.strip().splitlines()[0])
    parser.add_argument("action", nargs="?", default="promote", choices=["promote", "rollback", "pin", "unpin", "list"])
    parser.add_argument("version", nargs="?", type=int, help="pin: the version to serve")
    parser.add_argument("--to", type=Path, default=DEFAULT_BASE, help=f"the model base path (default {DEFAULT_BASE})")
    parser.add_argument("--gate", type=Path, default=Path("metrics/gate.json"))
    parser.add_argument("--model", type=Path, default=Path("models/export/model.onnx"))
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint.pt"))
    parser.add_argument("--card", type=Path, default=Path("models/model_card.json"))
    parser.add_argument("--champion", type=Path, default=Path("models/champion.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "promote":
            version, sha = promote(args.to, args.gate, args.model, args.checkpoint, args.card, args.champion)
            print(
                f"promoted {args.model} as version {version} of {args.to} ({sha[:12]}); it is the champion now: "
                f"`git add {args.champion} && git commit` and `dvc push`"
            )
        elif args.action == "rollback":
            print(f"{args.to}: serving version {registry.rollback(args.to)} (pinned; `mnist-promote unpin` undoes it)")
        elif args.action == "pin":
            if args.version is None:
                raise PipelineError("pin needs a version: `mnist-promote pin N`")
            registry.pin(args.to, args.version)
            print(f"{args.to}: serving version {args.version} (pinned)")
        elif args.action == "unpin":
            registry.pin(args.to, None)
            print(f"{args.to}: serving the newest version, {registry.current(args.to)}")
        else:
            print("\n".join(listing(args.to)))
    except (PipelineError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
