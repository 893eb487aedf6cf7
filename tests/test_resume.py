"""Crash and resume the real train stage: the result must be byte-identical to an uninterrupted run."""

from __future__ import annotations

import importlib.util
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import load_stage, write_mirror
from mnist_pipeline.stage import run

pytestmark = pytest.mark.slow  # real processes

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("checkpoint", "metrics", "history")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    write_mirror(work / "raw", n_train=1200, n_test=50, compressed=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["val_size"] = 100
    params["mlp"].update(hidden=[256], dropout=0.1)
    params["mlp"]["train"].update(epochs=6, batch_size=32, ema=0.99)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    assert run(load_stage("preprocess").main, [str(work / "raw"), str(work / "data"),
                                                "--params", str(work / "params.yaml")]) == 0
    assert run(load_stage("teacher").main, [str(work / "data"), str(work / "teacher"), "--params",
                                             str(work / "params.yaml"), "--metrics", str(work / "teacher.json"),
                                             "--timing", str(work / "teacher_timing.json")]) == 0
    return work


def train_command(work: Path, out: str, params: str = "params.yaml") -> list[str]:
    o = work / out
    return [sys.executable, str(ROOT / "stages/train.py"), str(work / "data"), "--params", str(work / params),
            "--teacher", str(work / "teacher" / "logits.pt"), "--checkpoint", str(o / "model.pt"), "--metrics", str(o / "train.json"),
            "--history", str(o / "history.csv"), "--timing", str(o / "timing.json"),
            "--live", str(o / "live"), "--state-dir", str(work / "state")]


def outputs(work: Path, out: str) -> dict[str, bytes]:
    return {name: (work / out / name).read_bytes() for name in ("model.pt", "train.json", "history.csv")}


def start_and_stop_after(work: Path, out: str, epochs: int, sig: int) -> subprocess.Popen:
    """Start training; as soon as it reports epoch `epochs` (printed after that epoch's state is
    saved), send `sig`: the rest of the run is the window for the signal."""
    # SIGINT back to its default in the child, as in a terminal: a job started in the background
    # (`cmd &`, as CI scripts may run) inherits an ignored SIGINT, and Python then never raises
    # KeyboardInterrupt (that, not timing, made this test fail in a backgrounded CI run).
    proc = subprocess.Popen(train_command(work, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 120
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        if line.startswith(f"epoch {epochs:3d}/"):
            proc.send_signal(sig)
            proc.wait(60)
            return proc
    proc.kill()
    pytest.fail("training finished or hung before it could be interrupted")


@pytest.fixture(scope="module")
def clean(setup):
    """An uninterrupted run: the reference every resumed run must match byte for byte."""
    result = subprocess.run(train_command(setup, "clean"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming" not in result.stdout
    assert not list((setup / "state").glob("*.pt")), "a finished run removes its state"
    return outputs(setup, "clean")


def test_sigkill_then_resume_is_byte_identical(setup, clean):
    work = setup

    killed = start_and_stop_after(work, "crashed", epochs=2, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (work / "crashed" / "model.pt").exists()

    # State saved for other params is never picked up ...
    other = yaml.safe_load((work / "params.yaml").read_text())
    other["mlp"]["train"]["lr"] = 0.05
    (work / "other.yaml").write_text(yaml.safe_dump(other))
    different = subprocess.run(train_command(work, "other", "other.yaml"), capture_output=True, text=True)
    assert different.returncode == 0 and "resuming" not in different.stdout

    # ... while the same params continue where the crash left off.
    resumed = subprocess.run(train_command(work, "crashed"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    done = int(resumed.stdout.split("resuming after epoch ")[1].split()[0])
    assert 2 <= done < 6
    assert f"epoch   {done + 1}/6" in resumed.stdout and f"epoch   {done}/6" not in resumed.stdout
    assert outputs(work, "crashed") == clean
    assert outputs(work, "other")["model.pt"] != clean["model.pt"]


def test_ctrl_c_exits_cleanly_and_keeps_state(setup, clean):
    work = setup
    stopped = start_and_stop_after(work, "interrupted", epochs=1, sig=signal.SIGINT)
    assert stopped.returncode == 130
    err = stopped.stderr.read()
    assert "interrupted: the state after epoch" in err and "Traceback" not in err
    assert list((work / "state").glob("*.pt"))
    resumed = subprocess.run(train_command(work, "interrupted"), capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming after epoch" in resumed.stdout
    assert outputs(work, "interrupted") == clean


def test_ctrl_c_in_the_middle_of_the_first_save_claims_no_saved_state(setup, monkeypatch, capsys):
    """A Ctrl-C that lands while the first epoch's state is being written leaves no state (the
    write is atomic): the message must not promise a resume."""
    spec = importlib.util.spec_from_file_location("train_stage", ROOT / "stages" / "train.py")
    train_stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_stage)

    def interrupted_save(self, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_stage.ResumeStore, "save", interrupted_save)
    assert train_stage.main(train_command(setup, "first-save")[2:]) == 130
    err = capsys.readouterr().err
    assert "interrupted: no epoch's state was saved yet; `dvc repro` starts over" in err
    assert "is kept in" not in err
    assert not list((setup / "state").glob("*.pt"))
