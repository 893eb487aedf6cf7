import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock

from helpers import DVC, TINY, copy_baseline, run, tiny_repo
from mnist_pipeline import export, exported
from mnist_pipeline.models import CNN
from mnist_pipeline.params import parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    """The repository's params.yaml, shrunk to sizes that train in a second."""
    p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    quick = {"epochs": 2, "batch_size": 32, "lr": 0.05, "ema": 0.0}
    return p.model_copy(update={
        "mlp": p.mlp.model_copy(update={"hidden": (32,), "train": p.mlp.train.model_copy(update=quick)}),
        "cnn": p.cnn.model_copy(update={"channels": ((4,), (8,)), "train": p.cnn.train.model_copy(update=quick)})})


META = exported.metadata("cnn", list("0123456789"), 0.13, 0.31)


@pytest.fixture(scope="session")
def exported_models(tmp_path_factory):
    """A small untrained CNN as exported (behind its normalisation), its ONNX and .pt2 files: (model, folder)."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = export.deployable(CNN([[4], [8]], 0.0), 0.13, 0.31)
    export.export_onnx(model, folder / "model.onnx", 18, META)
    export.export_pt2(model, folder / "model.pt2", META)
    return model, folder


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory):
    """The tiny pipeline (helpers.TINY) reproduced once per test run with the real `dvc` and committed as
    "baseline: mlp": (repo, env, the first `dvc repro`'s stdout). The first xdist worker to need it builds it
    under a lock in the run's shared temp folder, the other reads it. No test changes it: each works on a copy
    (`tiny_project`) or a clone, so any order and `-k` work."""
    if DVC is None:
        pytest.skip("dvc is not installed")
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    built = shared / "tiny-baseline.json"
    with FileLock(str(shared / "tiny-baseline.lock")):
        if not built.exists():
            folder = shared / "tiny-baseline"
            shutil.rmtree(folder, ignore_errors=True)  # a worker whose build failed left it half made
            folder.mkdir()
            repo, env = tiny_repo(folder, TINY)
            run(["git", "commit", "-qam", "tiny params"], repo, env)
            repro = run([DVC, "repro"], repo, env).stdout
            run(["git", "add", "-A"], repo, env)
            run(["git", "commit", "-qm", "baseline: mlp"], repo, env)
            built.write_text(json.dumps({"repo": str(repo), "env": env, "repro": repro}))
        saved = json.loads(built.read_text())
    return Path(saved["repo"]), saved["env"], saved["repro"]


@pytest.fixture
def tiny_project(tiny_baseline, tmp_path):
    """A private copy of the committed baseline: (repo, env)."""
    return copy_baseline(tiny_baseline, tmp_path / "repo")


# The longest modules first (their time in `pytest --durations=0`), so that with `-n 2 --dist loadfile` the
# sweep's Ray cluster starts at once and the rest fills the other worker meanwhile.
LONGEST_FIRST = [
    "test_sweep.py", "test_portable.py", "test_pipeline_e2e.py", "test_share.py", "test_feedback.py", "test_resume.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure: a tool or dataset that CI should have installed is missing.
    The one expected skip is a real-data test in a run without MNIST_MIRROR (README's test line)."""
    outcome = yield
    report = outcome.get_result()
    expected = item.get_closest_marker("realdata") is not None and not os.environ.get("MNIST_MIRROR")
    if os.environ.get("CI") == "true" and report.skipped and not expected:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"skipped under CI=true, which needs every test to run: {reason}"
