"""Run the real stage code on a tiny dataset in one process and print the SHA-256 of every output.

    python tests/portable_probe.py WORK

WORK holds `raw/` (MNIST-format files), `feedback/` (snapshotted users' corrections) and
`params.yaml`. The stages' `main`s run in this process (one `import torch`, which costs most under
`qemu-x86_64`): preprocess, curate, teacher (whatever params.yaml's MLP distils from), train the MLP
and the CNN, evaluate and export the CNN. tests/test_portable.py runs it natively and on emulated
CPUs of other vendors and instruction sets, and compares what it prints.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all, as in every stage

# isort: split
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import yaml

from mnist_pipeline import kernels
from mnist_pipeline.stage import run

ROOT = Path(__file__).resolve().parents[1]


def stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def main(work: Path) -> dict[str, str]:
    params = work / "params.yaml"
    with_cnn = work / "params_cnn.yaml"
    with_cnn.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), "model": "cnn"}))
    data, out = work / "data", work / "out"
    common = ["--timing", str(work / "timing.json")]
    steps = [
        ("preprocess", [str(work / "raw"), str(data), "--params", str(params)]),
        ("curate", [str(work / "feedback"), "--params", str(params), "--admitted", str(out / "admitted"), "--users",
                    str(out / "users"), "--report", str(out / "curate.json"), "--figure", str(out / "curation.png"),
                    "--quarantine", str(out / "quarantine.json")]),
        ("teacher", [str(data), str(out / "teacher"), "--params", str(params), "--metrics", str(out / "teacher.json"),
                     *common]),
    ]
    for model, file in (("mlp", params), ("cnn", with_cnn)):
        o = out / model
        steps.append(("train", [str(data), "--params", str(file), "--teacher", str(out / "teacher" / "logits.pt"),
                                "--corrections", str(out / "admitted"), "--checkpoint", str(o / "checkpoint.pt"),
                                "--metrics", str(o / "train.json"), "--history", str(o / "history.csv"),
                                "--live", str(o / "live"), "--state-dir", str(work / "state"), *common]))
    o = out / "cnn"
    steps.append(("evaluate", [str(o / "checkpoint.pt"), str(data), "--params", str(with_cnn), "--users",
                               str(out / "users"), "--history", str(o / "history.csv"), "--metrics",
                               str(o / "eval.json"), "--confusion", str(o / "confusion.json"),
                               *[f"--{f}-png={o / f}.png" for f in ("confusion", "misclassified", "curves",
                                                                     "reliability")]]))
    steps.append(("export", [str(o / "checkpoint.pt"), str(data), str(o / "export"), "--params", str(with_cnn),
                             "--eval", str(o / "eval.json"), "--metrics", str(o / "export.json"),
                             "--card", str(o / "model_card.json"), "--parity", str(work / "parity.json")]))
    for name, argv in steps:
        if run(stage(name), argv) != 0:
            raise SystemExit(f"{name} failed")
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in (data, out) for p in sorted(folder.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    hashes = main(Path(sys.argv[1]))
    print(json.dumps({"kernels": kernels.describe(), "sha256": hashes}))
