"""The gate, promotion and a server that follows them: only a blessed model reaches users."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import META
from helpers import BIN, ROOT, run, served

from mnist_pipeline import export, gate, registry
from mnist_pipeline.checkpoint import load_checkpoint, save_checkpoint
from mnist_pipeline.fileio import sha256_file, write_json
from mnist_pipeline.models import CNN


def test_mcnemar_is_exact_and_one_sided():
    assert gate.worse_p(10, 0) == 1 / 1024
    assert gate.worse_p(0, 10) == 1.0 and gate.worse_p(0, 0) == 1.0
    assert gate.worse_p(5, 5) == pytest.approx(0.623046875)


def test_a_margin_of_the_size_of_seed_noise_is_allowed_and_no_more():
    """Eight of 5,000 validation digits lost (an honest loop that was refused before the margin): allowed at 0.1 %;
    twenty are not."""
    labels = np.zeros(5000, np.int64)
    champion = labels.copy()
    for lost, margin, worse in ((8, 0.0, True), (8, 0.001, False), (20, 0.001, True)):
        candidate = champion.copy()
        candidate[:lost] = 1
        judged = gate.paired(champion, candidate, labels, 0.05, margin)
        assert judged["worse"] is worse and judged["allowed"] == int(margin * 5000), (lost, margin, judged)


def test_a_class_made_worse_is_found_in_its_slice_and_noise_is_not():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 300)
    champion = np.where(rng.random(3000) < 0.97, labels, (labels + 1) % 10)
    noisy = np.where(rng.random(3000) < 0.97, labels, (labels + 1) % 10)  # as good, other mistakes
    assert gate.verdict({"val": gate.judge_slice(champion, noisy, labels, 0.05)}) == (True, [])
    hurt = champion.copy()
    sevens = np.flatnonzero((labels == 7) & (champion == 7))[:12]
    hurt[sevens] = 1  # twelve 7s now read as 1, while twelve other mistakes are mended: overall no worse
    mended = np.flatnonzero((labels != 7) & (champion != labels))[:12]
    hurt[mended] = labels[mended]
    blessed, reasons = gate.verdict({"val": gate.judge_slice(champion, hurt, labels, 0.05)})
    assert not blessed and len(reasons) == 1 and reasons[0].startswith("val: class 7 worse (12 images")


def edit_weights(checkpoint: Path, out: Path, change) -> None:
    """A candidate: the checkpoint with `change` applied to a copy of its state dict."""
    ckpt = load_checkpoint(checkpoint)
    state = dict(ckpt.state_dict)
    change(state)
    save_checkpoint(out, replace(ckpt, state_dict=state))


def swap_classes(checkpoint: Path, out: Path, a: int, b: int) -> None:
    """A candidate that reads a as b and b as a: the last layer's two rows swapped."""

    def swap(state: dict) -> None:
        last = [k for k, v in state.items() if v.ndim >= 1 and v.shape[0] == 10][-2:]
        assert len(last) == 2, list(state)
        for k in last:
            v = state[k].clone()
            v[[a, b]] = v[[b, a]]
            state[k] = v

    edit_weights(checkpoint, out, swap)


def nudge(checkpoint: Path, out: Path) -> None:
    """Other bytes, the same answers: a retrained model that changed nothing that matters."""

    def add(state: dict) -> None:
        key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
        state[key] = state[key] + 1e-7

    edit_weights(checkpoint, out, add)


def gate_stage(repo: Path, env: dict) -> dict:
    """The gate stage's script on the workspace, with MNIST's test split out of reach."""
    test = repo / "data" / "processed" / "test.pt"
    test.rename(repo / "test.pt.away")
    try:
        run([str(BIN / "python"), "stages/gate.py", "models/checkpoint.pt", "models/export/model.onnx",
             "data/processed", "--reviewed", "data/curated/reviewed", "--champion", "models/champion.json",
             "--card", "models/model_card.json", "--metrics", "metrics/gate.json"], repo, env)
    finally:
        (repo / "test.pt.away").rename(test)
    return json.loads((repo / "metrics" / "gate.json").read_text())


def export_stage(repo: Path, env: dict) -> None:
    run([str(BIN / "python"), "stages/export.py", "models/checkpoint.pt", "data/processed", "models/export",
         "--eval", "metrics/eval.json", "--metrics", "metrics/export.json", "--card", "models/model_card.json",
         "--parity", "logs/export_parity.json", "--lock", "requirements.txt"], repo, env)


