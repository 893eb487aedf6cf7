"""The committed dvc.lock is the team's baseline: it must match the code, params and commands."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import DVC, ROOT, git_repo_env, run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(DVC is None, reason="dvc is not installed")]
CHECK = [sys.executable, str(ROOT / "scripts" / "check_lock.py")]


def test_committed_dvc_lock_is_current():
    result = subprocess.run(CHECK + [str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_guard_names_each_change_that_needs_a_repro(tmp_path):
    repo = tmp_path / "repo"
    env = git_repo_env(repo)
    assert run(CHECK, repo, env).returncode == 0  # a fresh copy: data absent, nothing stale

    with open(repo / "mnist_pipeline" / "engine.py", "a") as f:
        f.write("\n# an edit\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = 500
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "metrics" / "eval.json").write_text('{"accuracy": 0.5}\n')  # a committed metric edited by hand
    dvc_yaml = (repo / "dvc.yaml").read_text().replace("--card models/model_card.json", "--card models/card.json")
    (repo / "dvc.yaml").write_text(dvc_yaml)

    result = run(CHECK, repo, env, check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("dvc.lock is stale")
    assert "train: changed dep mnist_pipeline/engine.py modified" in result.stderr
    assert "evaluate: changed dep params.yaml evaluate modified" in result.stderr  # DVC names the section
    assert "evaluate: changed out metrics/eval.json modified" in result.stderr
    assert "export: changed command" in result.stderr
    assert lines[-1].startswith("Run `dvc repro`")
