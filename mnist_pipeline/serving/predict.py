"""mnist-predict: classify image files with the exported model.

    mnist-predict digit.png photo.jpg [--model models/export/model.onnx] [--json] [--top-k 3]

Each file is prepared by `images.prepare` (the server uses the same function) and
the batch runs through `exported.load_model`. The default ONNX path imports numpy,
Pillow and onnxruntime only — not torch — so a prediction starts fast. A `.pt2`
model is unpickled by torch, which can run code from the file, so it is loaded only
with `--trust-pt2`. One output line per file; a file that cannot be read gets an
error line and the others are still answered; the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mnist_pipeline.defaults import DEFAULT_MODEL
from mnist_pipeline.errors import ModelFileError
from mnist_pipeline.exported import load_model
from mnist_pipeline.images import FORMAT_NAMES, ImageError, prepare_file


def format_line(path: str, probs: np.ndarray, classes: list[str], top_k: int) -> str:
    order = np.argsort(-probs, kind="stable")[:top_k]
    return f"{path}: " + ", ".join(f"{classes[i]} ({probs[i]:.1%})" for i in order)


def json_record(path: str, probs: np.ndarray, classes: list[str], top_k: int) -> dict:
    order = np.argsort(-probs, kind="stable")[:top_k]
    return {
        "file": path,
        "prediction": classes[order[0]],
        "confidence": round(float(probs[order[0]]), 6),
        "top_k": [{"class": classes[i], "probability": round(float(probs[i]), 6)} for i in order],
        "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-predict", description="Classify handwritten digit images.")
    parser.add_argument("images", nargs="+", type=Path, help=f"image files: {FORMAT_NAMES}")
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"exported model, .onnx (default {DEFAULT_MODEL}) or .pt2 with --trust-pt2",
    )
    parser.add_argument(
        "--trust-pt2",
        action="store_true",
        help="allow a .pt2 model: torch loads it with pickle, which can run code from the file, "
        "so use it only for files you made yourself",
    )
    parser.add_argument("--json", action="store_true", help="JSON lines with all class probabilities")
    parser.add_argument("--top-k", type=int, default=1, help="show the k most likely classes (default 1)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, trust_pickle=args.trust_pt2)
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not 1 <= args.top_k <= len(model.classes):
        print(f"error: --top-k {args.top_k}: expected 1 to {len(model.classes)}", file=sys.stderr)
        return 2

    prepared: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for i, path in enumerate(args.images):
        try:
            prepared[i] = prepare_file(path)
        except ImageError as exc:  # the documented refusals
            errors[i] = str(exc)
        except Exception as exc:  # a bug in preparation: still this file's line, never the run's end
            errors[i] = f"internal error while preparing this file ({type(exc).__name__}: {exc}); please report it"
    # One batched inference call for every readable image, then answers in input order.
    probs = dict(zip(prepared, model.probabilities(np.stack(list(prepared.values()))), strict=True)) if prepared else {}
    for i, path in enumerate(args.images):
        if i in errors:
            if args.json:
                print(json.dumps({"file": str(path), "error": errors[i]}))
            else:
                print(f"{path}: error: {errors[i]}", file=sys.stderr)
        elif args.json:
            print(json.dumps(json_record(str(path), probs[i], model.classes, args.top_k)))
        else:
            print(format_line(str(path), probs[i], model.classes, args.top_k))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
