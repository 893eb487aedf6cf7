"""Every stage, walked through its bad inputs: one line naming the file or key, a non-zero exit, no traceback.

The cases run each stage's `main` in this process through `stage.run`, exactly what its `__main__` runs;
a few run the script as a real process too, for the exit status and stderr a shell sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load_stage, write_mirror
from mnist_pipeline import processed, stage as stage_runner
from mnist_pipeline.checkpoint import Checkpoint, save_checkpoint
from mnist_pipeline.models import MLP

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny raw mirror, its processed folder, a valid checkpoint, history and eval.json."""
    work = tmp_path_factory.mktemp("stage-errors")
    pins = write_mirror(work / "raw", n_train=300, n_test=50, compressed=False)
    params = {**PARAMS, "data": {"val_size": 50}}
    # The MLP distils from the CNN here, as the record recipe does: the teacher stage then reads the
    # splits, and the train stage the teacher's logits, so their bad inputs are reached.
    mlp_train = params["mlp"]["train"]
    params["mlp"] = {**params["mlp"], "train": {**mlp_train, "distill": {**mlp_train["distill"], "teacher": "cnn"}}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    assert stage_runner.run(load_stage("preprocess").main, [str(work / "raw"), str(work / "data"),
                                                          "--params", str(work / "params.yaml")]) == 0
    torch.manual_seed(0)
    model = MLP([8], 0.0)
    save_checkpoint(work / "model.pt", Checkpoint(
        model="mlp", model_kwargs={"hidden": [8], "dropout": 0.0}, state_dict=model.state_dict(),
        normalisation={"mean": 0.1, "std": 0.3}, classes=list("0123456789"), params={}, data={}, best={"epoch": 1}))
    (work / "history.csv").write_text("epoch,train_loss,val_loss,train_acc,val_acc,lr\n1,1.0,1.0,0.5,0.5,0.1\n")
    (work / "eval.json").write_text(json.dumps({"accuracy": 0.5, "calibration": {"temperature": 1.5}}))
    return work, pins


def copy_data(work: Path, name: str) -> Path:
    folder = work / name
    folder.mkdir()
    for file in ("train.pt", "val.pt", "test.pt", processed.STATS):
        (folder / file).write_bytes((work / "data" / file).read_bytes())
    return folder


def stage(name: str, *args: str, params: Path, env: dict[str, str] | None = None):
    """The stage script as a real process: (its CompletedProcess)."""
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args, "--params", str(params)],
                          capture_output=True, text=True, env=env)


