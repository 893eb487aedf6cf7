"""export stage: export the checkpoint, verify parity, write a model card.

Params: export (formats, opset, parity_samples).
Reads: CHECKPOINT, DATA_DIR/test.pt (the first parity_samples images, as parity inputs only:
nothing is selected on them), --eval (test accuracy for the card, and the temperature fitted on
validation, which becomes the exported graph's last layer).
Writes: OUT_DIR/model.onnx and/or OUT_DIR/model.pt2 (taking [0, 1] pixels: the normalisation
is inside), --card (the model card: small and byte-stable, so it is kept in git while the models
go to the DVC cache; it names --lock's SHA-256 and the versions of torch, numpy, onnx and onnxruntime that
made it), --metrics (per format: top-1 agreement with PyTorch and the bound its largest
logit difference passed, and the same through images.prepare from PNG bytes, the path mnist-predict
and mnist-serve take) and --parity (the differences as measured: onnxruntime picks its kernels by
CPU, so they are this machine's own and, like the timing logs, kept out of DVC and git). Fails if any
format disagrees with the checkpoint.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
import json
from pathlib import Path
from typing import Any

from mnist_pipeline import export, exported, processed, stage
from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.data import to_unit
from mnist_pipeline.errors import DatasetError
from mnist_pipeline.fileio import sha256_file, write_json
from mnist_pipeline.models import count_parameters


def configure(parser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--card", type=Path, required=True)
    parser.add_argument("--parity", type=Path, required=True)
    parser.add_argument("--lock", type=Path, required=True, help="the environment's lock (requirements.txt)")


def evaluated(path: Path) -> tuple[float, dict]:
    """(test accuracy, calibration) from the evaluate stage's metrics."""
    try:
        metrics = json.loads(path.read_text())
        accuracy, calibrated = metrics["accuracy"], metrics["calibration"]
        temperature = calibrated["temperature"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{path}: no test accuracy and calibration in it ({type(exc).__name__}: {exc}); run `dvc repro evaluate`"
        ) from None
    if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool) or not 0 <= accuracy <= 1:
        raise DatasetError(f"{path}: accuracy {accuracy!r} is not a number between 0 and 1; run `dvc repro evaluate`")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature < 1e3:
        raise DatasetError(f"{path}: temperature {temperature!r} is not a positive number; run `dvc repro evaluate`")
    return accuracy, calibrated


def environment(lock: Path) -> dict[str, str]:
    """The lock this environment was installed from, and the versions of what computed and exported the model
    (every stage lists the lock among its deps, so the checkpoint was trained by the same packages)."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    try:
        digest = sha256_file(lock)
    except OSError as exc:
        raise DatasetError(f"{lock}: cannot read the lock ({exc.strerror})") from None
    return {
        "lock": lock.name,
        "lock_sha256": digest,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args, params = stage.parse(__doc__, configure, argv)
    accuracy, calibrated = evaluated(args.eval)  # checked first: a bad file fails before seconds of export
    env = environment(args.lock)
    ckpt = load_checkpoint(args.checkpoint)
    images, _ = processed.load_split(args.data_dir, "test")
    norm = ckpt.normalisation
    model = export.deployable(ckpt.build(), norm["mean"], norm["std"], calibrated["temperature"])
    metadata = exported.metadata(ckpt.model, ckpt.classes, norm["mean"], norm["std"])
    sample = images[: params.export.parity_samples]
    x = to_unit(sample)
    reference = model(x).detach().numpy()
    digits = export.served_inputs(sample)  # prepared once: every format is compared on the same digits

    report: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}
    for fmt in params.export.formats:
        path = args.out_dir / exported.FILE_NAMES[fmt]
        if fmt == "onnx":
            export.export_onnx(model, path, params.export.opset, metadata)
        else:
            export.export_pt2(model, path, metadata)
        # This stage wrote the .pt2 itself a moment ago, so unpickling it is trusted.
        loaded = exported.load_model(path, trust_pickle=True)
        report[fmt] = {
            **export.parity(reference, loaded.run(x.numpy())),
            "prepared_path": export.prepared_parity(model, loaded, digits),
        }
        files[path.name] = sha256_file(path)
        print(
            f"{path}: max |Δlogit| {report[fmt]['max_abs_logit_diff']:.2e}, "
            f"top-1 agreement {report[fmt]['top1_agreement']:.4f} on {report[fmt]['samples']} test images; "
            f"through images.prepare: max |Δp| {report[fmt]['prepared_path']['max_abs_prob_diff']:.2e}"
        )
    write_json(args.parity, report)
    for name, result in report.items():
        export.check_parity(result, name)
    kept = {name: export.bounded(result) for name, result in report.items()}
    write_json(args.metrics, kept)

    write_json(
        args.card,
        {
            "model": ckpt.model,
            "model_kwargs": ckpt.model_kwargs,
            "parameters": count_parameters(model),  # the Standardise layer has none
            "test_accuracy": accuracy,
            "classes": ckpt.classes,
            "normalisation": norm,
            "calibration": calibrated,
            "input": exported.INPUT_SPEC,
            "training_params": ckpt.params,
            # How many users' corrections trained it, from which snapshot (mnist-feedback snapshot).
            "feedback": ckpt.params.get("feedback", {"corrections": 0, "snapshot": "none"}),
            "training_data_sha256": ckpt.data,
            "best_validation": ckpt.best,
            "files_sha256": files,
            "checkpoint_sha256": sha256_file(args.checkpoint),  # what they were exported from: the gate checks the pair
            "parity": kept,
            "environment": env,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
