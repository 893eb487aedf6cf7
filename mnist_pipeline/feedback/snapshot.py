"""Snapshots: what the live store holds, frozen into immutable shards the pipeline reads; and retire.

    data/feedback/shard-<first id>-<sha256[:12]>.rec   the records of one snapshot, as frames (records.py)
    data/feedback/shard-….rec.dvc                       its DVC file (git); the shard itself goes to the cache

The mark is in the database: a `snapshots` row per snapshot, and each record names the snapshot
that took it. A snapshot is three steps:
1. claim (one transaction): a new row, and every record no snapshot has taken yet is given to it.
   Two snapshots can never take the same record: the claim is one UPDATE of rows nobody has claimed.
2. write the shard: its bytes follow from its records alone (sorted by id), so writing it again
   gives the same file under the same name.
3. mark it written (one transaction), with its name, SHA-256 and DVC's MD5.
A crash between 1 and 3 leaves a claimed row; the next `take` (in any checkout) writes that shard
before it claims anything new: nothing repeated, nothing lost.

`retire` deletes from the store only the records of snapshots whose shard DVC tracks here: its
`.dvc` file exists and names the shard's MD5, and where a DVC remote is configured, the remote has
it. It says what it kept and why.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.feedback.records import encode, shards
from mnist_pipeline.feedback.store import COLUMNS, COUNT, Store, failure, record_of
from mnist_pipeline.fileio import write_bytes


@dataclass(frozen=True)
class Snapshot:
    paths: list[Path]  # the shards written: the new one, after any a crashed snapshot left unwritten
    new: int  # records in them
    total: int  # records every snapshot of the store has taken


def _write(store: Store, folder: Path, snapshot: int) -> tuple[Path, int]:
    """Write claimed snapshot `snapshot`'s shard into `folder`, then mark it written."""
    with store.read() as conn:
        found = conn.execute(
            text(f"SELECT {', '.join(COLUMNS)} FROM records WHERE snapshot = :s ORDER BY id"), {"s": snapshot}
        )
        records = [record_of(r) for r in found]
    data = b"".join(encode(r) for r in records)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shard-{records[0].id}-{hashlib.sha256(data).hexdigest()[:12]}.rec"
    write_bytes(path, data)
    with store.writing() as conn:
        conn.execute(
            text(
                "UPDATE snapshots SET state = 'written', shard = :shard, sha256 = :sha, md5 = :md5 "
                "WHERE id = :s AND state = 'claimed'"
            ),
            {
                "s": snapshot,
                "shard": path.name,
                "sha": hashlib.sha256(data).hexdigest(),
                "md5": hashlib.md5(data).hexdigest(),
            },
        )
    return path, len(records)


def take(store: Store, folder: Path) -> Snapshot:
    """Write what is new as one shard (and any shard a crashed snapshot left unwritten); nothing when
    nothing is new."""
    try:
        with store.writing() as conn:
            pending = [r[0] for r in conn.execute(text("SELECT id FROM snapshots WHERE state = 'claimed' ORDER BY id"))]
            sid = conn.execute(
                text("INSERT INTO snapshots (time, state, records) VALUES (:t, 'claimed', 0) RETURNING id"),
                {"t": round(time.time(), 3)},
            ).scalar_one()
            claimed = conn.execute(text("UPDATE records SET snapshot = :s WHERE snapshot IS NULL"), {"s": sid}).rowcount
            if claimed:
                conn.execute(text("UPDATE snapshots SET records = :n WHERE id = :s"), {"n": claimed, "s": sid})
                pending.append(sid)
            else:
                conn.execute(text("DELETE FROM snapshots WHERE id = :s"), {"s": sid})
        written = [_write(store, folder, snapshot) for snapshot in pending]
        with store.read() as conn:
            total = conn.execute(text("SELECT coalesce(sum(records), 0) FROM snapshots")).scalar_one()
    except SQLAlchemyError as exc:
        raise failure(exc, store.where) from None
    return Snapshot([path for path, _ in written], sum(n for _, n in written), int(total))


@dataclass(frozen=True)
class Retired:
    removed: int  # records deleted from the store
    shards: list[str]  # the shards they are in
    kept: list[str]  # "<shard>: why its records stay in the store"


def tracked_md5(dvc_file: Path) -> str | None:
    """The MD5 a shard's .dvc file names, if it tracks it the plain way: an output kept off the default remote
    (`remote:`, `push: false`) would look pushed to `dvc status --cloud`, so it is not taken for tracked."""
    try:
        outs = yaml.safe_load(dvc_file.read_text()).get("outs", [])
        plain = len(outs) == 1 and not {"remote", "push"} & set(outs[0])
        return str(outs[0]["md5"]) if plain else None
    except (OSError, yaml.YAMLError, AttributeError, KeyError, IndexError, TypeError):
        return None


