"""ONNX export: the ways torch 2.14 offers, timed on the shipped CNN and MLP, same run.

    python benchmarks/bench_export.py

Each is timed in a fresh Python process (what the export stage pays: imports included) and,
after one warm-up, in-process (median of 3). Each exported file is read back by onnxruntime
and compared with the PyTorch logits on random inputs (max |Δlogit| ≤ 1e-4, same top-1).

- dynamo: `torch.onnx.export(model, dynamo=True)` — what the export stage uses;
- dynamo, optimize=False: the same without the onnxscript graph optimizer;
- from ExportedProgram: `torch.export.export` once (the .pt2 format needs that trace anyway),
  then `torch.onnx.export(program)`;
- legacy TorchScript exporter (`dynamo=False`): deprecated in torch 2.14 ("will be removed"),
  timed for reference only.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

import common  # noqa: E402
from mnist_pipeline.models import build_model

WAYS = ("dynamo", "dynamo_no_optimize", "from_exported_program", "legacy_torchscript")


def export(model: torch.nn.Module, way: str) -> bytes:
    example = torch.zeros(2, 1, 28, 28)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1)}}
    names = {"input_names": ["x"], "output_names": ["logits"], "opset_version": 18}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if way == "legacy_torchscript":
            torch.onnx.export(model, (example,), buffer, dynamo=False, dynamic_axes={"x": {0: "batch"}}, **names)
            return buffer.getvalue()
        if way == "from_exported_program":
            model = torch.export.export(model, (example,), dynamic_shapes=dynamic)
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic,
                                    optimize=way != "dynamo_no_optimize", verbose=False, **names)
    program.save(buffer)
    return buffer.getvalue()


def model(name: str) -> torch.nn.Module:
    params = common.defaults().model_copy(update={"model": name})
    torch.manual_seed(0)
    return build_model(name, **params.model_kwargs()).eval()


def parity(net: torch.nn.Module, onnx: bytes) -> float:
    x = torch.randn(64, 1, 28, 28)
    reference = net(x).detach().numpy()
    got = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert (reference.argmax(1) == got.argmax(1)).all()
    return float(np.abs(reference - got).max())


def child(name: str, way: str) -> None:
    """One export in a fresh process; prints its seconds after the imports it needs."""
    start = time.perf_counter()
    export(model(name), way)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    results: dict = {"models": {}}
    for name in ("mlp", "cnn"):
        net, entry = model(name), {}
        for way in WAYS:
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", name, way], check=True, capture_output=True)
            cold = time.perf_counter() - start
            warm = common.median_time(lambda: export(net, way), repeats=3)
            onnx = export(net, way)
            entry[way] = {"cold_process_seconds": round(cold, 2), "warm_seconds": round(warm, 3),
                          "max_abs_logit_diff": parity(net, onnx), "bytes": len(onnx)}
            print(f"{name} {way}: fresh process {cold:.2f} s, warm {warm:.3f} s, "
                  f"max |Δlogit| {entry[way]['max_abs_logit_diff']:.1e}", flush=True)
        results["models"][name] = entry
    common.save("export", results)


if __name__ == "__main__":
    main()
