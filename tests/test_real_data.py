"""Real MNIST through the real pipeline: the committed numbers reproduced, byte-identical reruns, floors, mnist-predict.

Runs only with MNIST_MIRROR set (CI points it at its local copy of the four files):
    MNIST_MIRROR=/path/to/mnist pytest -m realdata
The Fashion-MNIST run also needs FASHION_MNIST_MIRROR (CI: Debian's dataset-fashion-mnist).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import ROOT, needs_chromium, DVC, chromium, draw_strokes, git_repo_env, run, served, trace, wait_answers
from mnist_pipeline import calibration, exported, processed
from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.datasets import DATASETS
from mnist_pipeline.download import verify_file
from mnist_pipeline.engine import predict_logits
from mnist_pipeline.images import prepare_file

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not os.environ.get("MNIST_MIRROR"), reason="set MNIST_MIRROR to run on real MNIST"),
    pytest.mark.skipif(DVC is None, reason="dvc is not installed"),
]

BYTE_IDENTICAL = ("data/processed", "models/checkpoint.pt", "metrics/eval.json", "plots/confusion.json",
                  "models/export")
# The record CNN trains for 18 epochs (161-300 s on the CI machines): these tests check the pipeline on real
# files, so they train it for 4 (99.37 % at seed 42); its accuracy is benchmarks/bench_defaults.py's claim.
SHORT_CNN = ["-S", "model=cnn", "-S", "cnn.train.epochs=4"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = tmp_path_factory.mktemp("real") / "repo"
    env = git_repo_env(repo)
    return repo, env


def metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / name).read_text())


def test_default_mlp_reproduces_the_committed_numbers(project):
    """CI's reproduction check (scripts/check_repro.py): a fresh copy's `dvc repro` gives the committed bytes,
    whichever x86-64 CPU wrote dvc.lock (the portable kernels: tests/test_portable.py)."""
    repo, env = project
    check = run([sys.executable, str(ROOT / "scripts" / "check_repro.py")], repo, env)
    print(check.stdout)
    stats = json.loads((repo / "data/processed/stats.json").read_text())
    assert stats["counts"] == {"train": 55_000, "val": 5_000, "test": 10_000}
    assert metrics(repo, "eval.json")["accuracy"] >= 0.985
    export = metrics(repo, "export.json")
    assert all(r["top1_agreement"] == 1.0 and r["max_abs_logit_diff_bound"] <= 1e-4 for r in export.values())
    assert "Running stage" not in run([DVC, "repro"], repo, env).stdout
    assert_calibrated(repo)


def assert_calibrated(repo: Path) -> None:
    """ECE ≤ 1 % on test, in eval.json and through the exported model itself (what mnist-predict and
    mnist-serve read): an export without its temperature fails (its ECE was 9.7 % for the MLP)."""
    calibrated = metrics(repo, "eval.json")["calibration"]
    assert calibrated["ece_after"] <= 0.01 < calibrated["ece_before"], calibrated
    assert calibrated["nll_after"] < calibrated["nll_before"]
    images, labels = processed.load_split(repo / "data/processed", "test")
    model = exported.load_model(repo / "models/export/model.onnx")
    probs = torch.from_numpy(model.probabilities(images.numpy().astype(np.float32) / 255))
    assert calibration.expected_calibration_error(probs, labels) <= 0.01


def lock_hashes(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def test_forced_rerun_is_byte_identical(project):
    repo, env = project
    before = lock_hashes(repo)
    run([DVC, "repro", "-f"], repo, env)
    after = lock_hashes(repo)
    for path in BYTE_IDENTICAL:
        assert before[path] == after[path], path
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], repo, env).stdout == ""


def test_mnist_predict_agrees_with_evaluate(project, tmp_path):
    repo, env = project
    images, labels = processed.load_split(repo / "data/processed", "test")
    model = exported.load_model(repo / "models/export/model.onnx")
    ckpt = load_checkpoint(repo / "models/checkpoint.pt")
    norm = ckpt.normalisation
    evaluated = predict_logits(ckpt.build(), images, norm["mean"], norm["std"], 1000,
                               torch.device("cpu")).argmax(1).numpy()
    plain = []
    for i, image in enumerate(images.numpy()):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        plain.append(prepare_file(tmp_path / f"{i}.png"))
    agreement = (model.probabilities(np.stack(plain)).argmax(1) == evaluated).mean()
    assert agreement >= 0.995

    # Digits as people make them: dark ink on tinted paper, larger canvas, off centre, colour JPEG.
    rng = np.random.default_rng(0)
    n = 2000
    drawn = []
    for i in range(n):
        ink = Image.fromarray(255 - images[i].numpy()).resize((84, 84), Image.Resampling.BICUBIC)
        page = Image.new("RGB", (200, 160), (235, 230, 220))
        page.paste(Image.merge("RGB", [ink] * 3), (int(rng.integers(0, 110)), int(rng.integers(0, 70))))
        page.save(tmp_path / f"{i}.jpg", quality=90)
        drawn.append(prepare_file(tmp_path / f"{i}.jpg"))
    drawn_acc = (model.probabilities(np.stack(drawn)).argmax(1) == labels[:n].numpy()).mean()
    test_acc = (evaluated[:n] == labels[:n].numpy()).mean()
    assert drawn_acc >= test_acc - 0.02


@needs_chromium
def test_page_reads_digits_drawn_in_chromium(project, tmp_path):
    """Strokes retracing real test digits, drawn with pointer events on the page, read by the trained model."""
    from selenium.webdriver.common.by import By

    repo, _ = project
    images, labels = processed.load_split(repo / "data/processed", "test")
    picked = [i for cls in range(10) for i in [j for j in range(300) if int(labels[j]) == cls][:2]]
    photo = Image.new("RGB", (240, 200), (228, 222, 210))  # a test 3, as a photo of dark ink on paper
    three = next(i for i in range(300, 600) if int(labels[i]) == 3)
    ink = Image.fromarray(255 - images[three].numpy()).resize((112, 112), Image.Resampling.BICUBIC)
    photo.paste(Image.merge("RGB", [ink] * 3), (70, 40))
    photo.save(tmp_path / "photo.jpg", quality=85)
    read = {}
    with served(repo / "models/export/model.onnx") as (_, url), chromium(tmp_path / "profile") as driver:
        driver.get(url + "/")
        wait_answers(driver, 0)
        canvas = driver.find_element(By.ID, "pad")
        for i in picked:
            answers = int(driver.execute_script("return document.body.dataset.answers || '0'"))
            driver.find_element(By.ID, "clear").click()
            draw_strokes(driver, canvas, trace(images[i].numpy()))
            wait_answers(driver, answers + 1)
            read[i] = driver.find_element(By.ID, "prediction").text
        answers = int(driver.execute_script("return document.body.dataset.answers"))
        driver.find_element(By.ID, "upload").send_keys(str(tmp_path / "photo.jpg"))
        wait_answers(driver, answers + 1)
        uploaded = driver.find_element(By.ID, "prediction").text
        driver.find_element(By.ID, "clear").click()
        draw_strokes(driver, canvas, trace(images[picked[14]].numpy()))  # a 7, for the screenshot
        wait_answers(driver, answers + 2)
        driver.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("MNIST_SCREENSHOT"):  # how README's screenshot is made
        Path(os.environ["MNIST_SCREENSHOT"]).write_bytes((tmp_path / "page.png").read_bytes())
    correct = sum(read[i] == str(int(labels[i])) for i in picked)
    print(f"page: {correct} of {len(picked)} drawn digits read correctly; uploaded photo of a 3 read as {uploaded}")
    assert correct >= 18, read
    assert uploaded == "3"


def test_cnn_experiment(project):
    repo, env = project
    run(["git", "add", "-A"], repo, env)
    # Empty when the rerun reproduced the committed dvc.lock and metrics byte for byte (as on CI's machine kind).
    run(["git", "commit", "--allow-empty", "-qm", "baseline"], repo, env)
    run([DVC, "exp", "run", *SHORT_CNN, "-n", "cnn"], repo, env)
    result = metrics(repo, "eval.json")
    assert result["params"] <= 20_000
    assert result["accuracy"] >= 0.99
    assert_calibrated(repo)
    diff = json.loads(run([DVC, "metrics", "diff", "--json"], repo, env).stdout)
    assert diff["metrics/eval.json"]["accuracy"]["diff"] > 0


@pytest.mark.parametrize("dataset, variable", [("mnist", "MNIST_MIRROR"), ("fashion_mnist", "FASHION_MNIST_MIRROR")])
def test_pinned_payload_checksums_accept_recompressed_real_files(dataset, variable):
    # Both local copies are recompressed: their .gz md5s are not the official ones, so only the
    # pinned payload sha256s can accept them (and no MNIST_CHECKSUMS is involved).
    folder = os.environ.get(variable)
    if not folder:
        pytest.skip(f"set {variable}")
    for spec in DATASETS[dataset].files:
        verify_file(Path(folder) / spec.name, spec, {})


def test_committed_lock_does_not_depend_on_the_mirror(tmp_path):
    """dvc.lock was made from one mirror; a recompressed copy of the same files must give the
    same download output, so a teammate's lock is not "changed" (issue: sharing)."""
    import gzip

    mirror = tmp_path / "recompressed"
    mirror.mkdir()
    for spec in DATASETS["mnist"].files:
        payload = gzip.decompress((Path(os.environ["MNIST_MIRROR"]) / spec.name).read_bytes())
        (mirror / spec.name).write_bytes(gzip.compress(payload, compresslevel=1, mtime=1))
    repo = tmp_path / "repo"
    env = {**git_repo_env(repo), "MNIST_MIRROR": str(mirror)}
    committed = (repo / "dvc.lock").read_text()
    run([DVC, "repro", "--single-item", "download"], repo, env)
    assert (repo / "dvc.lock").read_text() == committed
    status = json.loads(run([DVC, "status", "--json", "preprocess"], repo, env).stdout)
    assert "data/raw/mnist" not in json.dumps(status), status  # preprocess sees its input unchanged


FASHION_FLOOR = 0.85  # four epochs of the record CNN; its full recipe's figure is benchmarks/results/fashion_mnist.json


@pytest.mark.skipif(not os.environ.get("FASHION_MNIST_MIRROR"), reason="set FASHION_MNIST_MIRROR")
def test_fashion_mnist_cnn_experiment(project):
    repo, env = project
    fashion_env = {**env, "MNIST_MIRROR": os.environ["FASHION_MNIST_MIRROR"]}
    fashion_env.pop("MNIST_CHECKSUMS", None)
    result = run([DVC, "exp", "run", "-S", "dataset=fashion_mnist", *SHORT_CNN, "-n", "fashion-cnn"],
                 repo, fashion_env)
    assert "data/raw/fashion_mnist" in result.stdout + result.stderr
    stats = json.loads((repo / "data/processed/stats.json").read_text())
    assert stats["dataset"] == "fashion_mnist" and stats["classes"][0] == "T-shirt/top"
    evaluation = metrics(repo, "eval.json")
    print(f"fashion_mnist cnn: test accuracy {evaluation['accuracy']}")
    assert evaluation["accuracy"] >= FASHION_FLOOR
    assert set(evaluation["per_class"]) == set(DATASETS["fashion_mnist"].classes)
