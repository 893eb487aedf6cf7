"""A stand-in user population that is not MNIST: digits drawn by simulated writers with a stroke model.

Each digit is a few strokes through control points (several shapes for the digits people write
differently: 1 with or without its flag, 4 open or closed, 7 with or without a bar, 9 with a straight
or a curved tail). A *writer* is a style drawn once: which shape of each digit, slant, width,
rotation, pen width and how shaky the hand is. A *sample* is that style with fresh jitter of every
control point, rendered with round pen strokes on a 280×280 white canvas, as the page's pad makes
it, and saved as PNG: what a user would upload. Nothing of MNIST goes in, so a model that learns
these writers has learnt something MNIST does not hold.

    python benchmarks/writers.py OUT_DIR [--writers 60] [--per-digit 10] [--seed 0]

writes OUT_DIR/<writer>/<digit>_<n>.png and OUT_DIR/index.csv (file,label,writer).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Stroke = list[tuple[float, float]]
CANVAS, OVERSAMPLE = 280, 2


def _circle(cx: float, cy: float, rx: float, ry: float, start: float = -90, n: int = 12) -> Stroke:
    return [(cx + rx * math.cos(math.radians(start + 360 * i / n)), cy + ry * math.sin(math.radians(start + 360 * i / n)))
            for i in range(n + 1)]


# Unit box, x to the right, y down. Each digit: a list of shapes; each shape: a list of strokes.
SHAPES: dict[int, list[list[Stroke]]] = {
    0: [[_circle(0.5, 0.5, 0.3, 0.45)], [_circle(0.5, 0.5, 0.22, 0.45, start=-60)]],
    1: [[[(0.5, 0.05), (0.5, 0.95)]],
        [[(0.3, 0.25), (0.55, 0.05), (0.55, 0.95)]],
        [[(0.3, 0.25), (0.55, 0.05), (0.55, 0.95)], [(0.3, 0.95), (0.8, 0.95)]]],
    2: [[[(0.2, 0.25), (0.4, 0.07), (0.7, 0.1), (0.78, 0.3), (0.6, 0.55), (0.2, 0.92), (0.85, 0.92)]],
        [[(0.2, 0.3), (0.45, 0.06), (0.75, 0.2), (0.7, 0.45), (0.2, 0.9), (0.45, 0.8), (0.85, 0.9)]]],
    3: [[[(0.2, 0.15), (0.5, 0.05), (0.75, 0.2), (0.55, 0.45), (0.45, 0.48), (0.75, 0.62), (0.65, 0.92),
          (0.35, 0.95), (0.15, 0.82)]],
        [[(0.2, 0.07), (0.8, 0.07), (0.45, 0.42), (0.75, 0.6), (0.65, 0.92), (0.2, 0.9)]]],
    4: [[[(0.6, 0.05), (0.15, 0.65), (0.85, 0.65)], [(0.65, 0.3), (0.65, 0.95)]],
        [[(0.25, 0.05), (0.2, 0.55), (0.8, 0.55)], [(0.7, 0.1), (0.7, 0.95)]]],
    5: [[[(0.75, 0.07), (0.3, 0.07), (0.25, 0.45), (0.55, 0.38), (0.78, 0.6), (0.65, 0.88), (0.35, 0.95),
          (0.18, 0.85)]],
        [[(0.3, 0.07), (0.25, 0.45), (0.55, 0.38), (0.78, 0.62), (0.6, 0.92), (0.2, 0.88)], [(0.3, 0.07), (0.8, 0.07)]]],
    6: [[[(0.7, 0.08), (0.4, 0.3), (0.22, 0.65), (0.35, 0.92), (0.65, 0.9), (0.75, 0.68), (0.55, 0.52), (0.3, 0.6)]],
        [[(0.55, 0.05), (0.3, 0.45), (0.25, 0.75), (0.45, 0.95), (0.7, 0.8), (0.6, 0.58), (0.3, 0.7)]]],
    7: [[[(0.15, 0.08), (0.85, 0.08), (0.4, 0.95)]],
        [[(0.15, 0.08), (0.85, 0.08), (0.45, 0.95)], [(0.35, 0.5), (0.78, 0.5)]],
        [[(0.2, 0.2), (0.25, 0.08), (0.85, 0.1), (0.55, 0.55), (0.45, 0.95)]]],
    8: [[[(0.5, 0.5), (0.25, 0.3), (0.5, 0.06), (0.75, 0.28), (0.5, 0.5), (0.22, 0.72), (0.5, 0.95), (0.78, 0.72),
          (0.5, 0.5)]],
        [_circle(0.5, 0.27, 0.2, 0.21, start=90), _circle(0.5, 0.71, 0.26, 0.24, start=-90)]],
    9: [[[(0.75, 0.3), (0.5, 0.08), (0.25, 0.25), (0.35, 0.48), (0.7, 0.4), (0.75, 0.3), (0.72, 0.95)]],
        [[(0.75, 0.3), (0.5, 0.08), (0.25, 0.25), (0.35, 0.48), (0.7, 0.4), (0.75, 0.3), (0.7, 0.7), (0.45, 0.95)]]],
}


@dataclass(frozen=True)
class Writer:
    name: str
    shapes: tuple[int, ...]  # which shape of each digit
    slant: float  # shear, x += slant · (0.5 − y)
    width: float  # horizontal scale
    rotation: float  # degrees
    pen: float  # pen width, share of the canvas
    shake: float  # control-point jitter, share of the box
    size: float  # share of the canvas the digit spans


def writer(rng: np.random.Generator, name: str) -> Writer:
    return Writer(
        name=name,
        shapes=tuple(int(rng.integers(len(SHAPES[d]))) for d in range(10)),
        slant=float(rng.uniform(-0.45, 0.6)),
        width=float(rng.uniform(0.45, 1.2)),
        rotation=float(rng.uniform(-18, 18)),
        pen=float(rng.uniform(0.03, 0.13)),
        shake=float(rng.uniform(0.02, 0.075)),
        size=float(rng.uniform(0.45, 0.8)),
    )


def _spline(points: np.ndarray, steps: int = 12) -> np.ndarray:
    """Catmull-Rom through the points: a hand's smooth curve rather than a polygon."""
    if len(points) < 3:
        return points
    padded = np.vstack([points[0], points, points[-1]])
    out = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1 : i + 3]
        for t in np.linspace(0, 1, steps, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    out.append(padded[-2])
    return np.array(out)


def draw(w: Writer, digit: int, rng: np.random.Generator) -> bytes:
    """One sample of `digit` in `w`'s hand, as PNG bytes of a 280×280 white canvas with black ink."""
    side = CANVAS * OVERSAMPLE
    image = Image.new("L", (side, side), 255)
    pen = ImageDraw.Draw(image)
    angle = math.radians(w.rotation + rng.normal(0, 3))
    cos, sin = math.cos(angle), math.sin(angle)
    size = w.size * rng.uniform(0.92, 1.08) * side
    centre = side / 2 + rng.normal(0, 0.03, 2) * side
    width = max(2, int(w.pen * side * rng.uniform(0.85, 1.15)))
    for stroke in SHAPES[digit][w.shapes[digit]]:
        pts = np.array(stroke) + rng.normal(0, w.shake, (len(stroke), 2))
        pts[:, 0] = 0.5 + (pts[:, 0] - 0.5) * w.width + w.slant * (0.5 - pts[:, 1])
        xy = (pts - 0.5) @ np.array([[cos, sin], [-sin, cos]]) * size + centre
        curve = [tuple(p) for p in _spline(xy)]
        pen.line(curve, fill=0, width=width, joint="curve")
        for x, y in (curve[0], curve[-1]):  # round pen ends
            pen.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=0)
    buffer = io.BytesIO()
    image.resize((CANVAS, CANVAS), Image.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue()


def population(out: Path, writers: int, per_digit: int, seed: int) -> list[tuple[Path, int, str]]:
    """Write every writer's samples under `out`; return (file, label, writer) rows, also in out/index.csv."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(writers):
        w = writer(rng, f"w{i:03d}")
        (out / w.name).mkdir(parents=True, exist_ok=True)
        for digit in range(10):
            for n in range(per_digit):
                path = out / w.name / f"{digit}_{n}.png"
                path.write_bytes(draw(w, digit, rng))
                rows.append((path, digit, w.name))
    with (out / "index.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows((p.relative_to(out), d, name) for p, d, name in rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--writers", type=int, default=60)
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = population(args.out, args.writers, args.per_digit, args.seed)
    print(f"{len(rows)} digits by {args.writers} writers → {args.out}/index.csv")


if __name__ == "__main__":
    main()
