"""Results files name the code that produced them: benchmarks/common.py's provenance and its refusal."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import benchmark_module


common = benchmark_module("common")
report = benchmark_module("report")


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


@pytest.fixture
def measured(tmp_path):
    """A repository whose benchmark measured its package at the first commit."""
    for path, text in {"benchmarks/bench_x.py": "print(1)\n", "mnist_pipeline/engine.py": "A = 1\n",
                       "params.yaml": "seed: 1\n", "dvc.yaml": "stages: {}\n", "README.md": "# x\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "measured")
    return tmp_path, {"commit": git(tmp_path, "rev-parse", "HEAD"), "dirty": False}


@pytest.mark.parametrize("path", ["benchmarks/bench_x.py", "mnist_pipeline/engine.py", "params.yaml", "dvc.yaml",
                                  "mnist_pipeline/feedback/new.py"])
def test_a_results_file_is_stale_once_anything_it_measured_changed(measured, path):
    repo, result = measured
    assert report.staleness("x", result, repo) is None
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text("changed\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "change")
    assert f"`{path}` changed since `{result['commit'][:7]}`" in report.staleness("x", result, repo)


def test_prose_and_results_do_not_make_a_results_file_stale(measured):
    repo, result = measured
    (repo / "README.md").write_text("# y\n")
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "x.json").write_text("{}")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "prose")
    assert report.staleness("x", result, repo) is None


def test_a_dirty_or_unknown_measurement_is_stale(measured):
    repo, result = measured
    assert "uncommitted" in report.staleness("x", {**result, "dirty": True}, repo)
    assert "not in this repository" in report.staleness("x", {"commit": "0" * 40, "dirty": False}, repo)
