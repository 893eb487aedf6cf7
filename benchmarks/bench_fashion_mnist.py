"""Fashion-MNIST through the same pipeline: the default CNN recipe's test accuracy.

    FASHION_MNIST_MIRROR=/usr/share/datasets/fashion-mnist python benchmarks/bench_fashion_mnist.py

In a clone of this repository at HEAD, `dvc exp run -S dataset=fashion_mnist -S model=cnn`
with MNIST_MIRROR pointing at the Fashion-MNIST files (Debian's dataset-fashion-mnist ships
them, recompressed: they are accepted through the pinned payload sha256s), seed 42 as
params.yaml has it. tests/test_real_data.py runs the same command in CI with a floor.
Writes benchmarks/results/fashion_mnist.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common

OVERRIDES = ["dataset=fashion_mnist", "model=cnn"]


def main() -> None:
    mirror = os.environ.get("FASHION_MNIST_MIRROR")
    if not mirror:
        sys.exit("set FASHION_MNIST_MIRROR to a folder of the four Fashion-MNIST .gz files "
                 "(Debian: apt-get install dataset-fashion-mnist → /usr/share/datasets/fashion-mnist)")
    with tempfile.TemporaryDirectory() as tmp:
        repo = common.clone(Path(tmp), "repo")
        env = {**os.environ, "MNIST_MIRROR": mirror, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1"}
        start = time.perf_counter()
        common.run([common.DVC, "exp", "run", *[a for o in OVERRIDES for a in ("-S", o)], "-n", "fashion-cnn"],
                   repo, env)
        seconds = time.perf_counter() - start
        metrics = json.loads((repo / "metrics" / "eval.json").read_text())
        seed = common.defaults().seed
    print(f"Fashion-MNIST, default CNN recipe, seed {seed}: test accuracy {metrics['accuracy']:.4f} "
          f"({seconds:.0f} s for the experiment)")
    common.save("fashion_mnist", {
        "command": f"MNIST_MIRROR=<fashion-mnist> dvc exp run {' '.join('-S ' + o for o in OVERRIDES)}",
        "source": "FASHION_MNIST_MIRROR (Debian's dataset-fashion-mnist: recompressed, accepted through the pinned "
                  "payload sha256s)",
        "model": "cnn", "params": metrics["params"], "seed": seed, "test_accuracy": metrics["accuracy"],
        "calibration": metrics["calibration"], "experiment_seconds": round(seconds, 1)})


if __name__ == "__main__":
    main()
