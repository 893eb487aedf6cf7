"""Snapshots: what the live store holds, frozen into immutable shards the pipeline reads.

    data/feedback/shard-<first id>-<sha256[:12]>.rec   the new records since the last snapshot, as frames
    data/feedback/shard-….rec.dvc                       its DVC file (git); the shard itself goes to the cache

One shard per snapshot, one `.dvc` file per shard: `dvc push` uploads only the shards the
remote lacks. A shard holds the records no earlier shard has, sorted by id, so the same store
and the same shards give the same bytes. A snapshot with nothing new writes nothing. The
pipeline (the curate stage) reads only shards, never the live store: `dvc.lock` names what
trained a model.

A snapshot reads only what is new: the store keeps a mark (STORE/snapshot.json: how far into
each segment the snapshots have read, and the shards there were then), so the next one reads
each segment from there. When the folder's shards are not the mark's (another checkout, a
reset folder, a crash between writing a shard and its mark) it reads everything and compares
ids, as the first snapshot does. `retire` then
removes the segments every record of which a shard holds and no writer has open, so the
store's size bound is about live records, not all that ever came in.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.feedback.store import ReadResult, Record, encode, read_files, read_store, scan, segments
from mnist_pipeline.fileio import write_bytes, write_json

DEFAULT_SNAPSHOTS = Path("data/feedback")
PATTERN = "shard-*.rec"
LOCK = ".snapshot.lock"  # in the live store (ignored by git and DVC): a file in data/feedback would change its hash
MARK = "snapshot.json"  # in the live store: {"shards": [names], "total": records in them, "read": {segment: end}}


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


def _mark(store: Path, folder: Path) -> dict | None:
    """The last snapshot's mark, if `folder` holds exactly the shards it names (else it describes another)."""
    try:
        mark = json.loads((store / MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and mark.get("shards") == [p.name for p in shards(folder)] else None


def _new_since(store: Path, read: dict[str, int], seen: set[str]) -> tuple[list[Record], dict[str, int]]:
    """The records past `read` (segment → bytes already read; a segment it does not name is new) whose
    ids are not in `seen`, and where each segment's whole frames end: both from the same bytes, so a
    record a writer appends meanwhile is either among them or past the new mark, never lost between."""
    new: list[Record] = []
    ends: dict[str, int] = {}
    for path in segments(store):
        start = read.get(path.name, 0)
        with path.open("rb") as handle:
            handle.seek(start)
            found = scan(handle.read(), path.name)
        new += [r for r in found.records if r.id not in seen]
        ends[path.name] = start + found.end
    return sorted(new, key=lambda r: r.id), ends


def take(store: Path, folder: Path) -> Snapshot:
    """Write the new records as one shard (atomically); nothing when there are none."""
    absent = missing_shards(folder)
    if absent:  # without them every record they hold would look new and be snapshotted again
        raise PipelineError(
            f"{folder}: {len(absent)} shard(s) named by .dvc files are missing ({absent[0]}, …): run `dvc pull "
            f"{folder}` first"
        )
    with _locked(store):
        mark = _mark(store, folder)
        if mark is not None:
            new, ends = _new_since(store, mark["read"], set())
            total = int(mark["total"])
        else:  # the first snapshot into this folder: every segment read, every id compared
            held = {r.id for r in read_shards(folder).records}
            new, ends = _new_since(store, {}, held)
            total = len(held)
        path = None
        if new:
            data = b"".join(encode(r) for r in new)
            path = folder / f"shard-{new[0].id}-{hashlib.sha256(data).hexdigest()[:12]}.rec"
            write_bytes(path, data)
        # After the shard: a crash between the two leaves a mark whose shards differ, and a full read next time.
        write_json(store / MARK, {"shards": [p.name for p in shards(folder)], "total": total + len(new), "read": ends})
        return Snapshot(path, len(new), total + len(new))


@dataclass(frozen=True)
class Retired:
    removed: list[str]  # segments removed
    bytes: int  # their size
    kept: int  # segments kept: open by a writer, or holding records no shard has


def retire(store: Path, folder: Path) -> Retired:
    """Remove the segments whose every record a snapshot in `folder` holds and that no writer has open."""
    with _locked(store):
        mark = _mark(store, folder)
        if mark is None:
            raise PipelineError(f"{store}: no snapshot into {folder} to retire against: run `mnist-feedback snapshot`")
        removed, size, kept = [], 0, 0
        for path in segments(store):
            captured = mark["read"].get(path.name)
            with path.open("rb") as handle:
                try:  # a writer holds its segment's lock from before its first byte until it ends
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    kept += 1
                    continue
                handle.seek(captured or 0)
                rest = scan(handle.read(), path.name)
                length = os.fstat(handle.fileno()).st_size
                # Past the mark: nothing, or a torn tail its writer never acknowledged.
                if captured is None or length == 0 or rest.records or rest.skipped:
                    kept += 1
                    continue
                path.unlink()
                removed.append(path.name)
                size += length
        return Retired(removed, size, kept)


def track(path: Path) -> None:
    """`dvc add` the shard: its .dvc file for git, its bytes to the cache (and later the remote)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "add", "--quiet", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise PipelineError(f"dvc add {path} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
