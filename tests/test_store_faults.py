"""The live feedback store under faults: each one injected, every acknowledged record still readable and
the store accepting records again (mnist_pipeline/feedback/store.py, issue 30)."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.feedback import snapshot, store as store_module
from mnist_pipeline.feedback.store import (
    FRAME,
    KEPT_UPLOAD,
    U32,
    Store,
    StoreError,
    StoreFull,
    correction,
    decode,
    encode,
    pseudonym,
    read_frames,
    segments,
    read_store,
)

ROOT = Path(__file__).resolve().parents[1]
PROBS = np.full(10, 0.1, np.float32)


def record(i: int, upload: bytes = b"png"):
    made = correction(np.full((28, 28), i / 100, np.float32), i % 10, PROBS, "m", f"s{i}", "cli", upload)
    return dataclasses.replace(made, time=1.0)  # frames of one size, whatever the clock says


class Faults:
    """os.write / os.ftruncate / os.fdatasync that fail on the store's segments when armed, delegating
    otherwise (pytest's own output goes through os.write too)."""

    def __init__(self, monkeypatch):
        self.real = {name: getattr(os, name) for name in ("write", "ftruncate", "fdatasync")}
        self.write_fails = self.truncate_fails = self.sync_fails = 0
        self.partial = 0  # bytes a failing write still puts down first
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "ftruncate", self.ftruncate)
        monkeypatch.setattr(os, "fdatasync", self.fdatasync)

    @staticmethod
    def segment(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").endswith(".seg")
        except OSError:
            return False

    def write(self, fd, data):
        if self.write_fails and self.segment(fd):
            self.write_fails -= 1
            if self.partial:
                self.real["write"](fd, bytes(data[: self.partial]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real["write"](fd, data)

    def ftruncate(self, fd, length):
        if self.truncate_fails and self.segment(fd):
            self.truncate_fails -= 1
            raise OSError(errno.EIO, "Input/output error")
        return self.real["ftruncate"](fd, length)

    def fdatasync(self, fd):
        if self.sync_fails and self.segment(fd):
            self.sync_fails -= 1
            raise OSError(errno.EIO, "Input/output error")
        return self.real["fdatasync"](fd)


def assert_all_readable(root: Path, acknowledged: list[str]) -> None:
    found = {r.id for r in read_store(root).records}
    assert set(acknowledged) <= found, set(acknowledged) - found


@pytest.mark.parametrize("partial", [0, 100])
def test_a_failed_write_moves_to_a_new_segment(tmp_path, monkeypatch, partial):
    faults = Faults(monkeypatch)
    store = Store(tmp_path / "s", 1 << 20)
    acknowledged = [store.append(record(i)) for i in range(3)]
    faults.write_fails, faults.partial = 1, partial
    with pytest.raises(StoreFull, match="No space left"):
        store.append(record(3))
    acknowledged += [store.append(record(i)) for i in range(4, 7)]
    store.close()
    assert len(list((tmp_path / "s" / "segments").iterdir())) == 2
    assert_all_readable(tmp_path / "s", acknowledged)
    result = read_store(tmp_path / "s")
    assert result.torn == [] and result.skipped == []  # the truncate removed the partial frame


def test_a_failed_truncate_leaves_a_torn_tail_that_nothing_follows(tmp_path, monkeypatch):
    faults = Faults(monkeypatch)
    store = Store(tmp_path / "s", 1 << 20)
    acknowledged = [store.append(record(i)) for i in range(3)]
    faults.write_fails, faults.partial, faults.truncate_fails = 1, 100, 1
    with pytest.raises(StoreFull):
        store.append(record(3))
    acknowledged += [store.append(record(i)) for i in range(4, 7)]  # before the fix: behind the partial frame
    store.close()
    result = read_store(tmp_path / "s")
    assert_all_readable(tmp_path / "s", acknowledged)
    assert len(result.torn) == 1 and "torn frame" in result.torn[0] and result.skipped == []


def test_a_failed_sync_is_never_acknowledged_and_the_store_goes_on(tmp_path, monkeypatch):
    faults = Faults(monkeypatch)
    store = Store(tmp_path / "s", 1 << 20)
    acknowledged = [store.append(record(0))]
    faults.sync_fails = 1
    with pytest.raises(StoreFull, match="cannot sync"):
        store.append(record(1))
    failed_fd = store._retired[-1]
    with pytest.raises(StoreFull, match="an earlier sync of this segment failed"):  # no second chance on that fd
        store._sync(failed_fd, 10**9)
    acknowledged += [store.append(record(i)) for i in range(2, 5)]
    store.close()
    assert len(list((tmp_path / "s" / "segments").iterdir())) == 2
    assert_all_readable(tmp_path / "s", acknowledged)


def test_a_full_disk_then_space_again(tmp_path, monkeypatch):
    store = Store(tmp_path / "s", 1 << 20, min_free=0)
    acknowledged = [store.append(record(0))]
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=0))
    with pytest.raises(StoreFull, match="less than"):
        store.append(record(1))
    monkeypatch.undo()
    acknowledged.append(store.append(record(2)))
    store.close()
    assert_all_readable(tmp_path / "s", acknowledged)


def test_mid_file_damage_is_skipped_exactly_and_the_rest_is_read(tmp_path):
    frames = [encode(record(i)) for i in range(5)]
    offsets = np.cumsum([0] + [len(f) for f in frames]).tolist()
    data = bytearray(b"".join(frames))
    data[offsets[1] + FRAME.size + 40] ^= 0xFF  # a flipped bit in record 1's payload
    data[offsets[3] + 5] ^= 0x01  # a damaged length field in record 3's header
    records, torn, skipped = read_frames(bytes(data), "seg")
    assert [r.label for r in records] == [0, 2, 4] and torn is None
    assert skipped == [f"seg: {len(frames[1])} bytes at offset {offsets[1]} (checksum mismatch)",
                       f"seg: {len(frames[3])} bytes at offset {offsets[3]} (damaged frame header)"]
    # A partial frame in the middle (what a failed truncate left before writers moved to a new segment).
    records, torn, skipped = read_frames(frames[0] + frames[1][:30] + frames[2], "seg")
    assert [r.label for r in records] == [0, 2] and skipped == [f"seg: 30 bytes at offset {len(frames[0])} (checksum "
                                                                "mismatch)"]


def test_a_store_with_records_refuses_a_new_salt(tmp_path):
    store = Store(tmp_path / "s", 1 << 20)
    store.append(record(0))
    store.close()
    assert stat.S_IMODE((tmp_path / "s" / "salt").stat().st_mode) == 0o600
    (tmp_path / "s" / "salt").unlink()
    with pytest.raises(StoreError, match="salt is missing but the store holds records"):
        Store(tmp_path / "s", 1 << 20)


def test_the_pseudonym_is_keyed_by_the_salt():
    plain = "s" + hashlib.sha256(b"ip:203.0.113.7").hexdigest()[:15]
    a, b = pseudonym(b"a" * 32, "ip", "203.0.113.7"), pseudonym(b"b" * 32, "ip", "203.0.113.7")
    assert a != plain and b != plain and a != b and a == pseudonym(b"a" * 32, "ip", "203.0.113.7")


def test_unknown_fields_are_ignored_and_uploads_are_bounded():
    frame = encode(record(3))
    size = U32.unpack_from(frame, FRAME.size)[0]
    header = json.loads(frame[FRAME.size + 4 : FRAME.size + 4 + size])
    assert header["v"] == store_module.FORMAT_VERSION
    newer = json.dumps({**header, "v": 99, "writer": "a future version"}).encode()
    payload = U32.pack(len(newer)) + newer + frame[FRAME.size + 4 + size :]
    assert decode(payload).label == 3
    big = record(1, upload=b"\x89PNG" + b"x" * (KEPT_UPLOAD + 1))
    assert big.upload == b"" and big.upload_size == KEPT_UPLOAD + 5 and len(encode(big)) < 8 << 10


def test_snapshots_are_one_at_a_time_and_refuse_missing_shards(tmp_path):
    store = Store(tmp_path / "s", 1 << 20)
    store.append(record(0))
    store.close()
    folder = tmp_path / "shards"
    with open(tmp_path / "s" / snapshot.LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PipelineError, match="another `mnist-feedback snapshot` is running"):
            snapshot.take(tmp_path / "s", folder)
    taken = snapshot.take(tmp_path / "s", folder)
    assert taken.new == 1 and taken.path is not None
    (folder / (taken.path.name + ".dvc")).write_text("outs: []\n")
    taken.path.unlink()  # a clone with the .dvc file that has not pulled the shard
    with pytest.raises(PipelineError, match="run `dvc pull"):
        snapshot.take(tmp_path / "s", folder)


def test_concurrent_appends_share_syncs_and_lose_nothing(tmp_path):
    store = Store(tmp_path / "s", 1 << 22)
    ids: list[str] = []

    def writer(k: int) -> None:
        ids.extend(store.append(record(k * 100 + i)) for i in range(25))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fd = store._fd
    assert store._synced[fd] == store._written[fd] == os.fstat(fd).st_size  # the mark covers whole frames only
    store.close()
    assert_all_readable(tmp_path / "s", ids)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)")
