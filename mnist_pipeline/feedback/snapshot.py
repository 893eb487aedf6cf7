"""Snapshots: what the live store holds, frozen into immutable shards the pipeline reads.

    data/feedback/shard-<first id>-<sha256[:12]>.rec   the new records since the last snapshot, as frames
    data/feedback/shard-….rec.dvc                       its DVC file (git); the shard itself goes to the cache

One shard per snapshot, one `.dvc` file per shard: `dvc push` uploads only the shards the
remote lacks, so a snapshot's cost grows with what is new, never with the whole set. A
shard holds the records no earlier shard has, sorted by id, so the same store and the same
shards give the same bytes. A snapshot with nothing new writes nothing. The pipeline (the
curate stage) reads only shards, never the live store: `dvc.lock` names what trained a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.feedback.store import ReadResult, Record, encode, read_files, read_store
from mnist_pipeline.fileio import write_bytes

DEFAULT_SNAPSHOTS = Path("data/feedback")
PATTERN = "shard-*.rec"
LOCK = ".snapshot.lock"  # in the live store (ignored by git and DVC): a file in data/feedback would change its hash


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob(PATTERN)) if folder.is_dir() else []


def read_shards(folder: Path) -> ReadResult:
    """Every record of every shard, in id order; a damaged shard is an error, not a torn tail."""
    result = read_files(shards(folder))
    if result.torn:
        raise PipelineError(f"{folder}: damaged shard: {result.torn[0]} (run `dvc checkout {folder}`)")
    result.records.sort(key=lambda r: r.id)
    return result


@dataclass(frozen=True)
class Snapshot:
    path: Path | None  # the new shard, None when there was nothing new
    new: int  # records in it
    total: int  # records in all shards after it


def pending(store: Path, folder: Path) -> tuple[list[Record], ReadResult]:
    """The store's records that no shard holds yet, and what reading the store found."""
    seen = {r.id for r in read_shards(folder).records}
    live = read_store(store)
    return [r for r in live.records if r.id not in seen], live


def missing_shards(folder: Path) -> list[str]:
    """Shards a `.rec.dvc` file names whose bytes are not here (a clone that has not run `dvc pull`)."""
    return sorted(p.name.removesuffix(".dvc") for p in folder.glob(PATTERN + ".dvc") if not p.with_suffix("").exists())


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    """One snapshot of a store at a time: two at once would each write the same new records."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"{store}: another `mnist-feedback snapshot` is running; try when it ends") from None
        yield


def take(store: Path, folder: Path) -> Snapshot:
    """Write the new records as one shard (atomically); nothing when there are none."""
    absent = missing_shards(folder)
    if absent:  # without them every record they hold would look new and be snapshotted again
        raise PipelineError(
            f"{folder}: {len(absent)} shard(s) named by .dvc files are missing ({absent[0]}, …): run `dvc pull "
            f"{folder}` first"
        )
    with _locked(store):
        new, _ = pending(store, folder)
        total = len(read_shards(folder).records)
        if not new:
            return Snapshot(None, 0, total)
        data = b"".join(encode(r) for r in new)
        path = folder / f"shard-{new[0].id}-{hashlib.sha256(data).hexdigest()[:12]}.rec"
        write_bytes(path, data)
        return Snapshot(path, len(new), total + len(new))


def track(path: Path) -> None:
    """`dvc add` the shard: its .dvc file for git, its bytes to the cache (and later the remote)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "add", "--quiet", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise PipelineError(f"dvc add {path} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
