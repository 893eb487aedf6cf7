"""Tiny generated MNIST-format datasets, so tests never touch the network."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from mnist_pipeline.datasets import DATASETS

SPEC = DATASETS["mnist"]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """Serialise a uint8 tensor as an IDX payload (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, tensor.ndim]) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    return header + tensor.to(torch.uint8).contiguous().numpy().tobytes()


# One fixed 7×7 binary glyph per class, shared by every generated dataset.
GLYPHS = torch.rand(10, 7, 7, generator=torch.Generator().manual_seed(1234)) > 0.5


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: the class's glyph drawn 14×14 at a jittered position, on noise,
    in a class-specific brightness (a cue even a two-layer, globally pooled CNN learns in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.int32)
    offsets = torch.randint(4, 11, (n, 2), generator=g)
    for i, y in enumerate(labels.tolist()):
        glyph = GLYPHS[y].repeat_interleave(2, 0).repeat_interleave(2, 1)
        r, c = offsets[i].tolist()
        images[i, r : r + 14, c : c + 14][glyph] = 93 + 18 * y
    return images.to(torch.uint8), labels.to(torch.uint8)


def write_mirror(folder: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Write the four .gz files of a tiny dataset into `folder`; return a MNIST_CHECKSUMS json ({"mnist": pins})."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_digits(n_train, seed)
    test_x, test_y = synthetic_digits(n_test, seed + 1)
    pins = {}
    for spec, tensor in ((SPEC.train_images, train_x), (SPEC.train_labels, train_y),
                         (SPEC.test_images, test_x), (SPEC.test_labels, test_y)):
        payload = idx_bytes(tensor)
        (folder / spec.name).write_bytes(gzip.compress(payload, mtime=0))
        pins[spec.name] = hashlib.sha256(payload).hexdigest()
    checksums = folder.parent / f"{folder.name}-checksums.json"
    checksums.write_text(json.dumps({"mnist": pins}))
    return checksums


# ---------------------------------------------------------------- a git copy of the repository for dvc runs


def output_roots() -> set[str]:
    """Top-level folders of the pipeline's outputs, as dvc.yaml declares them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])]
    return {o.split("/")[0] for o in outs}


def copy_repo(dest: Path) -> None:
    """Source files as a fresh clone would have them (plus uncommitted edits), no pipeline outputs."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    skip = output_roots()
    for name in filter(None, listed):
        src = ROOT / name
        if name.split("/")[0] in skip and not name.endswith(".gitignore"):
            continue
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(args: list[str], repo: Path, env: dict[str, str], check: bool = True, timeout: float = 600):
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def git_repo_env(repo: Path, **extra: str) -> dict[str, str]:
    """Copy the repository into `repo`, commit it, and return the environment for dvc runs there."""
    copy_repo(repo)
    env = {**os.environ, **extra, "PYTHONPATH": str(repo), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(args, repo, env)
    return env
