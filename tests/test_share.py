"""Sharing for real: a bare git `origin`, an OpenSSH server on loopback as the DVC remote,
fresh clones as the team's other machines, the real `dvc`, `gto` and `mnist-predict`.

Machine A trains the tiny pipeline, commits dvc.lock and the metrics, pushes both; every
other machine starts from `git clone` with an empty cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import BIN, DVC, ROOT, copy_baseline, git_repo_env, run, script_module, synthetic_digits

SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
GTO = shutil.which("gto", path=str(BIN))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(DVC is None, reason="dvc is not installed"),
              pytest.mark.skipif(SSHD is None, reason="OpenSSH server not installed (apt-get install openssh-server)"),
              pytest.mark.skipif(importlib.util.find_spec("dvc_ssh") is None, reason="dvc-ssh not installed")]


class Team:
    def __init__(self, work: Path, server, env: dict[str, str]) -> None:
        self.work, self.server, self.env = work, server, env
        self.origin = work / "origin.git"
        self.remote = work / "dvc-remote"
        self.digits = []
        for i, (image, label) in enumerate(zip(*synthetic_digits(4, seed=99))):
            path = work / f"digit-{label}-{i}.png"
            Image.fromarray(image.numpy(), "L").save(path)
            self.digits.append(str(path))

    def env_for(self, repo: Path) -> dict[str, str]:
        return {**self.env, "PYTHONPATH": str(repo)}

    def dvc(self, repo: Path, *args: str, check: bool = True):
        return run([DVC, *args], repo, self.env_for(repo), check=check)

    def git(self, repo: Path, *args: str, check: bool = True):
        return run(["git", *args], repo, self.env_for(repo), check=check)

    def clone(self, name: str, branch: str = "main") -> Path:
        """A new machine: git clone, then its own credentials in .dvc/config.local."""
        repo = self.work / name
        run(["git", "clone", "-q", "-b", branch, str(self.origin), str(repo)], self.work, self.env)
        self.dvc(repo, "remote", "modify", "--local", "storage", "keyfile", str(self.server.key))
        return repo

    def predict(self, repo: Path, model: Path | None = None) -> str:
        model = model or repo / "models/export/model.onnx"
        return run([str(BIN / "mnist-predict"), "--model", str(model), *self.digits], repo, self.env_for(repo)).stdout


@pytest.fixture(scope="module")
def team(tiny_baseline, tmp_path_factory):
    """Machine A: a copy of the reproduced tiny baseline, pushed to a bare origin and to an ssh DVC remote."""
    work = tmp_path_factory.mktemp("share")
    with script_module("sshd", ROOT / "scripts" / "sshd.py").sshd(work / "sshd") as server:
        a, env = copy_baseline(tiny_baseline, work / "a")
        t = Team(work, server, env)
        run(["git", "init", "-q", "--bare", "-b", "main", str(t.origin)], work, env)
        t.git(a, "remote", "add", "origin", str(t.origin))
        t.dvc(a, "remote", "add", "-d", "storage", server.url(t.remote))
        t.dvc(a, "remote", "modify", "--local", "storage", "keyfile", str(server.key))
        assert "keyfile" not in (a / ".dvc/config").read_text()  # credentials stay out of git
        assert "Running stage" not in t.dvc(a, "repro").stdout
        t.git(a, "add", "-A")
        t.git(a, "commit", "-qm", "an ssh remote")
        t.git(a, "push", "-q", "-u", "origin", "main")
        pushed = t.dvc(a, "push")
        assert "pushed" in pushed.stdout
        t.a = a
        yield t


def test_a_fresh_machine_pulls_and_reproduces_nothing(team):
    b = team.clone("b")
    # The committed metrics are in git: a clone has machine A's numbers before any pull.
    assert (b / "metrics/eval.json").read_bytes() == (team.a / "metrics/eval.json").read_bytes()
    assert json.loads(team.dvc(b, "metrics", "show", "--json").stdout)  # readable with no cache
    team.dvc(b, "pull")
    repro = team.dvc(b, "repro")
    assert "Running stage" not in repro.stdout and "Data and pipelines are up to date" in repro.stdout
    assert "in sync" in team.dvc(b, "status", "-c").stdout
    assert team.predict(b) == team.predict(team.a)
    assert [line.split(": ")[0] for line in team.predict(b).splitlines()] == team.digits  # one answer each

    c = team.clone("c")  # `repro --pull --allow-missing`: fetch only what a stage to run would need
    repro = team.dvc(c, "repro", "--pull", "--allow-missing")
    assert "Running stage" not in repro.stdout


def test_local_folder_remote_and_run_cache(team):
    folder = team.work / "shared-folder"
    team.dvc(team.a, "remote", "add", "folder", str(folder))
    team.dvc(team.a, "push", "-r", "folder", "--run-cache")
    assert list((folder / "runs").rglob("*")), "the run-cache travelled too"
    team.dvc(team.a, "push", "--run-cache")  # and to the ssh remote
    d = team.clone("d")
    team.dvc(d, "remote", "add", "folder", str(folder), "--local")
    team.dvc(d, "pull", "-r", "folder")
    assert "up to date" in team.dvc(d, "status").stdout
    assert team.predict(d) == team.predict(team.a)


def test_experiments_travel_between_machines(team):
    """Two machines each pull the baseline, try a learning rate and push it as an experiment; a third compares them
    and applies one."""
    rates = {1: 0.05, 2: 0.1}
    answers, accuracy = {}, {}
    for i, lr in rates.items():
        machine = team.clone(f"exp-{i}")
        team.dvc(machine, "pull")  # the baseline's outputs: only train, evaluate and export rerun
        ran = team.dvc(machine, "exp", "run", "-S", f"mlp.train.lr={lr}", "-n", f"lr-{i}").stdout
        assert "Running stage 'train'" in ran and "Running stage 'preprocess'" not in ran
        accuracy[i] = json.loads((machine / "metrics/eval.json").read_text())["accuracy"]
        answers[i] = team.predict(machine)
        pushed = team.dvc(machine, "exp", "push", "origin", f"lr-{i}")
        assert "Pushed experiment" in pushed.stdout

    third = team.clone("exp-compare")
    listed = team.dvc(third, "exp", "list", "origin").stdout
    assert "lr-1" in listed and "lr-2" in listed
    for i in rates:
        team.dvc(third, "exp", "pull", "origin", f"lr-{i}")
    shown = json.loads(team.dvc(third, "exp", "show", "--json").stdout)
    found = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp.get("name")] = (data["params"]["params.yaml"]["data"]["mlp"]["train"]["lr"],
                                      data["metrics"]["metrics/eval.json"]["data"]["accuracy"])
    assert found["lr-1"] == (rates[1], accuracy[1]) and found["lr-2"] == (rates[2], accuracy[2])
    diff = json.loads(team.dvc(third, "exp", "diff", "lr-1", "lr-2", "--json").stdout)
    changed = diff["params"]["params.yaml"]["mlp.train.lr"]
    assert (changed["old"], changed["new"]) == (rates[1], rates[2])
    assert diff["metrics"]["metrics/eval.json"]["accuracy"]["old"] == accuracy[1]
    assert diff["metrics"]["metrics/eval.json"]["accuracy"]["new"] == accuracy[2]

    team.dvc(third, "exp", "apply", "lr-2")
    team.dvc(third, "pull")
    assert team.predict(third) == answers[2]
    assert yaml.safe_load((third / "params.yaml").read_text())["mlp"]["train"]["lr"] == rates[2]


@pytest.mark.skipif(GTO is None, reason="gto is not installed")
def test_registered_model_is_fetched_by_version_and_stage(team):
    a = team.a
    run([GTO, "register", "mnist-classifier", "--version", "v1.0.0", "-m", "first"], a, team.env_for(a))
    run([GTO, "assign", "mnist-classifier", "--version", "v1.0.0", "--stage", "prod"], a, team.env_for(a))
    tags = team.git(a, "tag").stdout.split()
    assert "mnist-classifier@v1.0.0" in tags and any(t.startswith("mnist-classifier#prod") for t in tags)
    team.git(a, "push", "-q", "origin", "--tags")
    shown = run([GTO, "show", "-r", str(team.origin), "mnist-classifier", "--json"], a, team.env_for(a)).stdout
    assert "v1.0.0" in shown

    empty = team.work / "fetch"
    empty.mkdir()
    for how, name in ((["--rev", "v1.0.0"], "v1"), (["--stage", "prod"], "prod")):
        run([DVC, "artifacts", "get", str(team.origin), "mnist-classifier", *how, "-o", str(empty / name / "model.onnx"),
             "--remote-config", f"keyfile={team.server.key}"], empty, team.env)
        assert team.predict(empty, empty / name / "model.onnx") == team.predict(a)


def test_push_faults_are_explained_and_recoverable(team, tmp_path):
    bare = tmp_path / "no-remote"
    env = git_repo_env(bare)
    no_remote = run([DVC, "push"], bare, env, check=False)
    assert no_remote.returncode != 0 and "dvc remote add -d" in no_remote.stderr
    no_origin = run([DVC, "exp", "push", "origin"], bare, env, check=False)
    # DVC's words; README ("Share and collaborate") says to `git remote add origin <url>`.
    assert no_origin.returncode != 0 and "No git repository was found at origin" in no_origin.stderr

    # The remote goes away in the middle of a push: the rerun completes and nothing is lost.
    g = team.clone("g")
    team.git(g, "checkout", "-q", "-b", "extra")
    blob = os.urandom(48 << 20)
    (g / "data").mkdir(exist_ok=True)
    (g / "data" / "extra.bin").write_bytes(blob)
    team.dvc(g, "add", "data/extra.bin")
    team.git(g, "add", "-A")
    team.git(g, "commit", "-qm", "an extra file")
    team.git(g, "push", "-q", "origin", "extra")
    push = subprocess.Popen([DVC, "push", "-j", "1"], cwd=g, env=team.env_for(g), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [p for p in team.remote.rglob(".*.tmp") if p.stat().st_size]:
        time.sleep(0.01)
    team.server.stop()
    try:
        _, err = push.communicate(timeout=120)
        assert push.returncode != 0, "the push finished before the server went away"
        assert "failed to upload" in err
    finally:
        team.server.start()
    assert "pushed" in team.dvc(g, "push").stdout
    h = team.clone("h", branch="extra")
    team.dvc(h, "pull", "data/extra.bin")
    assert hashlib.sha256((h / "data/extra.bin").read_bytes()).digest() == hashlib.sha256(blob).digest()

    # An object the remote lacks: the pull names it.
    md5 = hashlib.md5(blob).hexdigest()
    (team.remote / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    i = team.clone("i", branch="extra")
    missing = team.dvc(i, "pull", "data/extra.bin", check=False)
    assert missing.returncode != 0
    assert "data/extra.bin" in missing.stderr and md5 in missing.stderr, missing.stderr
