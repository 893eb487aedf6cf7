"""Results files name the code that produced them: benchmarks/common.py's provenance and its refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, benchmark_module

common = benchmark_module("common")
report = benchmark_module("report")
depends = sys.modules["depends"]  # the module report.py reads its table from


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "bench_x.py").write_text("print(1)\n")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "x")
    return tmp_path


def test_a_clean_tree_records_its_commit(repo):
    code = common.provenance(repo)
    assert code == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}
    assert common.traced(code, common.provenance(repo), allow_dirty=False) == code


def test_results_and_prose_do_not_make_the_tree_dirty(repo):
    (repo / "benchmarks" / "results" / "x.json").write_text("{}")
    (repo / "NOTES.md").write_text("prose")
    assert common.provenance(repo)["dirty"] is False


@pytest.mark.parametrize("change", ["edit", "new file"])
def test_uncommitted_code_is_refused_or_marked_with_a_hash_of_the_change(repo, change):
    clean = common.provenance(repo)
    target = repo / ("bench_x.py" if change == "edit" else "bench_new.py")
    target.write_text("print(2)\n")
    dirty = common.provenance(repo)
    assert dirty["dirty"] is True and dirty["commit"] == clean["commit"] and len(dirty["diff_sha256"]) == 64
    with pytest.raises(SystemExit, match="uncommitted changes"):
        common.traced(dirty, dirty, allow_dirty=False)
    assert common.traced(dirty, dirty, allow_dirty=True)["dirty"] is True
    target.write_text("print(3)\n")
    assert common.provenance(repo)["diff_sha256"] != dirty["diff_sha256"], "the hash names the change"


def test_code_changed_during_the_run_is_refused(repo):
    started = common.provenance(repo)
    (repo / "bench_x.py").write_text("print(2)\n")
    git(repo, "commit", "-qam", "y")  # even committed: the run started on other code
    with pytest.raises(SystemExit, match="changed while it ran"):
        common.traced(started, common.provenance(repo), allow_dirty=False)


FILES = {
    "benchmarks/bench_x.py": "import helper\nfrom mnist_pipeline import engine\n\ndef late():\n    import mnist_pipeline.images\n",
    "benchmarks/helper.py": "X = 1\n",
    "benchmarks/bench_other.py": "print(1)\n",
    "mnist_pipeline/__init__.py": "",
    "mnist_pipeline/engine.py": "from mnist_pipeline.fileio import write\n",
    "mnist_pipeline/fileio.py": "A = 1\n",
    "mnist_pipeline/images.py": "A = 1\n",
    "mnist_pipeline/feedback/__init__.py": "",
    "mnist_pipeline/feedback/curate.py": "A = 1\n",
    "mnist_pipeline/serving/__init__.py": "",
    "mnist_pipeline/serving/server.py": "from mnist_pipeline.serving import app\n",
    "mnist_pipeline/serving/app.py": "A = 1\n",
    "stages/train.py": "from mnist_pipeline import engine\n",
    "pyproject.toml": '[project]\nname = "x"\n[project.scripts]\nmnist-serve = "mnist_pipeline.serving.server:main"\n',
    "params.yaml": "seed: 1\nmlp:\n  lr: 0.1\ncnn:\n  lr: 0.2\n",
    "dvc.yaml": "stages:\n  train:\n    cmd: python stages/train.py\n    deps: [stages/train.py, mnist_pipeline/engine.py]\n",
    "dvc.lock": "schema: '2.0'\nstages:\n  prep:\n    outs:\n    - path: data/processed\n      md5: aaa.dir\n"
                "    - path: models/export\n      md5: bbb.dir\n",
    "README.md": "# x\n",
}


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """A repository whose benchmark `x` (mlp params, the processed data, mnist-serve) was measured at the first
    commit, and a benchmark `whole` that runs the pipeline."""
    for path, text in FILES.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "measured")
    monkeypatch.setitem(depends.INPUTS, "x", depends.Inputs(params=("mlp",), data=("data/processed",),
                                                            commands=("mnist-serve",)))
    monkeypatch.setitem(depends.INPUTS, "whole", depends.Inputs(pipeline=True))
    return tmp_path, {"commit": git(tmp_path, "rev-parse", "HEAD"), "dirty": False}


def commit_change(repo: Path, path: str, text: str) -> None:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "change")


@pytest.mark.parametrize("path", ["benchmarks/bench_x.py", "benchmarks/helper.py", "mnist_pipeline/engine.py",
                                  "mnist_pipeline/fileio.py", "mnist_pipeline/images.py",
                                  "mnist_pipeline/serving/app.py", "mnist_pipeline/__init__.py"])
def test_a_results_file_is_stale_once_code_it_runs_changed(measured, path):
    """Its script, a sibling it imports, a module imported by a module it imports, a function-level import,
    a module of the command it runs, a package's __init__ on the way."""
    repo, result = measured
    assert report.staleness("x", result, repo) is None
    commit_change(repo, path, "changed = 1\n")
    assert f"`{path}` changed since `{result['commit'][:7]}`" in report.staleness("x", result, repo)


@pytest.mark.parametrize("path", ["mnist_pipeline/feedback/curate.py", "benchmarks/bench_other.py", "README.md",
                                  "benchmarks/results/x.json", "stages/train.py", "dvc.yaml"])
def test_code_it_does_not_run_leaves_it_fresh(measured, path):
    repo, result = measured
    commit_change(repo, path, "changed = 1\n")
    assert report.staleness("x", result, repo) is None


