"""mnist-predict: classify image files with the exported model.

    mnist-predict digit.png photo.jpg [--model models/export/model.onnx] [--json] [--top-k 3]

Images are prepared the way MNIST's were made: grayscale (alpha composited onto
white, 16-bit scaled down), EXIF orientation applied, polarity detected (dark ink
on light paper is inverted to MNIST's white on black), cropped to the ink, fitted
into a 20×20 box keeping the aspect ratio, pasted into 28×28 with the centre of
mass at the centre, and normalised with the model's own statistics.

The ONNX path imports numpy, Pillow and onnxruntime only — not torch — so a
prediction starts fast; a `.pt2` model loads torch on demand. One output line per
file; a file that cannot be read gets an error line and the others are still
answered; the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MODEL = Path("models/export/model.onnx")
MAX_PIXELS = 64_000_000  # larger than any camera photo; bigger files are treated as decompression bombs
INK_THRESHOLD = 0.1  # after contrast stretch: fainter pixels are paper texture, not ink
MIN_CONTRAST = 0.15  # less than this between paper and ink: nothing is written
BOX, CANVAS = 20, 28  # MNIST: digit fitted into 20×20, centred by mass in 28×28
PT2_METADATA = "model.json"  # the extra file of a .pt2 export that holds its metadata


class ImageError(ValueError):
    """An input image that cannot be classified; the message says why."""


# ---------------------------------------------------------------- preprocessing


def _open(path: Path, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > max_pixels:
                raise ImageError(f"image is {image.width}×{image.height} pixels, over the {max_pixels:,} "
                                 "pixel limit (a decompression bomb?)")
            image.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image") from None
    except UnidentifiedImageError:
        size = path.stat().st_size
        raise ImageError("empty file" if size == 0 else "not an image (or not a supported format: "
                         "PNG, JPEG, BMP, GIF, TIFF, WebP)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"truncated or corrupt image: {exc}") from None
    if image.width == 0 or image.height == 0:
        raise ImageError("image has no pixels")
    return image


def to_gray(image: Image.Image) -> np.ndarray:
    """Float array in [0, 1]: alpha composited onto white, EXIF rotation applied, 16-bit scaled."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.clip(np.asarray(image, dtype=np.float64) / 65535.0, 0.0, 1.0)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _border(gray: np.ndarray) -> np.ndarray:
    width = max(1, min(gray.shape) // 20)
    return np.concatenate([gray[:width].ravel(), gray[-width:].ravel(), gray[:, :width].ravel(), gray[:, -width:].ravel()])


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """A 28×28 float array in [0, 1], white ink on black, as MNIST digits are."""
    paper = float(np.median(_border(gray)))
    if paper > 0.5:  # dark ink on light paper
        gray, paper = 1.0 - gray, 1.0 - paper
    ink = float(gray.max())
    if ink - paper < MIN_CONTRAST:
        raise ImageError("blank image: no ink found")
    gray = np.clip((gray - paper) / (ink - paper), 0.0, 1.0)
    gray[gray < INK_THRESHOLD] = 0.0
    rows, cols = np.nonzero(gray.any(1))[0], np.nonzero(gray.any(0))[0]
    digit = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = digit.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(digit.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS))
    resized = np.clip(resized, 0.0, 1.0)
    mass = resized.sum()
    ys, xs = np.indices(resized.shape)
    cy, cx = (ys * resized).sum() / mass, (xs * resized).sum() / mass
    # MNIST's centre of mass sits at pixel index (14, 14) of the 28×28 canvas.
    top = int(np.clip(round(CANVAS / 2 - cy), 0, CANVAS - resized.shape[0]))
    left = int(np.clip(round(CANVAS / 2 - cx), 0, CANVAS - resized.shape[1]))
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return canvas


def prepare(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    with _open(path, max_pixels) as image:
        return to_mnist(to_gray(image))


# ---------------------------------------------------------------- models


@dataclass
class Model:
    run: object  # callable: float32 N×1×28×28 → N×10 logits
    classes: list[str]
    mean: float
    std: float

    def probabilities(self, digits: np.ndarray) -> np.ndarray:
        x = ((digits - self.mean) / self.std).astype(np.float32)[:, None]
        logits = np.asarray(self.run(x), dtype=np.float64)
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)


def model_metadata(model: str, classes: list[str], mean: float, std: float, input_spec: str) -> dict[str, str]:
    """What an exported file carries so that `load_model` needs nothing else (strings: ONNX metadata_props)."""
    return {"model": model, "classes": json.dumps(classes), "mean": repr(mean), "std": repr(std), "input": input_spec}


def _from_metadata(meta: dict[str, str], run, path: Path) -> Model:
    try:
        return Model(run, json.loads(meta["classes"]), float(meta["mean"]), float(meta["std"]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a model exported by this pipeline (missing metadata {exc})") from None


def load_model(path: Path) -> Model:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model (run `dvc repro` to export one, or pass --model)")
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return _from_metadata(session.get_modelmeta().custom_metadata_map,
                              lambda x: session.run(None, {name: x})[0], path)
    if path.suffix == ".pt2":
        import torch  # only this format needs it

        extra = {PT2_METADATA: ""}
        program = torch.export.load(str(path), extra_files=extra)
        module = program.module()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        return _from_metadata(json.loads(extra[PT2_METADATA] or "{}"), run, path)
    raise ValueError(f"{path}: expected a .onnx or .pt2 model")


# ---------------------------------------------------------------- command line


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
        "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-predict", description="Classify handwritten digit images.")
    parser.add_argument("images", nargs="+", type=Path, help="PNG, JPEG, BMP, GIF, TIFF or WebP files")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"exported model (default {DEFAULT_MODEL})")
    parser.add_argument("--json", action="store_true", help="JSON lines with all class probabilities")
    parser.add_argument("--top-k", type=int, default=1, help="show the k most likely classes (default 1)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # onnxruntime / torch refuse a corrupt file with their own types
        print(f"error: {args.model}: cannot load the model: {exc}", file=sys.stderr)
        return 2
    if not 1 <= args.top_k <= len(model.classes):
        print(f"error: --top-k {args.top_k}: expected 1 to {len(model.classes)}", file=sys.stderr)
        return 2

    prepared: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for i, path in enumerate(args.images):
        try:
            prepared[i] = prepare(path)
        except ImageError as exc:
            errors[i] = str(exc)
    # One batched inference call for every readable image, then answers in input order.
    probs = dict(zip(prepared, model.probabilities(np.stack(list(prepared.values()))))) if prepared else {}
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
