"""mnist-sweep on a real Ray cluster on this machine: a head and two worker nodes started with
`ray start` (one CPU each; the head none), a bare git origin and a local-folder DVC remote, tiny
generated data. Every trial is a real `dvc exp run` in a clone, pushed with `dvc exp push`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import BIN, DVC, RAY_TEST_ENV, RayCluster, run, tiny_repo

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the sweep extra: pip install -e '.[sweep]'"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nsenter"),
                       reason="the cluster runs in a PID namespace of its own: needs root and util-linux"),
]

SWEEP = str(BIN / "mnist-sweep")
TINY = {"data": {"val_size": 100},
        "mlp": {"hidden": [32], "dropout": 0.0, "train": {"epochs": 2, "batch_size": 64, "ema": 0.0}},
        "evaluate": {"batch_size": 100}, "export": {"formats": ["onnx"], "parity_samples": 20}}


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A reproduced tiny pipeline, committed and pushed to a bare origin, its outputs to a DVC folder remote."""
    work = tmp_path_factory.mktemp("sweep")
    repo, env = tiny_repo(work, TINY)
    run([DVC, "repro"], repo, env)
    run([DVC, "remote", "add", "-d", "storage", str(work / "dvc-remote")], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny baseline"], repo, env)
    run(["git", "init", "-q", "--bare", "--initial-branch=main", str(work / "origin.git")], repo, env)
    run(["git", "remote", "add", "origin", str(work / "origin.git")], repo, env)
    run(["git", "push", "-q", "origin", "main"], repo, env)
    run([DVC, "push", "-q"], repo, env)
    return work, repo, env


def start_cluster(env: dict, log_dir: Path, workers: int = 2) -> RayCluster:
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = RayCluster(env, log_dir)
    try:
        cluster.wait_for(1)
        for i in range(workers):  # one at a time: two raylets starting at once can time out on 2 cores
            cluster.add_worker()
            cluster.wait_for(2 + i)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster(team):
    work, _, env = team
    cluster = start_cluster(env, work / "ray-logs")
    yield cluster
    cluster.stop()


def sweep(cluster: RayCluster, repo: Path, env: dict, *args: str, timeout: float = 900):
    return subprocess.run(cluster.inside(SWEEP, "--address", cluster.address, *args, cwd=repo), env=env,
                          capture_output=True, text=True, timeout=timeout)


def exps_on(origin: Path) -> set[str]:
    refs = subprocess.run(["git", "ls-remote", str(origin), "refs/exps/*"], capture_output=True, text=True,
                          check=True).stdout.split()
    return {ref.rsplit("/", 1)[1] for ref in refs if ref.startswith("refs/exps/")}


def clone(team, name: str) -> Path:
    work, _, env = team
    dest = work / name
    run(["git", "clone", "-q", str(work / "origin.git"), str(dest)], work, env)
    return dest


def test_grid_on_two_workers_every_trial_an_experiment_and_a_rerun_runs_none(team, cluster, tmp_path):
    work, repo, env = team
    before = exps_on(work / "origin.git")
    result = sweep(cluster, repo, env, "-S", "mlp.train.lr=0.02,0.1", "-S", "seed=1,2", "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    trials = summary["trials"]
    assert summary["ran"] == 4 and summary["failed"] == 0 and len(trials) == 4
    assert len({t["node"] for t in trials}) == 2, "both worker nodes ran trials"
    objective = "metrics/train.json:val_acc"
    assert all(0 <= t[objective] <= 1 and t["seconds"] > 0 for t in trials)
    assert [t[objective] for t in trials] == sorted((t[objective] for t in trials), reverse=True)
    names = {t["experiment"] for t in trials}
    assert exps_on(work / "origin.git") - before == names
    assert f"best: {trials[0]['experiment']}" in result.stdout and "dvc exp apply" in result.stdout
    assert (tmp_path / "a" / "objective.png").stat().st_size > 1000

    # A fresh clone sees them as DVC experiments, with metrics, and gets a trial's model.
    fresh = clone(team, "fresh")
    listed = run([DVC, "exp", "list", "origin", "--name-only"], fresh, env).stdout.split()
    assert names <= set(listed)
    run([DVC, "exp", "pull", "origin", *names], fresh, env)
    shown = json.loads(run([DVC, "exp", "show", "--json"], fresh, env).stdout)
    found = {exp["name"]: exp["revs"][0]["data"]["metrics"]["metrics/train.json"]["data"]["val_acc"]
             for rev in shown for exp in (rev.get("experiments") or []) if exp.get("name") in names}
    assert found == {t["experiment"]: t[objective] for t in trials}
    best = trials[0]
    run([DVC, "exp", "apply", best["experiment"]], fresh, env)
    run([DVC, "pull"], fresh, env)
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    assert [f"mlp.train.lr={params['mlp']['train']['lr']}", f"seed={params['seed']}"] == sorted(best["overrides"])
    assert (fresh / "models" / "checkpoint.pt").stat().st_size > 1000

    again = sweep(cluster, repo, env, "-S", "mlp.train.lr=0.02,0.1", "-S", "seed=1,2", "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert (summary["ran"], summary["on_origin"]) == (0, 4), summary
    assert "4 trials: 0 ran, 4 already on the origin" in again.stdout


def test_optuna_search_records_its_objective_per_trial(team, cluster, tmp_path):
    _, repo, env = team
    result = sweep(cluster, repo, env, "-S", "mlp.train.lr=tag(log,interval(0.001,0.3))", "-S", "seed=7",
                   "--search", "optuna", "--trials", "6", "--concurrent", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = json.loads((tmp_path / "summary.json").read_text())["trials"]
    assert len(trials) == 6 and all(t["status"] == "ran" for t in trials)
    rates = [t["config"]["mlp.train.lr"] for t in trials]
    assert len(set(rates)) == 6 and all(0.001 <= r <= 0.3 for r in rates)
    assert all(isinstance(t["metrics/train.json:val_acc"], float) for t in trials)


def test_a_failing_trial_is_its_one_line_and_the_others_go_on(team, cluster, tmp_path):
    work, repo, env = team
    result = sweep(cluster, repo, env, "-S", "mlp.train.lr=0.05,1e30", "-S", "seed=21", "--max-failures", "0",
                   "--out", str(tmp_path))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    failed = [t for t in summary["trials"] if t["status"] == "failed"]
    assert summary["ran"] == 1 and len(failed) == 1 and failed[0]["config"] == {"mlp.train.lr": 1e30}
    assert "training diverged" in failed[0]["error"] and "\n" not in failed[0]["error"], failed[0]["error"]
    assert "1 trials: " not in result.stdout and "2 trials: 1 ran, 0 already on the origin, 1 failed" in result.stdout
    assert "Traceback" not in result.stdout


def test_a_node_killed_mid_sweep_still_leaves_every_trial_pushed(team, tmp_path):
    work, repo, env = team
    cluster = start_cluster(env, tmp_path / "ray-logs")
    try:
        proc = subprocess.Popen(cluster.inside(SWEEP, "--address", cluster.address, "-S", "seed=11,12,13,14",
                                               "--out", str(tmp_path / "out"), cwd=repo),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
        reader.start()
        deadline = time.monotonic() + 120
        while not any(line.startswith("sweeping ") for line in lines) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(10)  # both workers are inside their first trial (a trial takes ~25 s here)
        cluster.kill_node(2)
        _, err = proc.communicate(timeout=900)
        reader.join()
    finally:
        cluster.stop()
    assert proc.returncode == 0, "".join(lines)[-3000:] + err[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == 0 and len(summary["trials"]) == 4
    assert {t["experiment"] for t in summary["trials"]} <= exps_on(work / "origin.git")


@pytest.mark.parametrize("case, message", [
    ("unknown key", "params.yaml: mlp.train.lrr is not a key"),
    ("bad value", "params.yaml: mlp.train.lr = -1 is invalid"),
    ("interval in a grid", "an interval needs --search optuna or random"),
    ("test-set objective", "that is the test set's"),
    ("no DVC remote", "no default DVC remote"),
    ("no origin", "no git remote 'origin'"),
    ("unpushed revision", "is not on origin"),
])
def test_bad_input_is_one_line_exit_2_and_no_trial_starts(team, cluster, case, message):
    work, _, env = team
    repo = clone(team, f"bad-{case.replace(' ', '-')}")
    args = ["-S", "seed=1,2"]
    if case == "unknown key":
        args = ["-S", "mlp.train.lrr=0.1,0.2"]
    elif case == "bad value":
        args = ["-S", "mlp.train.lr=-1,0.1"]
    elif case == "interval in a grid":
        args = ["-S", "mlp.train.lr=interval(0.01,0.1)"]
    elif case == "test-set objective":
        args += ["--objective", "metrics/eval.json:accuracy"]
    elif case == "no DVC remote":
        run([DVC, "remote", "default", "--unset"], repo, env)
    elif case == "no origin":
        run(["git", "remote", "remove", "origin"], repo, env)
    elif case == "unpushed revision":
        (repo / "NOTES").write_text("not pushed")
        run(["git", "add", "NOTES"], repo, env)
        run(["git", "commit", "-qm", "local only"], repo, env)
    before = exps_on(work / "origin.git")
    result = sweep(cluster, repo, env, *args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr and exps_on(work / "origin.git") == before


def test_the_local_default_needs_no_cluster_origin_or_remote(tmp_path):
    """No --address, no origin, no DVC remote: Ray on this machine, trials pushed back into the repository."""
    repo, env = tiny_repo(tmp_path, TINY)
    run([DVC, "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    # Its own PID namespace: the local Ray instance ends with the command, whatever happens.
    result = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "--kill-child=KILL", "--", SWEEP,
                             "-S", "seed=3,4", "--out", str(tmp_path / "out")], cwd=repo,
                            env={**env, **RAY_TEST_ENV}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = {t["experiment"] for t in json.loads((tmp_path / "out" / "summary.json").read_text())["trials"]}
    assert len(names) == 2 and names <= set(run([DVC, "exp", "list", "--name-only"], repo, env).stdout.split())
    best = sorted(names)[0]
    run([DVC, "exp", "apply", best], repo, env)
    assert "up to date" in run([DVC, "status"], repo, env).stdout  # its outputs are in this repository's cache