def test_only_the_params_keys_it_reads_make_it_stale(measured):
    repo, result = measured
    commit_change(repo, "params.yaml", "seed: 2\nmlp:\n  lr: 0.1\ncnn:\n  lr: 0.3\n")
    assert report.staleness("x", result, repo) is None
    assert "params.yaml: cnn" in report.staleness("whole", result, repo)  # the pipeline reads every key
    commit_change(repo, "params.yaml", "seed: 2\nmlp:\n  lr: 0.2\ncnn:\n  lr: 0.3\n")
    assert "`params.yaml: mlp` changed" in report.staleness("x", result, repo)


def test_only_the_data_it_reads_makes_it_stale(measured):
    repo, result = measured
    commit_change(repo, "dvc.lock", FILES["dvc.lock"].replace("bbb.dir", "ccc.dir"))
    assert report.staleness("x", result, repo) is None
    commit_change(repo, "dvc.lock", FILES["dvc.lock"].replace("aaa.dir", "ddd.dir"))
    assert "`data/processed (dvc.lock)` changed" in report.staleness("x", result, repo)


@pytest.mark.parametrize("path", ["stages/train.py", "dvc.yaml", "mnist_pipeline/fileio.py"])
def test_a_benchmark_that_runs_the_pipeline_depends_on_every_stage(measured, path):
    repo, result = measured
    assert report.staleness("whole", result, repo) is None
    commit_change(repo, path, FILES[path] + "# changed\n")
    assert f"`{path}` changed" in report.staleness("whole", result, repo)


@pytest.mark.parametrize("path, stale", [("mnist_pipeline/feedback/curate.py", False),
                                         ("mnist_pipeline/serving/app.py", True)])
def test_this_repositorys_serving_figures_follow_serving_not_curation(tmp_path, path, stale):
    """The real closure of bench_serve.py: editing the curate step keeps serve.json fresh, editing the app does not."""
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    result = {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}
    assert report.staleness("serve", result, repo) is None
    with (repo / path).open("a") as handle:
        handle.write("# an edit\n")
    git(repo, "commit", "-qam", "edit")
    assert (report.staleness("serve", result, repo) is not None) is stale


def test_a_dirty_or_unknown_measurement_is_stale(measured):
    repo, result = measured
    assert "uncommitted" in report.staleness("x", {**result, "dirty": True}, repo)
    assert "not in this repository" in report.staleness("x", {"commit": "0" * 40, "dirty": False}, repo)


# ---------------------------------------------------------------- what the figures depend on, in this repository


def leaves(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def changed(value):
    """Other values a params leaf could take (the first that validates is used)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value / 2 if value else 0.1]
    if isinstance(value, str):
        return [s for s in ("cnn", "mlp", "adam", "cosine", "none", "fashion_mnist", "other") if s != value]
    if isinstance(value, list) and value:
        return [[other, *value[1:]] for other in changed(value[0])]
    return []


@pytest.mark.parametrize("name", ["defaults", "train"])
def test_a_benchmark_reads_exactly_the_params_keys_depends_declares(name, monkeypatch):
    """Each leaf of params.yaml changed in turn: the benchmark's plan (what it trains) moves for a leaf under a
    declared key, and for no other; each declared key moves it. An undeclared read (`model` was one) fails here."""
    import copy

    import yaml

    from mnist_pipeline.params import parse_params

    module = benchmark_module(f"bench_{name}")
    if hasattr(module, "SEEDS"):  # every seed is an override, the same for each: one shows what the others read
        monkeypatch.setattr(module, "SEEDS", module.SEEDS[:1])
    plan = module.plan
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    before = plan(parse_params(raw))
    declared = depends.params_of(name)
    moved = set()
    for path, value in leaves(raw):
        for other in changed(value):
            edited = copy.deepcopy(raw)
            node = edited
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = other
            try:
                params = parse_params(edited)
            except Exception:  # not a valid value here: try the next
                continue
            if plan(params) != before:
                moved.add(".".join(path))
            break
    undeclared = sorted(p for p in moved if not any(p == d or p.startswith(d + ".") for d in declared))
    unread = sorted(d for d in declared if not any(p == d or p.startswith(d + ".") for p in moved))
    assert not undeclared and not unread, f"{name}: reads {undeclared} undeclared; declares {unread} unread"


def test_a_lock_bump_makes_every_figure_stale_and_the_page_only_the_servers(tmp_path):
    """This repository's results files against its own history: after a committed change to a lock every one is
    stale; after an edit to the page (serving/static/index.html) serve, feedback and store are, nothing else."""
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    result = {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}
    names = sorted(p.stem for p in (repo / "benchmarks" / "results").glob("*.json"))
    assert {"serve", "feedback", "store", "first_run", "defaults", "kernels"} <= set(names)
    assert all(report.staleness(n, result, repo) is None for n in names)
    with (repo / "mnist_pipeline/serving/static/index.html").open("a") as page:
        page.write("<!-- an edit -->\n")
    git(repo, "commit", "-qam", "edit the page")
    assert {n for n in names if report.staleness(n, result, repo)} == {"serve", "feedback", "store"}
    for lock in ("requirements.txt", "requirements-dev.txt"):  # each lock on its own makes every figure stale
        result = {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}  # measured just before the bump
        text = (repo / lock).read_text()
        assert "\ntqdm==4.70.1 " in text
        (repo / lock).write_text(text.replace("\ntqdm==4.70.1 ", "\ntqdm==4.70.2 "))
        git(repo, "commit", "-qam", f"bump a package in {lock}")
        assert {n: bool(report.staleness(n, result, repo)) for n in names} == dict.fromkeys(names, True), lock