def promote(repo: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "mnist-promote"), *args], repo, env, check=check)


def reviewed_sevens(repo: Path, champion: Path, n: int = 20) -> None:
    """A reviewed slice of held-out users' digits: n copies of validation 7s the champion reads right."""
    from mnist_pipeline import processed
    from mnist_pipeline.engine import predict_logits
    from mnist_pipeline.feedback import splits

    images, labels = processed.load_split(repo / "data" / "processed", "val")
    ckpt = load_checkpoint(champion)
    read = predict_logits(ckpt.build(), images, ckpt.normalisation["mean"], ckpt.normalisation["std"], 100,
                          torch.device("cpu")).argmax(1)
    sevens = images[(labels == 7) & (read == 7)].numpy()
    assert len(sevens)
    out = repo / "data" / "curated" / "reviewed"
    np.save(out / "images.npy", np.repeat(sevens[:1], n, axis=0), allow_pickle=False)
    np.save(out / "labels.npy", np.full(n, 7, np.int64), allow_pickle=False)
    assert len(splits.load(out)[0]) == n


def test_only_a_blessed_candidate_is_promoted_and_the_gate_never_reads_test(tiny_project):
    repo, env = tiny_project
    ckpt = repo / "models" / "checkpoint.pt"
    # This tiny project's champion: the model it reproduced (in its DVC cache, as a promotion leaves it).
    champion = {"version": None, "checkpoint_md5": hashlib.md5(ckpt.read_bytes()).hexdigest(),
                "model_sha256": sha256_file(repo / "models" / "export" / "model.onnx")}
    write_json(repo / "models" / "champion.json", champion)
    run([str(BIN / "dvc"), "repro", "gate"], repo, env)
    verdict = json.loads((repo / "metrics" / "gate.json").read_text())
    assert verdict["blessed"] and verdict["reasons"] == ["the candidate is the champion"]

    original = cached_champion(repo, champion)
    for bad in ("../../../../../../../../tmp/x.pt", "A" * 32):  # a champion record is checked before it is used
        write_json(repo / "models" / "champion.json", {**champion, "checkpoint_md5": bad})
        assert "32 lowercase hex digits" in run([str(BIN / "dvc"), "repro", "gate"], repo, env, check=False).stderr
    write_json(repo / "models" / "champion.json", champion)

    swap_classes(original, ckpt, 1, 7)  # a candidate that reads 7s as 1, exported as the pipeline would
    export_stage(repo, env)
    reviewed_sevens(repo, original)
    worse = gate_stage(repo, env)
    assert not worse["blessed"] and worse["champion"] == champion
    assert worse["reasons"][0].startswith("val: worse overall")  # 100 val images: too few to judge a class alone
    assert any(r.startswith("reviewed: class 7 worse (20 images only the champion got right") for r in worse["reasons"])
    refused = promote(repo, env, check=False)
    assert refused.returncode == 2 and "not blessed" in refused.stderr and not (repo / "models" / "serving").exists()

    nudge(original, ckpt)  # other weights, the same answers; the ONNX file is still the swapped one's
    mismatch = gate_stage(repo, env)
    assert not mismatch["blessed"] and "is not the export of" in mismatch["reasons"][0]

    export_stage(repo, env)  # now it is: blessed on the evidence, not by identity
    same = gate_stage(repo, env)
    assert same["blessed"] and same["reasons"] == [] and "note" not in same
    assert same["slices"]["reviewed"]["per_class"]["7"]["images"] == 20
    assert same["slices"]["val"]["overall"]["only_candidate"] == 0

    stale = promote(repo, env, "--model", "models/export/model.pt2", check=False)
    assert stale.returncode == 2 and "blessed another model" in stale.stderr
    out = promote(repo, env).stdout
    assert "as version 1 of models/serving" in out
    assert registry.versions(repo / "models" / "serving") == [1]
    assert sha256_file(repo / "models" / "serving" / "1" / "model.onnx") == same["candidate"]["model_sha256"]
    now = json.loads((repo / "models" / "champion.json").read_text())
    assert now == {"version": 1, **same["candidate"]}
    # Cut short after publishing, as if killed before the champion record: running it again finishes the job.
    write_json(repo / "models" / "champion.json", champion)
    registry.pin(repo / "models" / "serving", 1)  # and before it unpinned
    assert "as version 1 of models/serving" in promote(repo, env).stdout
    assert registry.pinned(repo / "models" / "serving") is None
    assert registry.versions(repo / "models" / "serving") == [1]
    assert json.loads((repo / "models" / "champion.json").read_text()) == now
    again = promote(repo, env, check=False)  # the verdict was against the champion before
    assert again.returncode == 2 and "another champion" in again.stderr
    assert "nothing to roll back to" in promote(repo, env, "rollback", check=False).stderr


