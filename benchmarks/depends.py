"""What each results file measured, and whether that changed since: a figure goes stale only when its inputs did.

A results file names the commit of the code that ran. Its inputs are:
- the environment: both locks (requirements.txt, requirements-dev.txt), for every results file: a
  package bumped in either can move any figure;
- code: the import closure of its script inside this repository (the benchmarks beside it and the
  `mnist_pipeline` modules it imports, found by reading the source, function-level imports included),
  the closure of each console script it runs (`mnist-serve`, …), and, for a benchmark that runs the
  pipeline (`dvc repro`, `dvc exp run`), every stage's deps as dvc.yaml lists them, and dvc.yaml itself;
  with the files those packages read at run time, as pyproject.toml's package-data declares them for
  the packages of that code (the page under `serving/static/`, the store's migrations);
- params: the params.yaml keys it reads (all of them when it runs the pipeline; a stage it runs as a
  process reads what dvc.yaml declares for it);
- data: the DVC outputs it reads from the workspace, by their hash in dvc.lock.

It is stale exactly when one of those differs between its commit and HEAD. Why not a DVC pipeline of
benchmarks (benchmarks/dvc.yaml)? Its lock would record the hashes of the inputs as they were when a
benchmark last ran, which is what the commit already records; and an import closure written out as
`deps` by hand goes wrong the day someone adds an import, while this one is read from the source.
Pure standard library and PyYAML: `report.py --check` imports neither torch nor the package.
"""

from __future__ import annotations

import ast
import subprocess
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGE = "mnist_pipeline"
LOCKS = ("requirements.txt", "requirements-dev.txt")


@dataclass(frozen=True)
class Inputs:
    """What a benchmark reads besides its own import closure."""

    params: tuple[str, ...] = ()  # dotted params.yaml keys it reads itself (tests/test_depends.py checks them)
    data: tuple[str, ...] = ()  # DVC outputs of the workspace, compared by their dvc.lock hash
    commands: tuple[str, ...] = ()  # console scripts it runs (pyproject's [project.scripts])
    pipeline: bool = False  # runs `dvc repro` / `dvc exp run`: every stage, dvc.yaml, every param
    stages: tuple[str, ...] = ()  # stage scripts it runs as processes, outside DVC


# The script behind each results file, where it is not bench_<name>.py.
SCRIPTS = {"sweep_cluster": "benchmarks/bench_sweep.py"}
PIPELINE = Inputs(pipeline=True)
INPUTS = {
    # In-process training of params.yaml's recipes on the processed splits.
    "defaults": Inputs(params=("model", "mlp", "cnn"), data=("data/processed",)),
    "train": Inputs(params=("mlp", "cnn", "data", "seed"), data=("data/processed", "data/raw/mnist")),
    # The train stage as a process, on the workspace's splits, teacher logits and corrections.
    "kernels": Inputs(stages=("train",), data=("data/processed", "models/teacher", "data/curated/admitted")),
    # mnist-serve with the committed exported model, posting test digits.
    "serve": Inputs(commands=("mnist-serve",), data=("models/export", "data/processed")),
    # Fresh clones running the pipeline.
    "first_run": PIPELINE,
    "fashion_mnist": PIPELINE,
    "sweep_cluster": Inputs(pipeline=True, commands=("mnist-sweep",)),
    "feedback": Inputs(pipeline=True, commands=("mnist-feedback", "mnist-serve")),
    # mnist-serve and mnist-feedback on a SQLite and a PostgreSQL store, serving the committed model.
    "store": Inputs(commands=("mnist-serve", "mnist-feedback"), data=("models/export", "data/processed")),
}


def script_of(name: str) -> str:
    return SCRIPTS.get(name, f"benchmarks/bench_{name}.py")


def _module_files(name: str, importer: str, root: Path) -> list[str]:
    """The repository files that `import name` runs, seen from the file `importer`: a package's
    `__init__.py` files on the way down, then the module; a sibling benchmark module; else nothing."""
    parts = name.split(".")
    if parts[0] == PACKAGE:
        found = []
        for i in range(1, len(parts) + 1):
            stem = "/".join(parts[:i])
            for candidate in (f"{stem}/__init__.py", f"{stem}.py"):
                if (root / candidate).is_file():
                    found.append(candidate)
        return found
    sibling = str(Path(importer).parent / f"{parts[0]}.py")
    return [sibling] if len(parts) == 1 and (root / sibling).is_file() else []


