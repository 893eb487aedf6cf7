"""Export a model to ONNX and torch.export (.pt2), and measure each against PyTorch.

The file format (names, input spec, metadata, loader) is `exported.py`'s. What is exported
is `deployable(model, mean, std, temperature)`: the trained model behind its normalisation
and before its validation-fitted temperature, so the file takes [0, 1] pixels and its softmax
is calibrated. Parity is measured twice on what `exported.load_model` reads back:
on the test images as tensors, and through the whole path `mnist-predict` and
`mnist-serve` take (PNG bytes → `images.prepare` → `Model.probabilities`), against the
PyTorch model on the same prepared digits. TorchScript is deprecated in torch 2.14 and is
not offered.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnist_pipeline.calibration import Temperature
from mnist_pipeline.data import Standardise
from mnist_pipeline.errors import ParityError
from mnist_pipeline.exported import INPUT_NAME, OUTPUT_NAME, PT2_METADATA, Model
from mnist_pipeline.fileio import write_bytes
from mnist_pipeline.images import prepare


def deployable(model: nn.Module, mean: float, std: float, temperature: float = 1.0) -> nn.Module:
    """The model as exported: [0, 1] pixels in, calibrated logits out; the normalisation its first
    layer, the temperature fitted on validation (`calibration`) its last."""
    return nn.Sequential(Standardise(mean, std), model, Temperature(temperature)).eval()


def _example() -> tuple[torch.Tensor, tuple[dict[int, Any]]]:
    example = torch.zeros(2, 1, 28, 28)
    return example, ({0: torch.export.Dim("batch", min=1)},)  # by position: whatever the forward's argument is named


# Both exporters record, per node, the Python stack that produced it: absolute paths and line
# numbers of this checkout. Dropped, so an export depends on the model, not on where the code lies.
ONNX_TRACE, PT2_TRACE = "pkg.torch.onnx.stack_trace", "stack_trace"


def export_onnx(model: nn.Module, path: Path, opset: int, metadata: dict[str, str]) -> None:
    example, dynamic = _example()
    program = torch.onnx.export(
        model.eval(),
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic,
        verbose=False,
    )
    if program is None:  # dynamo=True always returns one; None is the legacy exporter's answer
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    for node in program.model.graph.all_nodes():
        node.metadata_props.pop(ONNX_TRACE, None)
    program.model.metadata_props.update(metadata)
    # ONNXProgram.save writes in place; render to bytes to keep the write atomic.
    buffer = io.BytesIO()
    program.save(buffer)  # type: ignore[arg-type]  # a file object works; the stub says path
    write_bytes(path, buffer.getvalue())


def export_pt2(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    example, dynamic = _example()
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic)
    for node in program.graph.nodes:
        node.meta.pop(PT2_TRACE, None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={PT2_METADATA: json.dumps(metadata)})
    write_bytes(path, buffer.getvalue())


def parity(reference: np.ndarray, exported: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_logit_diff": float(np.abs(reference - exported).max()),
        "top1_agreement": float((reference.argmax(1) == exported.argmax(1)).mean()),
        "samples": int(len(reference)),
    }


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def served_inputs(images: torch.Tensor) -> np.ndarray:
    """uint8 N×28×28 images as a user sends them, PNG files, through `images.prepare`: N×28×28 in [0, 1]."""
    return np.stack([prepare(png(image)) for image in images.numpy()])


def prepared_parity(model: nn.Module, loaded: Model, digits: np.ndarray) -> dict[str, float]:
    """The served path against PyTorch: the exported file's `probabilities` of `served_inputs`, and the
    deployable PyTorch `model` on the same prepared digits."""
    served = loaded.probabilities(digits)
    with torch.no_grad():
        reference = model(torch.from_numpy(digits)[:, None]).double().softmax(1).numpy()
    return {
        "max_abs_prob_diff": float(np.abs(reference - served).max()),
        "top1_agreement": float((reference.argmax(1) == served.argmax(1)).mean()),
        "samples": int(len(digits)),
    }


# Largest difference from PyTorch an exported model may show, in logits and in probabilities.
PARITY_TOLERANCE = 1e-4


def bounded(report: dict[str, Any], tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """A checked parity report as it is kept in git: each measured difference replaced by the bound it
    passed. The differences themselves come from onnxruntime's kernels, which each CPU chooses for
    itself, so they would change the bytes of the metrics from one machine to the next."""
    return {
        (f"{key}_bound" if key.startswith("max_abs_") else key): (
            bounded(value, tolerance) if isinstance(value, dict) else tolerance if key.startswith("max_abs_") else value
        )
        for key, value in report.items()
    }


def check_parity(report: dict[str, Any], fmt: str, tolerance: float = PARITY_TOLERANCE) -> None:
    path = report.get("prepared_path", {"top1_agreement": 1.0, "max_abs_prob_diff": 0.0})
    if report["top1_agreement"] < 1.0 or report["max_abs_logit_diff"] > tolerance:
        raise ParityError(
            f"{fmt} export disagrees with the PyTorch checkpoint: top-1 agreement {report['top1_agreement']:.4f} "
            f"(expected 1.0), max logit difference {report['max_abs_logit_diff']:.2e} (expected ≤ {tolerance:g})"
        )
    if path["top1_agreement"] < 1.0 or path["max_abs_prob_diff"] > tolerance:
        raise ParityError(
            f"{fmt} export through images.prepare disagrees with PyTorch on the same prepared digits: top-1 "
            f"agreement {path['top1_agreement']:.4f} (expected 1.0), max probability difference "
            f"{path['max_abs_prob_diff']:.2e} (expected ≤ {tolerance:g})"
        )
