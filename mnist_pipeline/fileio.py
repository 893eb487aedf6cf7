"""Atomic file writes and hashing: every output of the pipeline goes through here.

A stage killed half-way must never leave a half-written file that DVC (or the
next stage) mistakes for a finished one, so each write goes to a temporary file
in the destination folder and is renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# `.{stem}.{8 random characters}.tmp{suffix}`: the names atomic_path gives its temporary files.
_TEMP_NAME = re.compile(r"^\..*\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")


def is_temp_name(name: str) -> bool:
    return bool(_TEMP_NAME.match(name))


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files a killed writer left in `folder`; return what was removed.

    A SIGKILL between writing a temp file and renaming it leaves it behind, and in a
    folder DVC tracks (a `persist` output) it would become part of the data."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if p.is_file() and is_temp_name(p.name)] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    # The rename is only durable once the directory entry is on disk (power cuts).
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    The temporary name keeps the destination's suffix so that writers choosing a
    format from the extension (matplotlib, torch.onnx) behave as for the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates owner-only files; give outputs the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_path(folder: str | os.PathLike[str], name: str) -> Iterator[Path]:
    """Yield a temporary path in `folder` (named like atomic_path's, so remove_stale_temps
    finds it after a kill) that is always deleted afterwards."""
    stem, dot, suffix = name.rpartition(".")
    fd, tmp_name = tempfile.mkstemp(
        dir=folder, prefix=f".{stem or suffix}.", suffix=f".tmp{dot}{suffix if stem else ''}"
    )
    os.close(fd)
    try:
        yield Path(tmp_name)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON; key order is kept so the bytes are reproducible."""
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """torch.save, atomically and byte-reproducibly.

    torch.save names the zip's root folder after the file it writes to, so saving
    straight to a randomly named temp file would give different bytes every run;
    an in-memory buffer always gets the same name.
    """
    import torch  # only the stages that write tensors pay for importing it

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