def test_a_record_is_fdatasynced_before_it_is_acknowledged(tmp_path):
    """At the syscall: the segment's fdatasync comes before the acknowledgement (here: the id printed)."""
    script = ("import sys, numpy as np; from mnist_pipeline.feedback.store import Store, correction; "
              "s = Store(sys.argv[1], 1 << 20); "
              "r = s.append(correction(np.zeros((28, 28), np.float32), 1, np.full(10, 0.1), 'm', 's', 'cli')); "
              "sys.stdout.write('ACK ' + r + '\\n'); sys.stdout.flush()")
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-e", "trace=fdatasync,fsync,write", "-e", "signal=none", "-o", str(trace),
                    sys.executable, "-c", script, str(tmp_path / "s")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    calls = trace.read_text().splitlines()
    ack = next(i for i, line in enumerate(calls) if "write(1" in line and "ACK" in line)
    frame = next(i for i, line in enumerate(calls) if "write(" in line and "MFB2" in line)
    syncs = [i for i, line in enumerate(calls) if "fdatasync(" in line and " = 0" in line]
    assert any(frame < i < ack for i in syncs), "\n".join(calls[frame:ack + 1])
    assert any("fsync(" in line for line in calls[:frame])  # the salt and the segment's folder, before any record


def test_a_snapshot_reads_only_what_is_new(tmp_path, monkeypatch):
    store, folder = Store(tmp_path / "s", 1 << 30), tmp_path / "shards"
    folder.mkdir()
    for i in range(20):
        store.append(record(i))
    first = snapshot.take(tmp_path / "s", folder)
    before = sum(p.stat().st_size for p in segments(tmp_path / "s"))
    for i in range(20, 23):
        store.append(record(i))
    new_bytes = sum(p.stat().st_size for p in segments(tmp_path / "s")) - before
    seen: list[int] = []
    real = store_module.scan
    monkeypatch.setattr(snapshot, "scan", lambda data, name, offset=0: seen.append(len(data)) or real(data, name))
    second = snapshot.take(tmp_path / "s", folder)
    assert (first.new, second.new, second.total) == (20, 3, 23)
    assert sum(seen) == new_bytes  # the three new frames, nothing else
    assert [r.id for r in snapshot.read_shards(folder).records] == sorted(r.id for r in read_store(tmp_path / "s").records)
    # A folder whose shards are not the mark's (a crash after the shard, another checkout): everything compared.
    first.path.unlink()
    third = snapshot.take(tmp_path / "s", folder)
    assert third.new == 20 and third.total == 23 and sum(seen) > 2 * new_bytes
    store.close()


