"""Export a model to ONNX and torch.export (.pt2), and measure each against PyTorch.

The file format (names, input spec, metadata, loader) is `exported.py`'s; parity is
measured on what `exported.load_model` reads back, the path `mnist-predict` takes.
TorchScript is deprecated in torch 2.14 and is not offered.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnist_pipeline.errors import ParityError
from mnist_pipeline.exported import INPUT_NAME, OUTPUT_NAME, PT2_METADATA
from mnist_pipeline.fileio import write_bytes


def _example() -> tuple[torch.Tensor, dict[str, Any]]:
    example = torch.zeros(2, 1, 28, 28)
    return example, {"x": {0: torch.export.Dim("batch", min=1)}}


# Both exporters record, per node, the Python stack that produced it: absolute paths and line
# numbers of this checkout. Dropped, so an export depends on the model, not on where the code lies.
ONNX_TRACE, PT2_TRACE = "pkg.torch.onnx.stack_trace", "stack_trace"


def export_onnx(model: nn.Module, path: Path, opset: int, metadata: dict[str, str]) -> None:
    example, dynamic = _example()
    program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=opset,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=dynamic, verbose=False)
    for node in program.model.graph.all_nodes():
        node.metadata_props.pop(ONNX_TRACE, None)
    program.model.metadata_props.update(metadata)
    # ONNXProgram.save writes in place; render to bytes to keep the write atomic.
    buffer = io.BytesIO()
    program.save(buffer)
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


def check_parity(report: dict[str, float], fmt: str, tolerance: float = 1e-4) -> None:
    if report["top1_agreement"] < 1.0 or report["max_abs_logit_diff"] > tolerance:
        raise ParityError(
            f"{fmt} export disagrees with the PyTorch checkpoint: top-1 agreement {report['top1_agreement']:.4f} "
            f"(expected 1.0), max logit difference {report['max_abs_logit_diff']:.2e} (expected ≤ {tolerance:g})"
        )
