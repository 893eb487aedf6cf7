"""Results files name the code that produced them: benchmarks/common.py's provenance and its refusal."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import benchmark_module


common = benchmark_module("common")


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