def test_retire_removes_what_snapshots_hold_and_no_writer_has_open(tmp_path):
    root, folder = tmp_path / "s", tmp_path / "shards"
    folder.mkdir()
    with pytest.raises(PipelineError, match="no snapshot"):
        snapshot.retire(root, folder)
    size = len(encode(record(0)))
    closed = Store(root, 6 * size)
    for i in range(6):
        closed.append(record(i))
    closed.close()
    live = Store(root, 6 * size)
    with pytest.raises(StoreFull):  # the bound counts every segment
        live.append(record(6))
    snapshot.take(root, folder)
    # A killed writer: its segment ends in a torn frame it never acknowledged, and no one holds its lock.
    (root / "segments" / "killed.seg").write_bytes(encode(record(7))[:40])
    snapshot.take(root, folder)
    done = snapshot.retire(root, folder)
    assert len(done.removed) == 2 and done.bytes == 6 * size + 40 and done.kept == 0
    assert live.append(record(8))  # room again: the bound is about live records
    kept = snapshot.retire(root, folder)
    assert kept.removed == [] and kept.kept == 1  # the live writer's segment: locked, and its record not snapshotted
    snapshot.take(root, folder)
    assert snapshot.retire(root, folder).kept == 1  # snapshotted, but still open by its writer
    live.close()
    assert len(snapshot.retire(root, folder).removed) == 1
    held = sorted(r.id for r in snapshot.read_shards(folder).records)
    assert len(held) == 7 and segments(root) == []  # every acknowledged record is in a shard


def test_mnist_feedback_retire(tmp_path, capsys):
    from mnist_pipeline.feedback import cli

    root, folder = tmp_path / "s", tmp_path / "shards"
    store = Store(root, 1 << 20)
    store.append(record(0))
    store.close()
    args = ["--store", str(root), "--snapshots", str(folder)]
    assert cli.main([*args, "retire"]) == 2 and "run `mnist-feedback snapshot`" in capsys.readouterr().err
    assert cli.main([*args, "snapshot", "--no-dvc"]) == 0
    assert cli.main([*args, "retire"]) == 0 and "1 segment(s) retired" in capsys.readouterr().out
    assert segments(root) == [] and len(snapshot.read_shards(folder).records) == 1


def test_snapshots_and_retires_beside_live_writers_lose_nothing(tmp_path):
    """Writers come and go while snapshots (the first reading everything) and retires run: every
    acknowledged record ends in exactly one shard."""
    root, folder = tmp_path / "s", tmp_path / "shards"
    folder.mkdir()
    Store(root, 1 << 30).close()  # the salt
    acknowledged: list[str] = []

    def writer(n: int) -> None:
        for k in range(10):
            store = Store(root, 1 << 30)
            acknowledged.extend(store.append(record(n * 1000 + k * 10 + j)) for j in range(5))
            store.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for turn in itertools.count():
        if not any(t.is_alive() for t in threads):
            break
        if turn % 2:  # every other snapshot without its mark: the full read (as into another checkout)
            (root / snapshot.MARK).unlink(missing_ok=True)
        snapshot.take(root, folder)
        snapshot.retire(root, folder)
    for t in threads:
        t.join()
    snapshot.take(root, folder)
    ids = [r.id for r in snapshot.read_shards(folder).records]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(acknowledged) and len(ids) == 150
