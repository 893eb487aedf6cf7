"""The real `dvc` binary on a temporary git copy of this repository and a tiny generated mirror."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import yaml

from helpers import DVC, ROOT, run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(DVC is None, reason="dvc is not installed")]

ACCURACY_FLOOR = 0.5


def test_repro_then_noop(tiny_baseline, tiny_project):
    repo, env = tiny_project
    result = tiny_baseline[2]  # the first `dvc repro`, on an empty cache
    for stage in ("download", "preprocess", "teacher", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in result
    stats = json.loads((repo / "data/processed/stats.json").read_text())
    assert stats["counts"] == {"train": 500, "val": 100, "test": 200}
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    # The tiny MLP learns the generated digits' class cues in two epochs; chance is 0.1.
    assert metrics["accuracy"] >= ACCURACY_FLOOR and metrics["samples"] == 200, metrics["accuracy"]
    assert set(metrics["per_class"]) == set("0123456789")
    confusion = json.loads((repo / "plots/confusion.json").read_text())
    assert len(confusion) == 200 and set(confusion[0]) == {"actual", "predicted"}
    export = json.loads((repo / "metrics/export.json").read_text())
    assert set(export) == {"onnx", "pt2"}
    assert all(r["top1_agreement"] == 1.0 and r["max_abs_logit_diff_bound"] <= 1e-4 for r in export.values())
    card = json.loads((repo / "models/model_card.json").read_text())
    assert set(card["files_sha256"]) == {"model.onnx", "model.pt2"}
    import hashlib

    import numpy
    import onnxruntime
    import torch
    assert card["environment"] == {  # what trained and exported it: the lock, by its hash, and the versions
        "lock": "requirements.txt", "lock_sha256": hashlib.sha256((repo / "requirements.txt").read_bytes()).hexdigest(),
        "torch": torch.__version__, "numpy": numpy.__version__, "onnx": card["environment"]["onnx"],
        "onnxruntime": onnxruntime.__version__}
    for name in ("confusion.png", "misclassified.png", "curves.png"):
        assert (repo / "plots/figures" / name).stat().st_size > 1000
    assert not list((repo / ".resume").glob("*.pt")), "finished runs leave no resume state"

    again = run([DVC, "repro"], repo, env)
    assert "Running stage" not in again.stdout
    status = run([DVC, "status"], repo, env)
    assert "up to date" in status.stdout


def test_outputs_are_tracked_by_dvc_not_git(tiny_project):
    repo, env = tiny_project
    # The baseline commit took `git add -A` after `dvc repro`: what it holds is what git tracks.
    committed = set(run(["git", "show", "--name-only", "--format=", "HEAD"], repo, env).stdout.split())
    # The small, byte-stable outputs live in git (cache: false); the large ones are ignored.
    assert {"metrics/eval.json", "metrics/train.json", "metrics/history.csv", "plots/confusion.json",
            "models/model_card.json", "dvc.lock"} <= committed, committed
    assert not [p for p in committed if p.startswith(("data/", "models/export", "models/checkpoint", "plots/figures"))
                and not p.endswith(".gitignore")], committed
    assert run(["git", "status", "--porcelain", "--untracked-files=all"], repo, env).stdout == ""
    ignored = run(["git", "check-ignore", "data/processed", "models/checkpoint.pt", "models/export",
                   "plots/figures/curves.png", "logs/train_timing.json"], repo, env).stdout.split()
    assert len(ignored) == 5, ignored


def test_experiment_metrics_and_plots(tiny_project, tmp_path):
    repo, env = tiny_project
    run([DVC, "exp", "run", "-S", "model=cnn", "-n", "cnn-exp"], repo, env)
    assert json.loads((repo / "metrics/train.json").read_text())["params"] < 2000  # the tiny CNN

    diff = run([DVC, "metrics", "diff", "--json"], repo, env)
    changes = json.loads(diff.stdout)
    assert "accuracy" in changes["metrics/eval.json"]
    assert changes["metrics/train.json"]["params"]["old"] > changes["metrics/train.json"]["params"]["new"]

    plots = json.loads(run([DVC, "plots", "diff", "HEAD", "cnn-exp", "--json"], repo, env).stdout)["data"]
    confusion = plots["Confusion matrix (test)"][0]
    assert confusion["revisions"] == ["HEAD", "cnn-exp"]
    assert len(confusion["content"]["data"]["values"]) == 2 * 200  # one row per test image and revision
    assert plots["Loss"][0]["revisions"] == ["HEAD", "cnn-exp"]
    error = plots["Error rate"][0]["content"]  # .dvc/plots/error_log.json: 1 − accuracy on a log axis
    assert error["encoding"]["y"]["scale"]["type"] == "log"
    assert error["transform"][0]["calculate"].startswith("max(1 - datum['dvc_inferred_y_value']")
    assert {row["field"] for row in error["data"]["values"]} == {"train_acc", "val_acc"}
    assert {p["revisions"][0] for p in plots["plots/figures/confusion.png"]} == {"HEAD", "cnn-exp"}
    out = tmp_path / "plots"
    run([DVC, "plots", "diff", "HEAD", "cnn-exp", "-o", str(out)], repo, env)
    assert "Confusion matrix (test)" in (out / "index.html").read_text()

    params_diff = json.loads(run([DVC, "params", "diff", "--json"], repo, env).stdout)
    assert params_diff["params.yaml"]["model"] == {"old": "mlp", "new": "cnn"}


def test_queued_sweep_shows_in_exp_show(tiny_project):
    repo, env = tiny_project
    for lr in ("0.01", "0.02"):
        run([DVC, "exp", "run", "--queue", "-S", f"mlp.train.lr={lr}", "-n", f"lr-{lr}"], repo, env)
    run([DVC, "queue", "start", "-j", "1"], repo, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run([DVC, "queue", "status"], repo, env).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(3)
    else:
        pytest.fail(f"queue still busy:\n{status}")
    assert "Failed" not in status, run([DVC, "queue", "logs", "lr-0.01"], repo, env, check=False).stdout
    shown = json.loads(run([DVC, "exp", "show", "--json"], repo, env).stdout)
    names = {exp.get("name") for rev in shown for exp in (rev.get("experiments") or [])}
    assert {"lr-0.01", "lr-0.02"} <= names
    header = run([DVC, "exp", "show", "--csv"], repo, env).stdout.splitlines()[0].split(",")
    assert {"accuracy", "macro_f1", "mlp.train.lr"} <= set(header)
    assert {"val.acc", "train.loss", "step"} <= set(header)  # DVCLive's per-epoch metrics


def test_editing_the_unused_models_section_reruns_nothing(tiny_project):
    repo, env = tiny_project
    run(["git", "checkout", "-q", "--", "."], repo, env)
    run([DVC, "checkout", "-q"], repo, env, check=False)
    assert "up to date" in run([DVC, "status"], repo, env).stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["model"] == "mlp"
    params["cnn"]["dropout"] = 0.25
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The cnn section is the teacher stage's recipe; with no teacher chosen, that stage finds nothing
    # to train, writes the same empty file, and nothing after it runs.
    assert set(json.loads(run([DVC, "status", "--json"], repo, env).stdout)) == {"teacher"}
    rerun = run([DVC, "repro"], repo, env).stdout
    assert "Running stage 'teacher'" in rerun and "Running stage 'train'" not in rerun
    params["mlp"]["dropout"] = 0.25
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run([DVC, "status", "--json"], repo, env).stdout)
    assert set(status) == {"train"}, status  # evaluate and export follow once train's outputs change
    run(["git", "checkout", "-q", "--", "params.yaml"], repo, env)



def test_the_teacher_is_trained_once_and_tuning_its_student_keeps_it(tiny_project):
    import torch

    repo, env = tiny_project
    empty = torch.load(repo / "models/teacher/logits.pt", weights_only=True)
    assert empty.shape == (0, 10)  # the baseline has no teacher
    first = run([DVC, "exp", "run", "-S", "mlp.train.distill.teacher=cnn"], repo, env).stdout
    assert "Running stage 'teacher'" in first and "Running stage 'train'" in first
    teacher = json.loads((repo / "metrics/teacher.json").read_text())
    assert teacher["teacher"] == "cnn" and teacher["params"] > 0 and 0 < teacher["val_acc"] <= 1
    logits = torch.load(repo / "models/teacher/logits.pt", weights_only=True)
    assert logits.shape == (500, 10) and logits.std() > 0
    print_line = next(line for line in first.splitlines() if line.startswith("mlp:"))
    assert "distilled from the cnn teacher" in print_line
    second = run([DVC, "exp", "run", "-S", "mlp.train.distill.teacher=cnn", "-S", "mlp.train.lr=0.05"], repo,
                 env).stdout
    assert "Running stage 'teacher'" not in second and "Running stage 'train'" in second
    assert torch.equal(torch.load(repo / "models/teacher/logits.pt", weights_only=True), logits)


def test_pull_request_report(tiny_project):
    """scripts/pr_report.py, the step the CI workflow (.github/workflows/report.yml) comments with CML."""
    repo, env = tiny_project
    run(["git", "checkout", "-q", "--", "."], repo, env)
    run([DVC, "checkout", "-q", "-f"], repo, env, check=False)
    run([DVC, "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "main before the pull request", "--allow-empty"], repo, env)
    run(["git", "checkout", "-q", "-b", "pr"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mlp"]["hidden"] = [48]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([DVC, "repro"], repo, env)
    run(["git", "commit", "-qam", "a wider MLP"], repo, env)
    run([sys.executable, str(ROOT / "scripts" / "pr_report.py"), "--base", "main", "--out", "report.md"], repo, env)
    report = (repo / "report.md").read_text()
    rows = {line.split("|")[2].strip() for line in report.splitlines() if line.startswith("| metrics/")}
    assert {"accuracy", "params"} <= rows, report
    assert "| params.yaml | mlp.hidden | [32]" in report
    images = re.findall(r"!\[[^]]*\]\(\./([^)]+)\)", report)
    assert images == ["plots/figures/confusion.png", "plots/figures/curves.png"]
    assert all((repo / image).stat().st_size > 1000 for image in images)
    (repo / "report.md").unlink()
    run(["git", "checkout", "-q", "main"], repo, env)
    run([DVC, "checkout", "-q", "-f"], repo, env)

def test_reproduction_check_passes_on_a_rerun_and_fails_on_other_bytes(tiny_project):
    """scripts/check_repro.py, CI's check that a rerun gives the committed bytes (last: it commits)."""
    repo, env = tiny_project
    run(["git", "checkout", "-q", "--", "."], repo, env)
    run([DVC, "checkout", "-q", "-f"], repo, env, check=False)
    run([DVC, "repro"], repo, env)  # nothing to do when the tests above ran
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline", "--allow-empty"], repo, env)
    check = [sys.executable, str(ROOT / "scripts" / "check_repro.py")]
    ok = run(check, repo, env)
    assert "byte-level: identical to the commit" in ok.stdout

    metrics = json.loads((repo / "metrics/eval.json").read_text())
    metrics["loss"] = metrics["loss"] + 1e-6  # a commit whose bytes the code does not give, however close
    (repo / "metrics/eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    run(["git", "commit", "-qam", "numbers that do not reproduce"], repo, env)
    moved = run(check, repo, env, check=False)
    assert moved.returncode == 1
    assert "error: the rerun differs from the commit in:\n  metrics/eval.json" in moved.stderr
    assert "metrics/eval.json" in moved.stdout  # dvc metrics diff shows what moved