def repo_of(folder: Path) -> Path | None:
    """The DVC repository that holds `folder`, as DVC finds its root."""
    return next((d for d in [folder.resolve(), *folder.resolve().parents] if (d / ".dvc").is_dir()), None)


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dvc(args: list[str], repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)


def not_on_remote(paths: list[Path], repo: Path) -> set[str] | None:
    """The shards among `paths` (tracked) that the default DVC remote of `repo` lacks; None when `repo` has no
    remote at all. Any doubt (remotes but no default, a failing `dvc`) is an error: retire then deletes nothing."""
    if not paths:
        return set()
    listed = dvc(["remote", "list"], repo)
    if listed.returncode != 0:
        raise PipelineError(f"dvc remote list failed in {repo}: {(listed.stderr or listed.stdout).strip()[-300:]}")
    if not listed.stdout.strip():
        return None
    default = dvc(["remote", "default"], repo)
    if default.returncode != 0 or not default.stdout.strip():
        raise PipelineError(
            f"{repo} has DVC remotes but no default: say which must hold the shards (`dvc remote default NAME`)"
        )
    done = dvc(["status", "--cloud", "--json", *(str(p.parent.resolve() / f"{p.name}.dvc") for p in paths)], repo)
    if done.returncode != 0:
        raise PipelineError(f"dvc status --cloud failed: {(done.stderr or done.stdout).strip()[-300:]}")
    status = json.loads(done.stdout or "{}")
    return {Path(name).name for name in status}  # in sync: not listed


def retire(store: Store, folder: Path) -> Retired:
    """Delete the records of every written snapshot whose shard DVC tracks in `folder` (and, with a remote
    configured, has pushed); keep the rest, each with its reason."""
    try:
        with store.read() as conn:
            rows = conn.execute(
                text("SELECT id, state, shard, md5 FROM snapshots WHERE state != 'retired' ORDER BY id")
            ).all()
        kept, candidates = [], []
        for sid, state, shard, md5 in rows:
            if state == "claimed":
                kept.append(f"snapshot {sid}: claimed but its shard is not written yet: run `mnist-feedback snapshot`")
                continue
            named = tracked_md5(folder / f"{shard}.dvc")
            if named is None:
                kept.append(
                    f"{shard}: no .dvc file for it in {folder} (`dvc add` it, or pull the checkout that did), "
                    "or one that keeps it off the default remote"
                )
            elif named != md5:
                kept.append(f"{shard}: its .dvc file names {named}, not the shard's {md5}")
            elif not (folder / shard).is_file() or file_md5(folder / shard) != md5:
                kept.append(f"{shard}: its bytes are not here to check (`dvc checkout` or `dvc pull` it)")
            else:
                candidates.append((sid, shard))
        repo = repo_of(folder)
        if repo is None:
            kept += [f"{shard}: {folder} is in no DVC repository" for _, shard in candidates]
            candidates = []
        missing = not_on_remote([folder / shard for _, shard in candidates], repo) if repo else set()
        removed, done = 0, []
        for sid, shard in candidates:
            if missing is not None and shard in missing:
                kept.append(f"{shard}: not on the DVC remote yet (`dvc push`)")
                continue
            with store.writing() as conn:
                freed = conn.execute(
                    text("SELECT coalesce(sum(bytes), 0) FROM records WHERE snapshot = :s"), {"s": sid}
                ).scalar_one()
                removed += conn.execute(text("DELETE FROM records WHERE snapshot = :s"), {"s": sid}).rowcount
                conn.execute(text("UPDATE snapshots SET state = 'retired' WHERE id = :s"), {"s": sid})
                conn.execute(COUNT, {"writer": "retired", "bytes": -int(freed)})
            done.append(shard)
    except SQLAlchemyError as exc:
        raise failure(exc, store.where) from None
    return Retired(removed, done, kept)


def untracked(folder: Path) -> list[Path]:
    """The shards in `folder` without a .dvc file: written by this snapshot, or left by one whose `dvc add`
    failed or that ran with --no-dvc."""
    return [p for p in shards(folder) if not p.with_name(p.name + ".dvc").exists()]


def track(path: Path) -> None:
    """`dvc add` the shard, in the repository that holds it: its .dvc file for git, its bytes to the cache (and
    later the remote)."""
    repo = repo_of(path.parent)
    if repo is None:
        raise PipelineError(f"{path.parent} is in no DVC repository: `dvc init` there, or snapshot with --no-dvc")
    done = dvc(["add", "--quiet", str(path.resolve())], repo)
    if done.returncode != 0:
        raise PipelineError(f"dvc add {path} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
