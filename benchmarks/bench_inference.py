"""Inference speed: PyTorch eager against onnxruntime, and mnist-predict's cold start.

    python benchmarks/bench_inference.py        # needs the pipeline's outputs (dvc repro)

- throughput over the 10,000 test images (batches of 1,000, and batch 1 on 1,000 images),
  median of 5 runs, for the checkpoint in eager PyTorch and the exported ONNX model;
- cold start: wall time of `mnist-predict one.png` as a fresh process (median of 5),
  against the bare `python -c "import torch"` that any PyTorch-based CLI pays first;
- test-time views (`<model>.views`): the checkpoint's weights exported with 5 and 9 views,
  onnxruntime throughput against the single view, same run: what averaging costs a server.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

import common
from mnist_pipeline import checkpoint
from mnist_pipeline.data import to_unit
from mnist_pipeline.export import deployable, export_onnx
from mnist_pipeline.models import build_model


def throughput(run, x: np.ndarray, batch: int) -> float:
    def once():
        for i in range(0, len(x), batch):
            run(x[i : i + batch])
    return len(x) / common.median_time(once)


def wall(cmd: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))  # the first run warms the OS file cache


def main() -> None:
    ckpt_path = common.ROOT / "models" / "checkpoint.pt"
    onnx_path = common.ROOT / "models" / "export" / "model.onnx"
    if not onnx_path.exists():
        sys.exit("run `dvc repro` first: this benchmark uses models/checkpoint.pt and models/export/model.onnx")
    ckpt = checkpoint.load_checkpoint(ckpt_path)
    model = deployable(ckpt.build(), ckpt.normalisation["mean"], ckpt.normalisation["std"])
    images, _ = common.processed()["test"]
    x = to_unit(images).numpy()  # what both take: [0, 1] pixels, normalised inside the model
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def eager(batch: np.ndarray) -> None:
        with torch.inference_mode():
            model(torch.from_numpy(batch))

    def onnx(batch: np.ndarray) -> None:
        session.run(None, {"image": batch})

    results: dict = {"model": ckpt.model, "throughput_images_per_second": {}}
    for label, batch, data in (("batch_1000", 1000, x), ("batch_1", 1, x[:1000])):
        ours, theirs = throughput(onnx, data, batch), throughput(eager, data, batch)
        results["throughput_images_per_second"][label] = {"onnxruntime": round(ours), "pytorch_eager": round(theirs),
                                                          "ratio": round(ours / theirs, 2)}
        print(f"{label}: onnxruntime {ours:,.0f} img/s, PyTorch eager {theirs:,.0f} img/s ({ours / theirs:.2f}×)")

    with tempfile.TemporaryDirectory() as tmp:
        digit = Path(tmp) / "digit.png"
        Image.fromarray(255 - images[0].numpy()).resize((140, 140)).save(digit)
        predict_cmd = [shutil.which("mnist-predict") or "mnist-predict", str(digit), "--model", str(onnx_path)]
        cold = wall(predict_cmd)
        torch_import = wall([sys.executable, "-c", "import torch"])
    results["cold_start_seconds"] = {"mnist_predict": round(cold, 3), "python_import_torch": round(torch_import, 3),
                                     "ratio": round(torch_import / cold, 2)}
    print(f"cold start: mnist-predict {cold:.2f} s; `import torch` alone {torch_import:.2f} s")

    results["views"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for views in (1, 5, 9):
            averaged = build_model(ckpt.model, **{**ckpt.model_kwargs, "views": views})
            averaged.load_state_dict(ckpt.state_dict)
            path = Path(tmp) / f"views{views}.onnx"
            export_onnx(deployable(averaged, ckpt.normalisation["mean"], ckpt.normalisation["std"]), path, 18, {})
            views_session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            rates = {label: round(throughput(lambda b: views_session.run(None, {"image": b}), data, batch))
                     for label, batch, data in (("batch_1000", 1000, x), ("batch_1", 1, x[:1000]))}
            results["views"][str(views)] = rates
            print(f"{views} view(s): onnxruntime {rates['batch_1000']:,} img/s in batches of 1,000, "
                  f"{rates['batch_1']:,} img/s one at a time")
    common.save("inference", results)


if __name__ == "__main__":
    main()
