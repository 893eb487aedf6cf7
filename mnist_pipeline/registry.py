"""The served models: a model base path of numbered versions, as TF Serving keeps one.

    models/serving/1/model.onnx, model_card.json, gate.json
    models/serving/2/...
    models/serving/pin          (optional) the version to serve instead of the newest: a rollback

`mnist-promote` writes a version (only a blessed one) and the pin; `mnist-serve --model
models/serving` follows them. A version is published whole or not at all: it is written in a temp
folder beside the others, each file fsynced, then renamed to its number (a rename is atomic), so a
reader never sees a version being written. The folder only grows: rolling back pins an older version
and promoting again unpins. Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import atomic_path, fsync_dir, sha256_file

MODEL = "model.onnx"
PIN = "pin"


class RegistryError(PipelineError):
    pass


def is_base(path: Path) -> bool:
    """Whether `path` is a model base path (a folder), rather than one model file."""
    return path.is_dir()


NUMBER = re.compile(r"[0-9]{1,9}", re.ASCII)


def versions(base: Path) -> list[int]:
    """The published versions, oldest first: folders named by a number that hold a model."""
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if NUMBER.fullmatch(p.name) and (p / MODEL).is_file())


def pinned(base: Path) -> int | None:
    try:
        text = (base / PIN).read_bytes().decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    if not NUMBER.fullmatch(text):
        raise RegistryError(f"{base / PIN}: expected a version number, got {text[:40]!r}")
    return int(text)


def current(base: Path) -> int | None:
    """The version to serve: the pinned one if it exists, else the newest; None when there is none."""
    published = versions(base)
    pin = pinned(base)
    if pin is not None and pin in published:
        return pin
    return published[-1] if published else None


def model_path(base: Path, version: int) -> Path:
    return base / str(version) / MODEL


def resolve(path: Path) -> tuple[Path, int | None]:
    """(the model file to serve, its version): a base path's current version, or `path` itself, unversioned."""
    if not is_base(path):
        return path, None
    version = current(path)
    if version is None:
        raise RegistryError(f"{path}: no version to serve yet (`mnist-promote --to {path}` publishes one)")
    return model_path(path, version), version


def publish(base: Path, files: dict[str, Path], expected_sha256: str | None = None) -> int:
    """Copy `files` (name in the version → source; `model.onnx` among them) into a new version: its number. With
    `expected_sha256`, the copied model must have it (hashed after the copy: what is published is what was judged)."""
    if MODEL not in files:
        raise RegistryError(f"a version needs {MODEL}")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-version-", dir=base))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is owner-only: a server running as another user reads it
    try:
        for name, source in files.items():
            with source.open("rb") as src, (tmp / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        fsync_dir(tmp)
        if expected_sha256 is not None and sha256_file(tmp / MODEL) != expected_sha256:
            raise RegistryError(f"{files[MODEL]} changed while it was published: not the model judged")
        taken = [int(p.name) for p in base.iterdir() if NUMBER.fullmatch(p.name)]
        version = max([*taken, 0]) + 1
        while True:  # another promotion (or a stray folder) may hold the number: then take the one after
            try:
                os.rename(tmp, base / str(version))
                break
            except OSError:
                if not (base / str(version)).exists():
                    raise
                version += 1
        fsync_dir(base)
        return version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pin(base: Path, version: int | None) -> None:
    """Serve `version` from now on, whatever is newer; None: serve the newest again."""
    if version is None:
        (base / PIN).unlink(missing_ok=True)
        fsync_dir(base)
        return
    if version not in versions(base):
        raise RegistryError(f"{base}: no version {version} (there are {versions(base) or 'none'})")
    with atomic_path(base / PIN) as tmp:
        tmp.write_text(f"{version}\n")


def rollback(base: Path) -> int:
    """Pin the version published before the one now served: the one it pins."""
    now = current(base)
    older = [v for v in versions(base) if now is not None and v < now]
    if not older:
        raise RegistryError(f"{base}: nothing to roll back to (serving {now}, versions {versions(base) or 'none'})")
    pin(base, older[-1])
    return older[-1]
