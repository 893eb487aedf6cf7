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
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mnist_pipeline import stage
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.fileio import write_json
from mnist_pipeline.params import apply_overrides, parse_params, read_yaml

BIN = Path(sys.executable).parent
SEARCHES = ("grid", "random", "optuna")


class SweepError(PipelineError):
    """The sweep cannot start: a bad -S, a missing origin, remote or revision."""

    exit_code = 2


# ---------------------------------------------------------------- the search space, from -S


def search_space(overrides: list[str], search: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fixed {key: value}, swept {key: Ray Tune domain}) from `-S` overrides in Hydra's grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException
    from ray import tune

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise SweepError(f"-S: {' '.join(str(exc).split())}") from None
    fixed, swept = {}, {}
    for override in parsed:
        key, value = override.key_or_group, override.value()
        if isinstance(value, (ChoiceSweep, RangeSweep)):
            options = list(value.list) if isinstance(value, ChoiceSweep) else \
                list(range(int(value.start), int(value.stop), int(value.step)))
            swept[key] = tune.grid_search(options) if search == "grid" else tune.choice(options)
        elif isinstance(value, IntervalSweep):
            if search == "grid":
                raise SweepError(f"-S {override.input_line}: an interval needs --search optuna or random, "
                                 "a grid takes a list such as 'key=0.1,0.2'")
            ints = isinstance(value.start, int) and isinstance(value.end, int)
            log = "log" in value.tags
            swept[key] = (tune.lograndint if log else tune.randint)(value.start, value.end) if ints else \
                (tune.loguniform if log else tune.uniform)(value.start, value.end)
        else:
            fixed[key] = value
    return fixed, swept


def as_override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else value}"


def experiment_name(overrides: list[str]) -> str:
    """A git-ref-safe name derived from the trial's overrides alone: the same params, the same name."""
    digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:7]
    slug = "_".join(f"{o.split('=', 1)[0].rsplit('.', 1)[-1]}-{o.split('=', 1)[1]}" for o in sorted(overrides))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "", slug)[:48].strip("._-")
    return f"{slug}-{digest}" if slug else f"sweep-{digest}"


# ---------------------------------------------------------------- one trial, on a Ray worker


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        # A stage's own one-line "error: …" says why; DVC's "ERROR: failed to reproduce" only where.
        error = next((line for line in reversed(lines) if line.startswith("error:")), None) or \
            next((line for line in reversed(lines) if line.startswith("ERROR:")), None)
        raise RuntimeError(f"{' '.join(args[:3])} failed: {error or (lines[-1] if lines else result.returncode)}")
    return result.stdout


def _tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


def _exp_ref(origin: str, rev: str, name: str, cwd: Path) -> str | None:
    """The ref of experiment `name` on baseline `rev` if the origin has it (DVC's layout:
    refs/exps/<rev[:2]>/<rev[2:]>/<name>)."""
    ref = f"refs/exps/{rev[:2]}/{rev[2:]}/{name}"
    return ref if _run(["git", "ls-remote", origin, ref], cwd).strip() else None


def _metric(text: str, key: str) -> float:
    value: Any = json.loads(text)
    for part in key.split("."):
        value = value[part]
    return float(value)


def run_trial(config: dict[str, Any], *, origin: str, rev: str, fixed: list[str], objective: str,
              cpus: int, cache_remote: str | None) -> None:
    """Ray Tune's trainable: one DVC experiment, reported back as {objective, node, seconds, …}."""
    import ray
    from ray import tune

    start = time.perf_counter()
    overrides = fixed + [as_override(k, v) for k, v in sorted(config.items())]
    name = experiment_name(overrides)
    metrics_file, key = objective.split(":", 1)
    node = ray.get_runtime_context().get_node_id()
    # The clone's own code, not an installed copy, runs its stages; torch uses the CPUs the trial holds.
    with tempfile.TemporaryDirectory(prefix=f"mnist-sweep-{name}-") as tmp:
        repo = Path(tmp) / "repo"
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus),
               "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
        _run(["git", "clone", "-q", "--no-checkout", origin, str(repo)], Path(tmp), env)
        _run(["git", "checkout", "-q", "--detach", rev], repo, env)
        ref = _exp_ref(origin, rev, name, repo)
        if ref is None:
            dvc = _tool("dvc")
            if cache_remote:  # the local default: this machine's repository cache is the remote
                _run([dvc, "remote", "add", "--local", "-d", "sweep-cache", cache_remote], repo, env)
            _run([dvc, "exp", "run", "-n", name, "--pull", "--allow-missing",
                  *[arg for o in overrides for arg in ("-S", o)]], repo, env)
            value = _metric((repo / metrics_file).read_text(), key)
            _run([dvc, "push", "-q"], repo, env)  # the outputs first: a ref on the origin always has its data
            _run([dvc, "exp", "push", "--no-cache", "origin", name], repo, env)
            status = "ran"
        else:  # done by an earlier run of this sweep
            _run(["git", "fetch", "-q", origin, f"{ref}:{ref}"], repo, env)
            value = _metric(_run(["git", "show", f"{ref}:{metrics_file}"], repo, env), key)
            status = "on origin"
    tune.report({objective: value, "experiment": name, "overrides": overrides, "node": node, "status": status,
                 "seconds": round(time.perf_counter() - start, 2)})


