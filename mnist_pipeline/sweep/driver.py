"""mnist-sweep: a parameter sweep on a Ray cluster, every trial a DVC experiment.

    mnist-sweep -S 'cnn.train.lr=0.05,0.1,0.2' -S 'seed=1,2,3'                       # a grid, 9 trials
    mnist-sweep -S 'cnn.train.lr=tag(log,interval(0.01,0.5))' --search optuna --trials 20 --concurrent 4
    mnist-sweep ... --address ray://head:10001 --cpus-per-trial 2 --gpus-per-trial 1

`-S` takes what `dvc exp run --queue -S` takes (Hydra's override grammar, parsed by Hydra
as DVC does): `key=value`, comma lists and `choice(...)`/`range(...)` for grids, and
`interval(a,b)` (`tag(log, interval(a,b))` for a log scale) for `--search optuna|random`.
Ray Tune runs the search (its grid, random and Optuna searchers), places each trial on a
node with the CPUs and GPUs it declares, and retries a trial whose node died
(`--max-failures`); nothing here schedules, queues or retries.

A trial, on whichever node runs it (`run_trial`): clones the origin at the sweep's
revision into a temporary folder, and unless an experiment of that name is already on the
origin, runs `dvc exp run -n NAME -S … --pull --allow-missing` (outputs of unchanged stages
come from the DVC remote), `dvc push`es the outputs and only then `dvc exp push`es the ref,
so an experiment on the origin always has its data. The name is derived from the trial's
params, so a sweep run again skips what is done. The objective is a validation metric
(`metrics/train.json:val_acc` by default): the test set picks nothing.

The driver checks everything it can before a trial starts (params keys and values at the
revision; on a cluster: an origin, the revision on it, a DVC remote), each failure one line
and exit 2; prints a line per finished trial with the best so far; then fetches the
experiments' refs, prints `dvc exp show` sorted by the objective and the command that
applies the best, and writes OUT/summary.json and OUT/objective.png.

Without `--address` a local Ray instance is started, the workers clone this repository
itself and push their experiments back into it, and its own DVC cache serves as their
remote when it has none, so the command needs no cluster, origin or remote.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mnist_pipeline import stage
from mnist_pipeline.errors import first_line
from mnist_pipeline.fileio import write_json
from mnist_pipeline.sweep.space import SEARCHES, SweepError, as_override, check_params, search_space
from mnist_pipeline.sweep.trial import run, run_trial, tool

# ---------------------------------------------------------------- checks before any trial


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if result.returncode:
        raise SweepError(f"git {' '.join(args)}: {first_line(RuntimeError(result.stderr.strip()))}")
    return result.stdout.strip()


def locate(repo: Path, origin: str | None, rev: str, cluster: bool) -> tuple[str, str, str | None]:
    """(origin URL, full revision, cache remote for the local default): or SweepError."""
    full = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    default = subprocess.run([tool("dvc"), "remote", "default"], cwd=repo, capture_output=True, text=True)
    has_remote = default.returncode == 0 and bool(default.stdout.strip())
    if not cluster and origin is None:
        if has_remote:
            return str(repo), full, None
        cache = subprocess.run([tool("dvc"), "cache", "dir"], cwd=repo, capture_output=True, text=True)
        return str(repo), full, cache.stdout.strip() or str(repo / ".dvc" / "cache")
    if origin is None:
        origin = subprocess.run(
            ["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        if not origin:
            raise SweepError(
                "no git remote 'origin': the cluster's workers clone it (git remote add origin URL, or --origin URL)"
            )
    heads = subprocess.run(["git", "ls-remote", origin], cwd=repo, capture_output=True, text=True)
    if heads.returncode:
        raise SweepError(f"origin {origin}: {first_line(RuntimeError(heads.stderr.strip() or 'unreachable'))}")
    tips = {line.split()[0] for line in heads.stdout.splitlines() if "\trefs/heads/" in line or "\trefs/tags/" in line}
    if not any(
        subprocess.run(["git", "merge-base", "--is-ancestor", full, tip], cwd=repo, capture_output=True).returncode == 0
        for tip in tips
    ):
        raise SweepError(f"revision {full[:7]} is not on origin {origin}: push it first (git push origin HEAD)")
    if not has_remote:
        raise SweepError(
            "no default DVC remote: trials push their outputs there "
            "(dvc remote add -d NAME URL, committed; credentials in each node's config or environment)"
        )
    return origin, full, None


# ---------------------------------------------------------------- the driver


def cause(error: BaseException | None) -> str:
    """The one line that says why a trial failed: Ray wraps a trial's exception in its traceback,
    whose last line is the exception this module raised (or Ray's own, for a lost node)."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def progress_callback(objective: str, mode: str):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per finished or failed trial: counts and the best so far."""

        def __init__(self) -> None:
            self.done, self.failed = 0, 0
            self.best: tuple[float, str | None] | None = None

        def _line(self, trials, what: str) -> None:
            running = sum(t.status == "RUNNING" for t in trials)
            best = f"; best {objective} {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
            print(f"[{self.done} done, {running} running, {self.failed} failed] {what}{best}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.done += 1
            result = trial.last_result or {}
            value = result.get(objective)
            if value is not None and (self.best is None or (value > self.best[0]) == (mode == "max")):
                self.best = (value, result.get("experiment"))
            self._line(
                trials,
                f"{result.get('experiment')}: {objective} {value} ({result.get('status')}, {result.get('seconds')} s)",
            )

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            self._line(
                trials, f"trial {trial.trial_id} ({trial.config}) lost ({cause(trial.get_error())}): Ray runs it again"
            )

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.failed += 1
            self._line(trials, f"trial {trial.trial_id} ({trial.config}) failed: {cause(trial.get_error())}")

    return Progress()


def plot(rows: list[dict[str, Any]], keys: list[str], objective: str, path: Path) -> None:
    from matplotlib.figure import Figure

    from mnist_pipeline.fileio import atomic_path

    keys = keys or ["trial"]
    fig = Figure(figsize=(4 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    done = [r for r in rows if r.get(objective) is not None]
    for ax, key in zip(axes, keys, strict=True):
        xs = [r["config"].get(key, i) for i, r in enumerate(done)]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [r[objective] for r in done])
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
    fig.suptitle(f"{objective} per trial")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-sweep", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="as `dvc exp run -S` (Hydra grammar): key=a,b,c | choice() | range() | interval()",
    )
    parser.add_argument("--search", choices=SEARCHES, default="grid", help="grid (default), random or optuna")
    parser.add_argument("--trials", type=int, default=None, help="random/optuna: how many (default 10)")
    parser.add_argument("--objective", default="metrics/train.json:val_acc", help="FILE:KEY, a validation metric")
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    parser.add_argument("--address", default=None, help="a Ray cluster (default: start Ray on this machine)")
    parser.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs (and torch threads) per trial")
    parser.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (the stage trains on it)")
    parser.add_argument("--concurrent", type=int, default=None, help="trials at a time (default: what fits)")
    parser.add_argument("--origin", default=None, help="git URL the workers clone (default: origin)")
    parser.add_argument("--rev", default="HEAD", help="revision to sweep from (default HEAD); must be on the origin")
    parser.add_argument("--max-failures", type=int, default=2, help="Ray's retries of a failed trial (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="the searcher's seed (random, optuna)")
    parser.add_argument(
        "--out", type=Path, default=Path("sweeps"), help="summary.json and objective.png (default sweeps/)"
    )
    args = parser.parse_args(argv)
    # A SweepError is one line and exit 2; Ctrl-C exits 130, and the same command later does the rest.
    return stage.run(lambda _: sweep(args))


def sweep(args: argparse.Namespace) -> int:
    repo = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel"))
    if not args.overrides:
        raise SweepError("nothing to sweep: give -S KEY=VALUES, e.g. -S 'cnn.train.lr=0.05,0.1'")
    if ":" not in args.objective:
        raise SweepError(f"--objective {args.objective!r}: expected FILE:KEY, e.g. metrics/train.json:val_acc")
    if args.objective.split(":", 1)[0].startswith("metrics/eval"):
        raise SweepError(
            f"--objective {args.objective}: that is the test set's; choose on validation (metrics/train.json:val_acc)"
        )
    fixed, swept = search_space(args.overrides, args.search)
    origin, rev, cache_remote = locate(repo, args.origin, args.rev, cluster=args.address is not None)
    check_params(_git(repo, "show", f"{rev}:params.yaml"), rev, fixed, swept)

    rows = run_trials(args, fixed, swept, origin, rev, cache_remote)
    return report(repo, origin, rev, rows, list(swept), args)


def row(result: Any, objective: str) -> dict[str, Any]:
    """One trial's line of the summary, from Ray Tune's result."""
    metrics = result.metrics or {}
    return {
        "experiment": metrics.get("experiment"),
        "config": result.config,
        "overrides": metrics.get("overrides"),
        objective: metrics.get(objective),
        "status": metrics.get("status") if result.error is None else "failed",
        "error": None if result.error is None else cause(result.error),
        "node": metrics.get("node"),
        "seconds": metrics.get("seconds"),
    }


def run_trials(
    args: argparse.Namespace,
    fixed: dict[str, Any],
    swept: dict[str, Any],
    origin: str,
    rev: str,
    cache_remote: str | None,
) -> list[dict[str, Any]]:
    """Ray Tune runs the trials (on the cluster at --address, or on this machine); one row each."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard/CSV files of Tune's own
    import ray
    from ray import tune

    # The local default is one machine: Ray on the loopback address, not the machine's network one.
    local: dict[str, Any] = {} if args.address else {"num_cpus": os.cpu_count(), "_node_ip_address": "127.0.0.1"}
    ray.init(address=args.address or "local", log_to_driver=False, include_dashboard=False, **local)
    try:
        search_alg, samples = None, 1
        if args.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg, samples = OptunaSearch(seed=args.seed), args.trials or 10
        elif args.search == "random":
            samples = args.trials or 10
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                origin=origin,
                rev=rev,
                objective=args.objective,
                fixed=[as_override(k, v) for k, v in fixed.items()],
                cpus=args.cpus_per_trial,
                cache_remote=cache_remote,
            ),
            {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
        )
        grid = 1
        for domain in swept.values():
            grid *= len(domain["grid_search"]) if isinstance(domain, dict) else 1
        print(
            f"sweeping {' '.join(args.overrides)} from {rev[:7]} of {origin}: {grid * samples} trial(s) "
            f"({args.search}), {args.cpus_per_trial} CPU(s) and {args.gpus_per_trial:g} GPU(s) each",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="mnist-sweep-tune-") as storage:
            tuner = tune.Tuner(
                trainable,
                param_space=swept,
                tune_config=tune.TuneConfig(
                    metric=args.objective,
                    mode=args.mode,
                    search_alg=search_alg,
                    num_samples=samples,
                    max_concurrent_trials=args.concurrent,
                ),
                run_config=tune.RunConfig(
                    name="mnist-sweep",
                    storage_path=storage,
                    verbose=0,
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    callbacks=[progress_callback(args.objective, args.mode)],
                ),
            )
            results = tuner.fit()
            return [row(results[i], args.objective) for i in range(len(results))]
    finally:
        ray.shutdown()


def report(
    repo: Path, origin: str, rev: str, rows: list[dict[str, Any]], keys: list[str], args: argparse.Namespace
) -> int:
    done = [r for r in rows if r["status"] != "failed"]
    failed = [r for r in rows if r["status"] == "failed"]
    ran = sum(r["status"] == "ran" for r in rows)
    if origin != str(repo) and done:  # the experiments' refs; their outputs come with `dvc exp apply` + `dvc pull`
        run([tool("dvc"), "exp", "pull", "--no-cache", "origin", *[r["experiment"] for r in done]], repo)
    args.out.mkdir(parents=True, exist_ok=True)
    sign = -1 if args.mode == "max" else 1
    rows.sort(key=lambda r: (r[args.objective] is None, sign * (r[args.objective] or 0)))
    write_json(
        args.out / "summary.json",
        {
            "origin": origin,
            "rev": rev,
            "search": args.search,
            "objective": args.objective,
            "mode": args.mode,
            "trials": rows,
            "ran": ran,
            "on_origin": len(done) - ran,
            "failed": len(failed),
        },
    )
    plot(rows, keys, args.objective, args.out / "objective.png")
    print(f"\n{len(rows)} trials: {ran} ran, {len(done) - ran} already on the origin, {len(failed)} failed")
    for row in failed:
        print(f"  failed: {row['config']}: {row['error']}")
    if done:
        shown = subprocess.run(
            [
                tool("dvc"),
                "exp",
                "show",
                "--no-pager",
                "--only-changed",
                "--rev",
                rev,
                "--sort-by",
                args.objective,
                "--sort-order",
                "desc" if args.mode == "max" else "asc",
                "--drop",
                "Created",
            ],
            cwd=repo,
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": os.environ.get("COLUMNS", "200")},
        )
        print(shown.stdout.rstrip() or shown.stderr.rstrip())
        best = rows[0]
        print(
            f"best: {best['experiment']} ({args.objective} {best[args.objective]}); apply it with "
            f"`dvc exp apply {best['experiment']} && dvc pull`"
        )
    print(f"summary: {args.out / 'summary.json'}, plot: {args.out / 'objective.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
