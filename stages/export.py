"""export stage: export the checkpoint, verify parity, write a model card.

Params: export (formats, opset, parity_samples).
Reads: CHECKPOINT, TEST split (parity inputs), --eval (test accuracy for the card).
Writes: OUT_DIR/model.onnx and/or OUT_DIR/model.pt2, OUT_DIR/model_card.json, and --metrics
(per format: max absolute logit difference and top-1 agreement against PyTorch). Fails if
any format disagrees with the checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mnist_pipeline import checkpoint, export
from mnist_pipeline.data import load_split, normalise
from mnist_pipeline.datasets import DatasetError
from mnist_pipeline.fileio import sha256_file, write_json
from mnist_pipeline.models import count_parameters
from mnist_pipeline.params import load_params_or_exit, stage_parser
from mnist_pipeline.predict import load_model, model_metadata

INPUT_SPEC = "float32 N×1×28×28: grayscale, white digit on black, (pixel/255 - mean) / std; output N×10 logits"


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)

    try:
        ckpt = checkpoint.load_checkpoint(args.checkpoint)
        images, _ = load_split(args.test)
    except (checkpoint.CheckpointError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    model = checkpoint.model_from_checkpoint(ckpt)
    norm = ckpt["normalisation"]
    metadata = model_metadata(ckpt["model"], ckpt["classes"], norm["mean"], norm["std"], INPUT_SPEC)
    x = normalise(images[: params.export.parity_samples], norm["mean"], norm["std"])
    reference = model(x).detach().numpy()

    report, files = {}, {}
    for fmt in params.export.formats:
        path = args.out_dir / export.FILE_NAMES[fmt]
        if fmt == "onnx":
            export.export_onnx(model, path, params.export.opset, metadata)
        else:
            export.export_pt2(model, path, metadata)
        report[fmt] = export.parity(reference, load_model(path).run(x.numpy()))
        files[path.name] = sha256_file(path)
        print(f"{path}: max |Δlogit| {report[fmt]['max_abs_logit_diff']:.2e}, "
              f"top-1 agreement {report[fmt]['top1_agreement']:.4f} on {report[fmt]['samples']} test images")
    write_json(args.metrics, report)
    try:
        for fmt, result in report.items():
            export.check_parity(result, fmt)
    except export.ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    write_json(args.out_dir / "model_card.json", {
        "model": ckpt["model"],
        "model_kwargs": ckpt["model_kwargs"],
        "parameters": count_parameters(model),
        "test_accuracy": json.loads(args.eval.read_text())["accuracy"],
        "classes": ckpt["classes"],
        "normalisation": norm,
        "input": INPUT_SPEC,
        "training_params": ckpt["params"],
        "training_data_sha256": ckpt["data"],
        "best_validation": ckpt["best"],
        "files_sha256": files,
        "parity": report,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