# ---------------------------------------------------------------- checks before any trial


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if result.returncode:
        raise SweepError(f"git {' '.join(args)}: {first_line(RuntimeError(result.stderr.strip()))}")
    return result.stdout.strip()


def check_params(repo: Path, rev: str, fixed: dict[str, Any], swept: dict[str, Any]) -> None:
    """Every key and value a trial could get, against params.yaml at the revision (one line, exit 2)."""
    from ray.tune.search.sample import Domain

    try:
        base = parse_params(read_yaml(_git(repo, "show", f"{rev}:params.yaml")))
    except PipelineError as exc:
        raise SweepError(f"params.yaml at {rev[:7]}: {exc}") from None
    candidates: dict[str, list[Any]] = {}
    for key, domain in swept.items():
        if isinstance(domain, dict) and "grid_search" in domain:
            candidates[key] = domain["grid_search"]
        elif hasattr(domain, "categories"):
            candidates[key] = list(domain.categories)
        elif isinstance(domain, Domain):
            candidates[key] = [domain.lower, domain.upper - (1 if isinstance(domain.lower, int) else 0)]
    try:
        apply_overrides(base, [as_override(k, v) for k, v in fixed.items()])
        for key, values in candidates.items():
            for value in values:
                apply_overrides(base, [as_override(k, v) for k, v in fixed.items()] + [as_override(key, value)])
    except PipelineError as exc:
        raise SweepError(str(exc)) from None


