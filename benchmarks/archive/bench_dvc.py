"""DVC wall times: a no-op `dvc repro`, and the full pipeline from a local mirror.

    MNIST_MIRROR=/path/to/mnist python benchmarks/bench_dvc.py

- no-op: `dvc repro` in this checkout with everything up to date (median of 5), against
  `dvc version` (the CLI's own start-up) in the same run;
- full: `dvc repro` in a fresh git copy of the repository (nothing cached), once with the
  default MLP and once with `model: cnn`, with per-stage times read from the output: a
  stage runs from the moment DVC prints "Running stage" for it until it prints the next
  one (or exits), so DVC's own hashing and caching of its outputs count to the stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

import common  # noqa: E402

DVC = shutil.which("dvc") or "dvc"


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start, result.stdout


def fresh_copy(dest: Path, model: str) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=common.ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(common.ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["model"] = model
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)


def main() -> None:
    if not os.environ.get("MNIST_MIRROR"):
        sys.exit("set MNIST_MIRROR to a local copy of the four MNIST files")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    status = subprocess.run([DVC, "status", "--json"], cwd=common.ROOT, env=env, capture_output=True, text=True)
    if status.returncode or json.loads(status.stdout or "{}"):
        sys.exit("run `dvc repro` in this checkout first: the no-op benchmark needs an up-to-date pipeline")
    noop = common.median_time(lambda: timed([DVC, "repro"], common.ROOT, env))
    startup = common.median_time(lambda: timed([DVC, "version"], common.ROOT, env))
    results: dict = {"matmul_gflops": round(common.matmul_gflops(), 1),
                     "noop_repro_seconds": round(noop, 2), "dvc_version_seconds": round(startup, 2),
                     "full_repro_seconds": {}, "stage_seconds": {}, "metrics": {}}
    print(f"no-op dvc repro: {noop:.2f} s (dvc version: {startup:.2f} s)")
    for model in ("mlp", "cnn"):
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp)
            fresh_copy(repo, model)
            seconds, stages = common.timed_stages([DVC, "repro"], repo, env)
            timing = json.loads((repo / "logs" / "train_timing.json").read_text())
            evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
            results["full_repro_seconds"][model] = round(seconds, 1)
            results["stage_seconds"][model] = {**stages, "dvc before the first stage": round(
                seconds - sum(stages.values()), 1)}
            results["metrics"][model] = {"test_accuracy": evaluation["accuracy"], "params": evaluation["params"],
                                         "train_seconds": timing["train_seconds"]}
            print(f"full dvc repro ({model}): {seconds:.1f} s; train {timing['train_seconds']:.1f} s; "
                  f"test accuracy {evaluation['accuracy']:.4f}; stages: {stages}")
    common.save("dvc", results)


if __name__ == "__main__":
    main()