def in_process(name: str, *args: str, params: Path, capsys, monkeypatch, env: dict[str, str]) -> tuple[int, str]:
    """The stage's `main` run here as its `__main__` runs it: (exit code, stderr)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = stage_runner.run(load_stage(name).main, [*args, "--params", str(params)])
    return code, capsys.readouterr().err


def train_args(work: Path, data: Path, teacher: Path | None = None) -> list[str]:
    return [str(data), f"--teacher={teacher or work / 'teacher.pt'}",
            *[f"--{o}={work / 'out' / o}" for o in ("checkpoint", "metrics", "history", "timing", "live", "state-dir")]]


def tensor_file(work: Path, name: str, tensor: torch.Tensor) -> Path:
    path = work / "bad" / name
    path.parent.mkdir(exist_ok=True)
    torch.save(tensor, path)
    return path


def evaluate_args(work: Path, ckpt: Path, data: Path, history: Path) -> list[str]:
    return [str(ckpt), str(data), f"--history={history}", *[f"--{o}={work / 'out' / o}"
                                                            for o in ("metrics", "confusion", "confusion-png",
                                                                      "misclassified-png", "curves-png", "reliability-png")]]


def export_args(work: Path, ckpt: Path, data: Path, evaluation: Path) -> list[str]:
    return [str(ckpt), str(data), str(work / "out" / "export"), f"--eval={evaluation}",
            f"--metrics={work / 'out' / 'export.json'}", f"--card={work / 'out' / 'card.json'}",
            f"--parity={work / 'out' / 'parity.json'}", f"--lock={ROOT / 'requirements.txt'}"]


def bad(work: Path, name: str, content: bytes) -> Path:
    path = work / "bad" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


CASES = {
    "download: mirror is not a folder": lambda w: (
        "download", [str(w / "dl")], {"MNIST_MIRROR": str(w / "nowhere")}, "MNIST_MIRROR="),
    "preprocess: raw files missing": lambda w: ("preprocess", [str(w / "empty-raw"), str(w / "p")], {},
                                                "train-images-idx3-ubyte: not found"),
    "preprocess: raw file corrupt": lambda w: (
        "preprocess", [str(bad(w, "train-images-idx3-ubyte", b"\x1f\x8b junk").parent), str(w / "p")], {},
        "train-images-idx3-ubyte: bad magic number 0x1f8b206a"),
    "train: stats.json not JSON": lambda w: (
        "train", train_args(w, (lambda d: ((d / processed.STATS).write_text("{oops"), d)[1])(copy_data(w, "d1"))),
        {}, "stats.json: not readable JSON"),
    "train: split file truncated": lambda w: (
        "train", train_args(w, (lambda d: ((d / "val.pt").write_bytes(b"PK\x03\x04"), d)[1])(copy_data(w, "d2"))),
        {}, "val.pt: not a readable tensor file"),
    # The MLP distils (see `work`): its teacher's logits must cover the training images.
    "train: teacher logits missing": lambda w: ("train", train_args(w, copy_data(w, "d3"), w / "no-teacher.pt"), {},
                                                "no-teacher.pt: teacher logits file not found"),
    "train: teacher logits for other data": lambda w: (
        "train", train_args(w, copy_data(w, "d4"), tensor_file(w, "logits.pt", torch.zeros(3, 10))), {},
        "expected the teacher's logits for the 250 training images (250×10 floats), found (3, 10)"),
    "teacher: split file truncated": lambda w: (
        "teacher", [str((lambda d: ((d / "train.pt").write_bytes(b"PK\x03\x04"), d)[1])(copy_data(w, "d5"))),
                    str(w / "out" / "teacher"), f"--metrics={w / 'out' / 'teacher.json'}",
                    f"--timing={w / 'out' / 'teacher_timing.json'}"], {}, "train.pt: not a readable tensor file"),
    "evaluate: checkpoint truncated": lambda w: (
        "evaluate", evaluate_args(w, bad(w, "c1.pt", (w / "model.pt").read_bytes()[:300]), w / "data",
                                  w / "history.csv"), {}, "c1.pt: not a valid checkpoint"),
    "evaluate: checkpoint for another model": lambda w: (
        "evaluate", evaluate_args(w, (lambda p: (save_checkpoint(p, Checkpoint(
            model="mlp", model_kwargs={"hidden": [16], "dropout": 0.0}, state_dict=MLP([8], 0.0).state_dict(),
            normalisation={"mean": 0.1, "std": 0.3}, classes=list("0123456789"), params={}, data={}, best={})), p)[1])(
            w / "bad" / "c2.pt"), w / "data", w / "history.csv"), {}, "does not rebuild its 'mlp' model"),
    "evaluate: history without columns": lambda w: (
        "evaluate", evaluate_args(w, w / "model.pt", w / "data", bad(w, "h.csv", b"a,b\n1,2\n")),
        {}, "h.csv: expected the columns"),
    "export: checkpoint is not ours": lambda w: (
        "export", export_args(w, (lambda p: (torch.save({"weights": torch.zeros(2)}, p), p)[1])(w / "bad" / "c3.pt"),
                              w / "data", w / "eval.json"), {}, "c3.pt: not a mnist-pipeline-checkpoint"),
    "export: eval.json not JSON": lambda w: (
        "export", export_args(w, w / "model.pt", w / "data", bad(w, "e1.json", b"{")), {}, "e1.json: no test accuracy"),
    "export: eval.json with a bad temperature": lambda w: (
        "export", export_args(w, w / "model.pt", w / "data", bad(w, "e3.json", json.dumps(
            {"accuracy": 0.5, "calibration": {"temperature": -1}}).encode())), {}, "temperature -1 is not a positive"),
    "export: eval.json without accuracy": lambda w: (
        "export", export_args(w, w / "model.pt", w / "data", bad(w, "e2.json", b'{"loss": 1}')), {},
        "e2.json: no test accuracy"),
}


def one_line(code: int, err: str, fragment: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def prepared(folder: Path, case: str):
    (folder / "bad").mkdir(exist_ok=True)
    (folder / "empty-raw").mkdir(exist_ok=True)
    return CASES[case](folder)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_a_non_zero_exit(work, case, capsys, monkeypatch):
    folder, pins = work
    name, args, extra_env, fragment = prepared(folder, case)
    code, err = in_process(name, *args, params=folder / "params.yaml", capsys=capsys, monkeypatch=monkeypatch,
                           env={"MNIST_CHECKSUMS": str(pins), **extra_env})
    one_line(code, err, fragment)


@pytest.mark.parametrize("case", ["preprocess: raw file corrupt", "evaluate: checkpoint truncated"])
@pytest.mark.slow
def test_a_real_process_prints_the_one_line_and_exits_non_zero(work, case):
    folder, pins = work
    name, args, extra_env, fragment = prepared(folder, case)
    result = stage(name, *args, params=folder / "params.yaml",
                   env={**__import__("os").environ, "MNIST_CHECKSUMS": str(pins), **extra_env})
    assert result.returncode == 1
    one_line(result.returncode, result.stderr, fragment)


ARGS = {"download": 1, "preprocess": 2, "curate": 1, "teacher": 2, "train": 1, "evaluate": 2, "export": 3, "gate": 3}
OPTIONS = {"teacher": ["--metrics=x", "--timing=x"],
           "curate": [f"--{o}=x" for o in ("admitted", "users", "reviewed", "report", "figure", "quarantine")],
           "gate": ["--reviewed=x", "--champion=x", "--card=x", "--metrics=x"],
           "train": [f"--{o}=x" for o in ("teacher", "checkpoint", "metrics", "history", "timing", "live", "state-dir")],
           "evaluate": [f"--{o}=x" for o in ("history", "metrics", "confusion", "confusion-png", "misclassified-png",
                                             "curves-png", "reliability-png")],
           "export": ["--eval=x", "--metrics=x", "--card=x", "--parity=x", "--lock=x"]}
TYPO = "error: params.yaml: mlp.train.lr = 'fast' is invalid: expected a finite number"


@pytest.fixture
def typo(tmp_path) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**PARAMS, "mlp": {**PARAMS["mlp"], "train": {**PARAMS["mlp"]["train"], "lr": "fast"}}}))
    return params


@pytest.mark.parametrize("name", ["download", "preprocess", "curate", "teacher", "train", "evaluate", "export", "gate"])
def test_params_typo_is_exit_2_in_every_stage(typo, name, capsys, monkeypatch):
    code, err = in_process(name, *["x"] * ARGS[name], *OPTIONS.get(name, []), params=typo, capsys=capsys,
                           monkeypatch=monkeypatch, env={})
    assert code == 2 and err.strip() == TYPO


@pytest.mark.slow
def test_a_params_typo_exits_2_from_a_real_process(typo):
    result = stage("train", "x", *OPTIONS["train"], params=typo)
    assert result.returncode == 2 and result.stderr.strip() == TYPO
