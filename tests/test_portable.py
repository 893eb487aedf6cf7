"""The same bytes on every x86-64 CPU (mnist_pipeline/kernels.py, docs/reproducibility.md).

The real stage code (tests/portable_probe.py: preprocess, curate with users' corrections, the CNN
teacher, the MLP distilled from it, the CNN trained, evaluated and exported) runs natively with the
default threads, with 1 and with 3, and every output must have the same SHA-256. Under `qemu-x86_64`,
on an emulated AMD EPYC-Rome and an emulated Intel Haswell (both AVX2, no AVX-512), the probe's
`--steps` runs where a CPU's kernels show (preprocess, curate, two steps of each model's training
loop, validation with test-time views, the temperature fit), and must match the same run here. With
`MNIST_KERNELS=native` the emulated CPU must give other weights: that is what the pins are for, and it
shows this test can see a difference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import TINY, synthetic_digits, write_mirror
from mnist_pipeline import kernels
from mnist_pipeline.feedback import snapshot
from mnist_pipeline.feedback.records import correction
from mnist_pipeline.feedback.store import Store

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "portable_probe.py"
QEMU = shutil.which("qemu-x86_64")
CPUS = ("EPYC-Rome-v2", "Haswell")  # AMD Zen 2 and Intel, both AVX2; this machine may have AVX-512


def merged(base: dict, extra: dict) -> dict:
    return {k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            for k, v in {**base, **extra}.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("portable")
    write_mirror(folder / "raw", n_train=600, n_test=100, compressed=False)
    # Users' corrections, snapshotted once here (their ids are random): every run curates the same shards.
    store = Store(folder / "store", 1 << 22)
    images, labels = synthetic_digits(40, seed=5)
    store.append([correction((image / 255).astype(np.float32), label, np.full(10, 0.1, np.float32), "m",
                             store.submitter("name", f"writer{i % 8}"), "cli")
                  for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist(), strict=True))])
    snapshot.take(store, folder / "feedback")
    store.close()
    one_epoch = {"mlp": {"train": {"epochs": 1, "distill": {"teacher": "cnn"}}}, "cnn": {"train": {"epochs": 1}}}
    params = merged(merged(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), one_epoch)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def start(inputs: Path, name: str, cpu: str | None = None, steps: bool = False,
          **env: str) -> tuple[subprocess.Popen, Path]:
    work = inputs.parent / f"{inputs.name}-{name}"
    shutil.copytree(inputs, work)
    prefix = [QEMU, "-cpu", cpu] if cpu else []
    inherited = kernels.child_env(env.pop(kernels.ENV, kernels.PORTABLE))
    mode = ["--steps"] if steps else []
    proc = subprocess.Popen([*prefix, sys.executable, str(PROBE), str(work), *mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=work,
                            env={**inherited, "PYTHONPATH": str(ROOT), **env})
    return proc, work


def finish(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, "\n".join(line for line in err.splitlines() if "TCG doesn't support" not in line)[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def differing(a: dict, b: dict) -> list[str]:
    assert a["sha256"].keys() == b["sha256"].keys()
    return sorted(k for k in a["sha256"] if a["sha256"][k] != b["sha256"][k])


def qemu_major() -> int:
    found = re.search(r"version (\d+)", subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout)
    return int(found.group(1)) if found else 0


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="needs qemu-user (.ci/run installs it)")
def test_same_bytes_on_other_cpus_and_thread_counts(inputs):
    # qemu 7.2 (Debian 12's own) crashes on AVX2 gathers, which grid_sample's kernel uses; 8+ runs them.
    assert qemu_major() >= 8, "qemu-user 7 cannot run AVX2 gathers: install qemu-user from bookworm-backports"
    emulated = {cpu: start(inputs, cpu, cpu, steps=True) for cpu in CPUS}
    control = start(inputs, "haswell-native", "Haswell", steps=True, MNIST_KERNELS="native")
    here = finish(start(inputs, "here")[0])
    assert here["kernels"] == f"portable kernels: {kernels.CAPABILITY}, {kernels.THREADS} threads"
    assert {"out/mlp/checkpoint.pt", "out/cnn/export/model.onnx", "out/teacher/logits.pt"} <= here["sha256"].keys()
    for threads in ("1", "3"):
        other = finish(start(inputs, f"threads-{threads}", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)[0])
        assert differing(here, other) == [], f"OMP_NUM_THREADS={threads}"
    steps_here = finish(start(inputs, "here-steps", steps=True)[0])
    shared = steps_here["sha256"].keys() & here["sha256"].keys()  # preprocess's and curate's outputs
    assert "data/train.pt" in shared and all(steps_here["sha256"][k] == here["sha256"][k] for k in shared)
    native_here = finish(start(inputs, "here-native", steps=True, MNIST_KERNELS="native")[0])
    for cpu, (proc, _) in emulated.items():
        assert differing(steps_here, finish(proc)) == [], cpu
    # Without the pins, the emulated Intel CPU trains other weights: the test sees what the pins fix.
    changed = differing(native_here, finish(control[0]))
    assert "mlp/weights" in changed and "cnn/weights" in changed, changed


def test_kernels_mode_is_checked():
    assert kernels.mode({}) == kernels.PORTABLE and kernels.mode({"MNIST_KERNELS": "Native "}) == kernels.NATIVE
    with pytest.raises(kernels.KernelsError, match="MNIST_KERNELS='fast': expected portable"):
        kernels.mode({"MNIST_KERNELS": "fast"})


def test_pin_sets_every_variable_and_native_none():
    env = {"MKL_CBWR": "AVX512", "ATEN_CPU_CAPABILITY": "avx512"}  # the user's shell does not decide
    assert kernels.pin(env) == kernels.PORTABLE and env == kernels.PINS
    native = {"MNIST_KERNELS": "native", "MKL_CBWR": "AVX512"}
    assert kernels.pin(native) == kernels.NATIVE and native == {"MNIST_KERNELS": "native", "MKL_CBWR": "AVX512"}


def test_torch_imported_first_is_refused():
    # A fresh interpreter: torch imported before the pins must stop the process with one line, not run
    # unpinned kernels silently.
    env = {k: v for k, v in os.environ.items() if k not in kernels.PINS and k != kernels.ENV}
    done = subprocess.run([sys.executable, "-c", "import torch, mnist_pipeline.kernels"], capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "torch was imported before mnist_pipeline.kernels" in done.stderr
    assert "Traceback" not in done.stderr