def _imported(path: str, root: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse((root / path).read_text(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the importer's package
                package = Path(path).parent.parts[: len(Path(path).parent.parts) - node.level + 1]
                module = ".".join([*package, *([module] if module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    files = set()
    for name in names:
        files.update(_module_files(name, path, root))
    return files


def closure(files: Iterable[str], root: Path = ROOT) -> set[str]:
    """`files` and every repository file they import, transitively (paths relative to `root`)."""
    todo, seen = list(files), set()
    while todo:
        path = todo.pop()
        if path not in seen and (root / path).is_file():
            seen.add(path)
            if path.endswith(".py"):
                todo.extend(_imported(path, root) - seen)
    return seen


def command_module(command: str, root: Path = ROOT) -> str:
    """The file a console script runs: pyproject's `[project.scripts]` entry, as a path."""
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    module = scripts[command].split(":")[0]
    return module.replace(".", "/") + ".py"


def _stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def pipeline_deps(root: Path = ROOT) -> set[str]:
    """dvc.yaml and the code every stage depends on (its script and the package modules it lists)."""
    return {"dvc.yaml"} | {dep for stage in _stages(root).values() for dep in stage.get("deps", [])
                           if dep.endswith(".py")}


def package_data(files: Iterable[str], root: Path = ROOT) -> set[str]:
    """The data files (pyproject.toml's `[tool.setuptools.package-data]`) of the packages that `files` belong to:
    what their code reads at run time, the page's HTML among them."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    declared = setuptools.get("package-data", {})
    folders = {str(Path(f).parent) for f in files}
    found = set()
    for package, patterns in declared.items():
        folder = package.replace(".", "/")
        if folder in folders:
            found.update(str(p.relative_to(root)) for pattern in patterns for p in (root / folder).glob(pattern))
    return found


def params_of(name: str, root: Path = ROOT) -> tuple[str, ...]:
    """The params.yaml keys `name` reads: its own, and what dvc.yaml declares for each stage it runs as a process
    (`${model}`, the selected model's section, may be either)."""
    keys = list(inputs_of(name).params)
    for stage in inputs_of(name).stages:
        for key in _stages(root)[stage].get("params", []):
            keys += ["mlp", "cnn"] if key == "${model}" else [key]
    return tuple(dict.fromkeys(keys))


def inputs_of(name: str) -> Inputs:
    return INPUTS.get(name, PIPELINE)  # undeclared: everything a `dvc repro` runs


def code_of(name: str, root: Path = ROOT) -> set[str]:
    """The files whose change makes `name`'s results stale."""
    inputs = inputs_of(name)
    entry = [script_of(name), *(command_module(c, root) for c in inputs.commands),
             *(f"stages/{stage}.py" for stage in inputs.stages)]
    if inputs.pipeline:
        entry += sorted(pipeline_deps(root))
    code = closure(entry, root)
    return code | package_data(code, root) | set(LOCKS)


def _at(commit: str, path: str, root: Path) -> str | None:
    found = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True)
    return found.stdout if found.returncode == 0 else None


def _key(tree: object, dotted: str) -> object:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def changed_params(name: str, commit: str, root: Path = ROOT) -> list[str]:
    inputs = inputs_of(name)
    then, now = (yaml.safe_load(_at(rev, "params.yaml", root) or "{}") for rev in (commit, "HEAD"))
    if inputs.pipeline:
        return sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
    return [k for k in params_of(name, root) if _key(then, k) != _key(now, k)]


def _lock_hashes(text: str | None) -> dict[str, str]:
    lock = yaml.safe_load(text or "{}") or {}
    return {out["path"]: out.get("md5", "") for stage in lock.get("stages", {}).values()
            for out in stage.get("outs", [])}


def changed_data(name: str, commit: str, root: Path = ROOT) -> list[str]:
    data = inputs_of(name).data
    then, now = (_lock_hashes(_at(rev, "dvc.lock", root)) for rev in (commit, "HEAD"))
    return [path for path in data if then.get(path) != now.get(path)]


def staleness(name: str, result: dict, root: Path = ROOT) -> str | None:
    """Why a results file no longer describes its inputs at HEAD of `root`, or None when it does."""
    commit = str(result.get("commit", "unknown"))
    if result.get("dirty", False):
        return f"measured on uncommitted changes to `{commit[:7]}`"
    try:
        changed = subprocess.run(["git", "diff", "--name-only", commit, "HEAD", "--", *sorted(code_of(name, root))],
                                 cwd=root, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return f"`{commit[:7]}` is not in this repository's history"
    changed += [f"params.yaml: {key}" for key in changed_params(name, commit, root)]
    changed += [f"{path} (dvc.lock)" for path in changed_data(name, commit, root)]
    if changed:
        shown = ", ".join(f"`{c}`" for c in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        return f"{shown} changed since `{commit[:7]}`"
    return None
