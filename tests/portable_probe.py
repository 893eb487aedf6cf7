"""Run the real stage code on a tiny dataset in one process and print the SHA-256 of every output.

    python tests/portable_probe.py WORK            # the whole chain of stages
    python tests/portable_probe.py WORK --steps    # where a CPU's kernels show, at a fraction of the cost

WORK holds `raw/` (MNIST-format files), `feedback/` (snapshotted users' corrections) and
`params.yaml`. The stages' `main`s run in this process (one `import torch`, which costs most under
`qemu-x86_64`): preprocess, curate, teacher (whatever params.yaml's MLP distils from), train the MLP
and the CNN, evaluate and export the CNN. tests/test_portable.py runs it natively and on emulated
CPUs of other vendors and instruction sets, and compares what it prints.

`--steps` is the emulated CPUs' share: under `qemu-x86_64` every Python instruction costs ~50×, and
the chain's time goes to importing DVCLive, matplotlib and the ONNX exporter, whose outputs follow from
bytes computed earlier. It runs preprocess and curate as stages, then, for each model, two optimizer
steps of the real training loop (augmentation, the weight average, the MLP distilled from the CNN),
validation with the test-time views, and the temperature fit: every kernel the chain computes with.
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def first_stages(work: Path) -> list[tuple[str, list[str]]]:
    params, data, out = work / "params.yaml", work / "data", work / "out"
    return [
        ("preprocess", [str(work / "raw"), str(data), "--params", str(params)]),
        ("curate", [str(work / "feedback"), "--params", str(params), "--admitted", str(out / "admitted"), "--users",
                    str(out / "users"), "--report", str(out / "curate.json"), "--figure", str(out / "curation.png"),
                    "--quarantine", str(out / "quarantine.json"), "--reviewed", str(out / "reviewed")]),
    ]


def run_stages(steps: list[tuple[str, list[str]]]) -> None:
    for name, argv in steps:
        if run(stage(name), argv) != 0:
            raise SystemExit(f"{name} failed")


def main(work: Path) -> dict[str, str]:
    params = work / "params.yaml"
    with_cnn = work / "params_cnn.yaml"
    with_cnn.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), "model": "cnn"}))
    data, out = work / "data", work / "out"
    common = ["--timing", str(work / "timing.json")]
    steps = [
        *first_stages(work),
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
                             "--card", str(o / "model_card.json"), "--parity", str(work / "parity.json"),
                             "--lock", str(ROOT / "requirements.txt")]))
    run_stages(steps)
    return files(work)


def files(work: Path) -> dict[str, str]:
    return {str(p.relative_to(work)): sha256(p.read_bytes())
            for folder in (work / "data", work / "out") for p in sorted(folder.rglob("*")) if p.is_file()}


def kernel_steps(work: Path) -> dict[str, str]:
    """preprocess and curate, then two steps of each model's training loop, its validation and temperature."""
    import torch

    from mnist_pipeline import processed
    from mnist_pipeline.calibration import fit_temperature
    from mnist_pipeline.engine import Distillation, Trainer, predict_logits, seed_everything
    from mnist_pipeline.models import build_model
    from mnist_pipeline.params import apply_overrides, load_params

    run_stages(first_stages(work))
    hashes = files(work)
    data, cpu = work / "data", torch.device("cpu")
    stats = processed.load_stats(data)
    train = processed.load_split(data, "train")
    val = tuple(t[:16] for t in processed.load_split(data, "val"))  # every view of every model still runs
    teacher = None
    for name in ("cnn", "mlp"):  # the CNN first: it teaches the MLP, as the teacher stage does
        # Batches of 32: every kernel of a step runs at a quarter of the emulated cost of params.yaml's 64.
        params = apply_overrides(load_params(work / "params.yaml"), [f"model={name}", f"{name}.train.batch_size=32"])
        few = tuple(t[: 2 * params.train.batch_size] for t in train)
        distill = None if teacher is None else Distillation(teacher, params.train.distill.weight,
                                                            params.train.distill.temperature)
        seed_everything(params.seed)
        trainer = Trainer(build_model(name, **params.model_kwargs()), few, val, params.train, stats.mean,
                          stats.std, params.seed, cpu, distill)
        trainer.run_epoch()
        model = trainer.eval_model
        logits = predict_logits(model, val[0], stats.mean, stats.std, 64, cpu)
        hashes[f"{name}/weights"] = sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values()))
        hashes[f"{name}/val_logits"] = sha256(logits.numpy().tobytes())
        hashes[f"{name}/temperature"] = repr(fit_temperature(logits, val[1]))
        if teacher is None:  # one view: the views' kernels ran above, and each costs a pass under emulation
            model.views = 1
            teacher = predict_logits(model, few[0], stats.mean, stats.std, 64, cpu)
    return hashes


if __name__ == "__main__":
    hashes = kernel_steps(Path(sys.argv[1])) if sys.argv[2:] == ["--steps"] else main(Path(sys.argv[1]))
    print(json.dumps({"kernels": kernels.describe(), "sha256": hashes}))
