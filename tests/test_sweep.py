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

from helpers import BIN, DVC, RAY_TEST_ENV, RayCluster, copy_baseline, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the sweep extra: pip install -e '.[sweep]'"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nsenter"),
                       reason="the cluster runs in a PID namespace of its own: needs root and util-linux"),
]

SWEEP = str(BIN / "mnist-sweep")
# The trials export ONNX alone: the .pt2 export is the export stage's tests' business, not the sweep's.
TRIAL_EXPORT = {"formats": ["onnx"], "parity_samples": 20}


def sweepable(tiny_baseline, repo: Path) -> tuple[Path, dict]:
    """A copy of the tiny baseline whose trials export ONNX alone, reproduced and committed."""
    repo, env = copy_baseline(tiny_baseline, repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["export"].update(TRIAL_EXPORT)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([DVC, "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny baseline for trials"], repo, env)
    return repo, env


@pytest.fixture(scope="module")
def team(tiny_baseline, tmp_path_factory):
    """The tiny baseline, committed and pushed to a bare origin, its outputs to a DVC folder remote."""
    work = tmp_path_factory.mktemp("sweep")
    repo, env = sweepable(tiny_baseline, work / "repo")
    run([DVC, "remote", "add", "-d", "storage", str(work / "dvc-remote")], repo, env)
    run(["git", "commit", "-qam", "a DVC remote"], repo, env)
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
    """The one Ray cluster of the module: a head and two one-CPU workers. A test that kills a worker
    adds a new one before it returns."""
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
    result = sweep(cluster, repo, env, "-S", "mlp.train.lr=0.02,0.1", "-S", "mlp.train.momentum=0.8",
                   "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    trials = summary["trials"]
    assert summary["ran"] == 2 and summary["failed"] == 0 and len(trials) == 2
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
    assert [f"mlp.train.lr={params['mlp']['train']['lr']}", f"mlp.train.momentum={params['mlp']['train']['momentum']}"] \
        == sorted(best["overrides"])
    assert (fresh / "models" / "checkpoint.pt").stat().st_size > 1000

    again = sweep(cluster, repo, env, "-S", "mlp.train.lr=0.02,0.1", "-S", "mlp.train.momentum=0.8",
                   "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert (summary["ran"], summary["on_origin"]) == (0, 2), summary
    assert "2 trials: 0 ran, 2 already on the origin" in again.stdout


def test_optuna_search_records_its_objective_per_trial(team, cluster, tmp_path):
    _, repo, env = team
    result = sweep(cluster, repo, env, "-S", "mlp.train.lr=tag(log,interval(0.001,0.3))", "-S", "mlp.train.momentum=0.7",
                   "--search", "optuna", "--trials", "2", "--concurrent", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = json.loads((tmp_path / "summary.json").read_text())["trials"]
    assert len(trials) == 2 and all(t["status"] == "ran" for t in trials)
    rates = [t["config"]["mlp.train.lr"] for t in trials]
    assert len(set(rates)) == 2 and all(0.001 <= r <= 0.3 for r in rates)
    assert all(isinstance(t["metrics/train.json:val_acc"], float) for t in trials)


def test_a_failing_trial_is_its_one_line_and_the_others_go_on(team, cluster, tmp_path):
    work, repo, env = team
    result = sweep(cluster, repo, env, "-S", "mlp.train.lr=0.05,1e30", "-S", "mlp.train.momentum=0.75", "--max-failures", "0",
                   "--out", str(tmp_path))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    failed = [t for t in summary["trials"] if t["status"] == "failed"]
    assert summary["ran"] == 1 and len(failed) == 1 and failed[0]["config"] == {"mlp.train.lr": 1e30}
    assert "training diverged" in failed[0]["error"] and "\n" not in failed[0]["error"], failed[0]["error"]
    assert "1 trials: " not in result.stdout and "2 trials: 1 ran, 0 already on the origin, 1 failed" in result.stdout
    assert "Traceback" not in result.stdout


def trials_running(cluster: RayCluster) -> int:
    """The `dvc exp run` processes of trials in the cluster's PID namespace: one per busy one-CPU worker."""
    found = subprocess.run(cluster.inside("pgrep", "-c", "-f", "dvc exp run"), capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


def test_a_node_killed_mid_sweep_still_leaves_every_trial_pushed(team, cluster, tmp_path):
    work, repo, env = team
    victim = len(cluster.nodes) - 1  # the newest worker
    proc = subprocess.Popen(cluster.inside(SWEEP, "--address", cluster.address, "-S", "mlp.train.momentum=0.81,0.82",
                                           "--out", str(tmp_path / "out"), cwd=repo),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
        reader.start()
        deadline = time.monotonic() + 300
        while trials_running(cluster) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # until both workers are inside a trial, however fast this machine trains
        assert trials_running(cluster) == 2, "".join(lines)[-3000:]
        cluster.kill_node(victim)
        _, err = proc.communicate(timeout=900)
        reader.join()
    finally:
        if proc.poll() is None:  # the test failed before the sweep ended
            proc.kill()
            proc.wait()
        cluster.add_worker()  # the module's cluster has two workers again for the tests after this one
        cluster.wait_for(3)
    assert proc.returncode == 0, "".join(lines)[-3000:] + err[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == 0 and len(summary["trials"]) == 2
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


def test_the_local_default_needs_no_cluster_origin_or_remote(tiny_baseline, tmp_path):
    """No --address, no origin, no DVC remote: Ray on this machine, trials pushed back into the repository."""
    repo, env = sweepable(tiny_baseline, tmp_path / "repo")
    # Its own PID namespace: the local Ray instance ends with the command, whatever happens.
    result = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "--kill-child=KILL", "--", SWEEP,
                             "-S", "mlp.train.momentum=0.83", "--out", str(tmp_path / "out")], cwd=repo,
                            env={**env, **RAY_TEST_ENV}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = {t["experiment"] for t in json.loads((tmp_path / "out" / "summary.json").read_text())["trials"]}
    assert len(names) == 1 and names <= set(run([DVC, "exp", "list", "--name-only"], repo, env).stdout.split())
    best = sorted(names)[0]
    run([DVC, "exp", "apply", best], repo, env)
    assert "up to date" in run([DVC, "status"], repo, env).stdout  # its outputs are in this repository's cache
