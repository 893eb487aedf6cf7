"""Write the example images docs/serving.md runs `mnist-predict` and `curl` on.

    python scripts/example_images.py OUT_DIR      # needs data/processed (dvc repro)

- seven.jpg: the test set's first 7 as dark ink, 4× larger, off centre on a 640×480 off-white
  page, a colour JPEG, as a phone photo of a note would be;
- three.png: the test set's first 3 in black on a transparent background, as drawing apps export;
- notes.txt: not an image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_pipeline.processed import load_split


def first(images: np.ndarray, labels: np.ndarray, digit: int) -> np.ndarray:
    return images[int(np.flatnonzero(labels == digit)[0])]


def main(out: Path) -> None:
    images, labels = (t.numpy() for t in load_split(Path("data/processed"), "test"))
    out.mkdir(parents=True, exist_ok=True)
    seven = Image.fromarray(255 - first(images, labels, 7)).resize((112, 112), Image.BICUBIC)
    page = Image.new("RGB", (640, 480), (236, 232, 220))
    page.paste(Image.merge("RGB", [seven] * 3), (380, 90))
    page.save(out / "seven.jpg", quality=90)
    three = first(images, labels, 3)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = three  # black ink, its opacity the digit's intensity
    Image.fromarray(rgba, "RGBA").save(out / "three.png")
    (out / "notes.txt").write_text("not an image\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