def cached_champion(repo: Path, champion: dict) -> Path:
    md5 = champion["checkpoint_md5"]
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def exported_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = export.deployable(CNN([[4], [8]], 0.0), 0.13, 0.31)
    folder.mkdir(parents=True)
    export.export_onnx(model, folder / "model.onnx", 18, META)
    return folder / "model.onnx"


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
        return json.loads(response.read())


def switched(url: str, sha: str, timeout: float = 10.0) -> float:
    """Seconds until /healthz names `sha`; fails past `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if health(url)["model_sha256"] == sha:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"not serving {sha[:12]} after {timeout} s: {health(url)}")


def test_stray_entries_in_a_base_path_are_never_versions(tmp_path):
    base = tmp_path / "serving"
    model = tmp_path / "model.onnx"
    model.write_bytes(b"bytes")
    (base / "1").mkdir(parents=True)  # a number with no model in it, a file named 2, a non-ASCII digit
    (base / "2").write_text("")
    (base / "\u00b2").mkdir()
    assert registry.versions(base) == [] and registry.current(base) is None
    assert registry.publish(base, {"model.onnx": model}) == 3  # past whatever holds 1 and 2
    with pytest.raises(registry.RegistryError, match="changed while it was published"):
        registry.publish(base, {"model.onnx": model}, expected_sha256="0" * 64)
    assert registry.versions(base) == [3]
    (base / "pin").write_bytes("\u00b2".encode())
    with pytest.raises(registry.RegistryError, match="expected a version number"):
        registry.current(base)


def test_a_running_server_follows_promotions_and_rollbacks_and_never_serves_a_bad_file(tmp_path):
    base = tmp_path / "serving"
    models = [exported_model(tmp_path / f"m{i}", seed=i) for i in range(2)]
    shas = [sha256_file(m) for m in models]
    registry.publish(base, {"model.onnx": models[0]})
    with served(base) as (proc, url):
        assert health(url)["model_sha256"] == shas[0] and health(url)["version"] == 1
        (base / ".tmp-version-abc").mkdir()
        (base / ".tmp-version-abc" / "model.onnx").write_bytes(b"half a file")  # a promotion being written
        assert registry.publish(base, {"model.onnx": models[1]}) == 2
        assert switched(url, shas[1]) < 10
        digit = np.zeros((28, 28), np.uint8)
        digit[4:24, 12:16] = 255  # a 1
        body, ctype = _form(digit)
        request = urllib.request.Request(url + "/predict", body, {"Content-Type": ctype})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read())["model_sha256"] == shas[1]
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not an onnx model")
        assert registry.publish(base, {"model.onnx": broken}) == 3
        time.sleep(3)
        assert health(url)["model_sha256"] == shas[1] and health(url)["version"] == 2
        out = run([str(BIN / "mnist-promote"), "rollback", "--to", str(base)], tmp_path, {}).stdout
        assert "serving version 2" in out  # the version before 3, the newest
        run([str(BIN / "mnist-promote"), "pin", "1", "--to", str(base)], tmp_path, {})
        assert switched(url, shas[0]) < 10 and health(url)["version"] == 1
        run([str(BIN / "mnist-promote"), "unpin", "--to", str(base)], tmp_path, {})
        time.sleep(2.5)
        assert health(url)["version"] == 1  # the newest, 3, does not load: never served


def _form(digit: np.ndarray) -> tuple[bytes, str]:
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(digit).save(png, "PNG")
    boundary = "xyzzy"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_the_gate_is_a_stage_that_never_depends_on_the_test_split():
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["gate"]
    assert not any("test" in Path(d).name for d in stage["deps"])
    assert "metrics/gate.json" in json.dumps(stage["metrics"])