def locate(repo: Path, origin: str | None, rev: str, cluster: bool) -> tuple[str, str, str | None]:
    """(origin URL, full revision, cache remote for the local default): or SweepError."""
    full = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    default = subprocess.run([_tool("dvc"), "remote", "default"], cwd=repo, capture_output=True, text=True)
    has_remote = default.returncode == 0 and bool(default.stdout.strip())
    if not cluster and origin is None:
        if has_remote:
            return str(repo), full, None
        cache = subprocess.run([_tool("dvc"), "cache", "dir"], cwd=repo, capture_output=True, text=True)
        return str(repo), full, cache.stdout.strip() or str(repo / ".dvc" / "cache")
    if origin is None:
        origin = subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True,
                                text=True).stdout.strip()
        if not origin:
            raise SweepError("no git remote 'origin': the cluster's workers clone it (git remote add origin URL, "
                             "or --origin URL)")
    heads = subprocess.run(["git", "ls-remote", origin], cwd=repo, capture_output=True, text=True)
    if heads.returncode:
        raise SweepError(f"origin {origin}: {first_line(RuntimeError(heads.stderr.strip() or 'unreachable'))}")
    tips = {line.split()[0] for line in heads.stdout.splitlines() if "\trefs/heads/" in line or "\trefs/tags/" in line}
    if not any(subprocess.run(["git", "merge-base", "--is-ancestor", full, tip], cwd=repo,
                              capture_output=True).returncode == 0 for tip in tips):
        raise SweepError(f"revision {full[:7]} is not on origin {origin}: push it first (git push origin HEAD)")
    if not has_remote:
        raise SweepError("no default DVC remote: trials push their outputs there "
                         "(dvc remote add -d NAME URL, committed; credentials in each node's config or environment)")
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
            self.done, self.failed, self.best = 0, 0, None

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
            self._line(trials, f"{result.get('experiment')}: {objective} {value} ({result.get('status')}, "
                               f"{result.get('seconds')} s)")

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            self._line(trials, f"trial {trial.trial_id} ({trial.config}) lost ({cause(trial.get_error())}): "
                               "Ray runs it again")

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
    for ax, key in zip(axes, keys):
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
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUES",
                        help="as `dvc exp run -S` (Hydra grammar): key=a,b,c | choice() | range() | interval()")
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
    parser.add_argument("--out", type=Path, default=Path("sweeps"), help="summary.json and objective.png (default sweeps/)")
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
        raise SweepError(f"--objective {args.objective}: that is the test set's; choose on validation "
                         "(metrics/train.json:val_acc)")
    fixed, swept = search_space(args.overrides, args.search)
    origin, rev, cache_remote = locate(repo, args.origin, args.rev, cluster=args.address is not None)
    check_params(repo, rev, fixed, swept)

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard/CSV files of Tune's own
    import ray
    from ray import tune

    # The local default is one machine: Ray on the loopback address, not the machine's network one.
    local = {} if args.address else {"num_cpus": os.cpu_count(), "_node_ip_address": "127.0.0.1"}
    ray.init(address=args.address or "local", log_to_driver=False, include_dashboard=False, **local)
    try:
        search_alg, samples = None, 1
        if args.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg, samples = OptunaSearch(seed=args.seed), args.trials or 10
        elif args.search == "random":
            samples = args.trials or 10
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, origin=origin, rev=rev, objective=args.objective,
                                 fixed=[as_override(k, v) for k, v in fixed.items()], cpus=args.cpus_per_trial,
                                 cache_remote=cache_remote),
            {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
        grid = 1
        for domain in swept.values():
            grid *= len(domain["grid_search"]) if isinstance(domain, dict) else 1
        print(f"sweeping {' '.join(args.overrides)} from {rev[:7]} of {origin}: {grid * samples} trial(s) "
              f"({args.search}), {args.cpus_per_trial} CPU(s) and {args.gpus_per_trial:g} GPU(s) each", flush=True)
        with tempfile.TemporaryDirectory(prefix="mnist-sweep-tune-") as storage:
            tuner = tune.Tuner(
                trainable, param_space=swept,
                tune_config=tune.TuneConfig(metric=args.objective, mode=args.mode, search_alg=search_alg,
                                            num_samples=samples, max_concurrent_trials=args.concurrent),
                run_config=tune.RunConfig(name="mnist-sweep", storage_path=storage, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                          callbacks=[progress_callback(args.objective, args.mode)]))
            results = tuner.fit()
            rows = []
            for result in results:
                metrics = result.metrics or {}
                rows.append({"experiment": metrics.get("experiment"), "config": result.config,
                             "overrides": metrics.get("overrides"), args.objective: metrics.get(args.objective),
                             "status": metrics.get("status") if result.error is None else "failed",
                             "error": None if result.error is None else cause(result.error),
                             "node": metrics.get("node"), "seconds": metrics.get("seconds")})
    finally:
        ray.shutdown()
    return report(repo, origin, rev, rows, list(swept), args)


def report(repo: Path, origin: str, rev: str, rows: list[dict[str, Any]], keys: list[str],
           args: argparse.Namespace) -> int:
    done = [r for r in rows if r["status"] != "failed"]
    failed = [r for r in rows if r["status"] == "failed"]
    ran = sum(r["status"] == "ran" for r in rows)
    if origin != str(repo) and done:  # the experiments' refs; their outputs come with `dvc exp apply` + `dvc pull`
        _run([_tool("dvc"), "exp", "pull", "--no-cache", "origin", *[r["experiment"] for r in done]], repo)
    args.out.mkdir(parents=True, exist_ok=True)
    sign = -1 if args.mode == "max" else 1
    rows.sort(key=lambda r: (r[args.objective] is None, sign * (r[args.objective] or 0)))
    write_json(args.out / "summary.json", {"origin": origin, "rev": rev, "search": args.search,
                                            "objective": args.objective, "mode": args.mode, "trials": rows,
                                            "ran": ran, "on_origin": len(done) - ran, "failed": len(failed)})
    plot(rows, keys, args.objective, args.out / "objective.png")
    print(f"\n{len(rows)} trials: {ran} ran, {len(done) - ran} already on the origin, {len(failed)} failed")
    for row in failed:
        print(f"  failed: {row['config']}: {row['error']}")
    if done:
        shown = subprocess.run([_tool("dvc"), "exp", "show", "--no-pager", "--only-changed", "--rev", rev,
                                "--sort-by", args.objective, "--sort-order", "desc" if args.mode == "max" else "asc",
                                "--drop", "Created"], cwd=repo, capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": os.environ.get("COLUMNS", "200")})
        print(shown.stdout.rstrip() or shown.stderr.rstrip())
        best = rows[0]
        print(f"best: {best['experiment']} ({args.objective} {best[args.objective]}); apply it with "
              f"`dvc exp apply {best['experiment']} && dvc pull`")
    print(f"summary: {args.out / 'summary.json'}, plot: {args.out / 'objective.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
