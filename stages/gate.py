"""gate stage: bless the candidate, or not, against the champion on data no user controls.

Params: gate (alpha, margin).
Reads: CHECKPOINT and EXPORTED (the candidate: its weights, and the ONNX file a promotion would
serve, which --card, the export's model card, must name as exported from those weights),
DATA_DIR/val.pt, --reviewed (corrections a reviewer accepted from held-out users: the curate
stage's), --champion (models/champion.json: the blessed model's checkpoint MD5, as DVC caches it, and
its ONNX SHA-256; `mnist-promote` rewrites it). Never the test split.
Writes: --metrics (metrics/gate.json: `blessed`, the reasons it is not, the champion and the candidate,
and per slice and class McNemar's counts and p-value; mnist_pipeline/gate.py).
A candidate with the champion's very bytes (a fresh clone's first `dvc repro`) is the champion: blessed
without loading anything. Another one needs the champion's checkpoint in the DVC cache; without it the
candidate is not blessed and the reason names what to fetch.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from mnist_pipeline import gate, processed, stage
from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.engine import predict_logits, select_device
from mnist_pipeline.feedback import splits
from mnist_pipeline.fileio import write_json

BATCH = 1000


def configure(parser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("exported", type=Path, help="the candidate's ONNX file")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--reviewed", type=Path, required=True)
    parser.add_argument("--champion", type=Path, required=True)
    parser.add_argument("--card", type=Path, required=True, help="the export's model card: which weights the ONNX is")
    parser.add_argument("--metrics", type=Path, required=True)


def exported_from(card: Path) -> tuple[str, str] | None:
    """(checkpoint SHA-256, ONNX SHA-256) as the export stage wrote them in the model card."""
    try:
        data = json.loads(card.read_text())
        return data["checkpoint_sha256"], data["files_sha256"]["model.onnx"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached(md5: str) -> Path | None:
    """The file DVC's cache keeps under `md5`, if this checkout's cache has it."""
    from dvc.repo import Repo

    with Repo() as repo:
        path = Path(repo.cache.local.oid_to_path(md5))
    return path if path.is_file() else None


def predictions(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    ckpt = load_checkpoint(checkpoint)
    device = select_device()
    norm = ckpt.normalisation
    return predict_logits(ckpt.build().to(device), images, norm["mean"], norm["std"], BATCH, device).argmax(1)


def main(argv: list[str] | None = None) -> int:
    args, params = stage.parse(__doc__, configure, argv)
    champion = gate.read_champion(args.champion)
    weights = args.checkpoint.read_bytes()
    candidate = gate.identity(weights, args.exported)
    alpha, margin = params.gate.alpha, params.gate.margin
    result: dict[str, Any] = {"blessed": False, "reasons": [], "champion": champion, "candidate": candidate}
    result["test"] = (
        f"McNemar's exact test, one-sided, of non-inferiority by {margin:.1%} of each group's images, per slice at "
        f"alpha {alpha} and per class at alpha {alpha} / 10"
    )
    card = exported_from(args.card)
    if card != (hashlib.sha256(weights).hexdigest(), candidate["model_sha256"]):
        result["reasons"] = [
            f"{args.exported} is not the export of {args.checkpoint} ({args.card} names another pair): "
            "run `dvc repro export`"
        ]
    elif candidate["checkpoint_md5"] == champion["checkpoint_md5"]:
        result.update(blessed=True, reasons=["the candidate is the champion"], slices={})
    elif (path := cached(champion["checkpoint_md5"])) is None:
        result["reasons"] = [
            f"the champion's checkpoint (MD5 {champion['checkpoint_md5']}) is not in this DVC cache: "
            f"`dvc pull` at the commit that promoted it ({args.champion}), then `dvc repro gate`"
        ]
    else:
        val_images, val_labels = processed.load_split(args.data_dir, "val")
        reviewed_images, reviewed_labels = (torch.from_numpy(a) for a in splits.load(args.reviewed))
        slices = {}
        for name, images, labels in (
            ("val", val_images, val_labels),
            ("reviewed", reviewed_images, reviewed_labels),
        ):
            if len(labels) == 0:
                continue
            before, after = (predictions(p, images).numpy() for p in (path, args.checkpoint))
            slices[name] = gate.judge_slice(before, after, labels.numpy(), alpha, margin)
        blessed, reasons = gate.verdict(slices)
        result.update(blessed=blessed, reasons=reasons, slices=slices)
        if "reviewed" not in slices:  # not a refusal: a project may have no reviewer yet, but say what was not seen
            result["note"] = "no reviewed digits of held-out users: judged on the validation split alone"
    write_json(args.metrics, result)
    verdict = "blessed" if result["blessed"] else "not blessed"
    print(f"gate: {verdict} against champion {champion['model_sha256'][:12]}: " + "; ".join(result["reasons"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
