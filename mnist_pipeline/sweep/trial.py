"""One trial, on whichever Ray worker runs it: a fresh clone, `dvc exp run`, `dvc push`, `dvc exp push`.

A plain function (`run_trial`) that Ray Tune calls with the trial's config; it reports one
result and raises on failure, and Ray's retries (`--max-failures`) do the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mnist_pipeline.sweep.space import as_override, experiment_name

BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        # A stage's own one-line "error: …" says why; DVC's "ERROR: failed to reproduce" only where.
        error = next((line for line in reversed(lines) if line.startswith("error:")), None) or next(
            (line for line in reversed(lines) if line.startswith("ERROR:")), None
        )
        raise RuntimeError(f"{' '.join(args[:3])} failed: {error or (lines[-1] if lines else result.returncode)}")
    return result.stdout


def tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


def exp_ref(origin: str, rev: str, name: str, cwd: Path) -> str | None:
    """The ref of experiment `name` on baseline `rev` if the origin has it (DVC's layout:
    refs/exps/<rev[:2]>/<rev[2:]>/<name>)."""
    ref = f"refs/exps/{rev[:2]}/{rev[2:]}/{name}"
    return ref if run(["git", "ls-remote", origin, ref], cwd).strip() else None


def metric(text: str, key: str) -> float:
    value: Any = json.loads(text)
    for part in key.split("."):
        value = value[part]
    return float(value)


def run_trial(
    config: dict[str, Any],
    *,
    origin: str,
    rev: str,
    fixed: list[str],
    objective: str,
    cpus: int,
    cache_remote: str | None,
) -> None:
    """Ray Tune's trainable: one DVC experiment, reported back as {objective, node, seconds, …}."""
    import ray
    from ray import tune

    start = time.perf_counter()
    overrides = fixed + [as_override(k, v) for k, v in sorted(config.items())]
    name = experiment_name(overrides)
    node = ray.get_runtime_context().get_node_id()
    # The clone's own code, not an installed copy, runs its stages; torch uses the CPUs the trial holds.
    with tempfile.TemporaryDirectory(prefix=f"mnist-sweep-{name}-") as tmp:
        repo = Path(tmp) / "repo"
        env = {
            **os.environ,
            "PYTHONPATH": str(repo),
            "OMP_NUM_THREADS": str(cpus),
            "MKL_NUM_THREADS": str(cpus),
            "DVC_NO_ANALYTICS": "1",
            "GIT_TERMINAL_PROMPT": "0",
        }
        run(["git", "clone", "-q", "--no-checkout", origin, str(repo)], Path(tmp), env)
        run(["git", "checkout", "-q", "--detach", rev], repo, env)
        value, status = experiment(repo, origin, rev, name, overrides, objective, cache_remote, env)
    tune.report(
        {
            objective: value,
            "experiment": name,
            "overrides": overrides,
            "node": node,
            "status": status,
            "seconds": round(time.perf_counter() - start, 2),
        }
    )


def experiment(
    repo: Path,
    origin: str,
    rev: str,
    name: str,
    overrides: list[str],
    objective: str,
    cache_remote: str | None,
    env: dict[str, str],
) -> tuple[float, str]:
    """(objective value, "ran" | "on origin"): run and push experiment `name` in the clone `repo`,
    unless an earlier run of this sweep already pushed it."""
    metrics_file, key = objective.split(":", 1)
    ref = exp_ref(origin, rev, name, repo)
    if ref is not None:
        run(["git", "fetch", "-q", origin, f"{ref}:{ref}"], repo, env)
        return metric(run(["git", "show", f"{ref}:{metrics_file}"], repo, env), key), "on origin"
    dvc = tool("dvc")
    if cache_remote:  # the local default: this machine's repository cache is the remote
        run([dvc, "remote", "add", "--local", "-d", "sweep-cache", cache_remote], repo, env)
    sets = [arg for o in overrides for arg in ("-S", o)]
    run([dvc, "exp", "run", "-n", name, "--pull", "--allow-missing", *sets], repo, env)
    value = metric((repo / metrics_file).read_text(), key)
    run([dvc, "push", "-q"], repo, env)  # the outputs first: a ref on the origin always has its data
    run([dvc, "exp", "push", "--no-cache", "origin", name], repo, env)
    return value, "ran"
