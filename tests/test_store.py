"""The feedback store is a database (mnist_pipeline/feedback/store.py, snapshot.py; issue 35).

The unit tier uses SQLite only. The slow tier runs the faults on the real engines: `mnist-serve` processes
killed with SIGKILL mid-burst, a real PostgreSQL server (Debian's, started once for this module) restarted
in immediate mode and shared by two servers and two checkouts, a full tmpfs under a SQLite store. After
each, every id acknowledged with 201 is in `mnist-feedback export`, exactly once.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml

from helpers import BIN, DVC, ROOT, loadgen, run, script_module, served, stored
from mnist_pipeline.feedback import cli, records, snapshot
from mnist_pipeline.feedback import store as store_module
from mnist_pipeline.feedback.records import correction, encode, read_shards
from mnist_pipeline.feedback.store import Store, StoreError, StoreFull, StoreUnavailable, Writer

BODY, KIND = loadgen.multipart([("file", "d.png", "image/png", loadgen.digit_png(140, 110))], {"label": "3"})


def record(i: int, submitter: str = "s1", upload: bytes = b"") -> records.Record:
    image = np.random.default_rng(i).random((28, 28), dtype=np.float32)
    return correction(image, i % 10, np.full(10, 0.1, np.float32), "m", submitter, "cli", upload)


def exported(where: str | Path) -> list[str]:
    """The ids `mnist-feedback export` prints, as a person would run it."""
    done = subprocess.run([str(BIN / "mnist-feedback"), "--store", str(where), "export"], capture_output=True,
                          text=True, check=True, timeout=120)
    return [json.loads(line)["id"] for line in done.stdout.splitlines()]


# ---------------------------------------------------------------- SQLite: the unit tier


def test_export_prints_every_field_as_jsonl_and_csv(tmp_path, capsys):
    store = Store(tmp_path / "s")
    kept = [record(i, upload=b"png") for i in range(3)]
    store.append(kept)
    assert cli.main(["--store", str(tmp_path / "s"), "export"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == sorted(r.id for r in kept)
    first = next(line for line in lines if line["id"] == kept[0].id)
    assert {k: first[k] for k in ("label", "answer", "submitter", "source", "model", "kind")} == \
        {"label": 0, "answer": 0, "submitter": "s1", "source": "cli", "model": "m", "kind": "correction"}
    assert first["probabilities"] == [0.1] * 10 and first["time"] == kept[0].time
    assert cli.main(["--store", str(tmp_path / "s"), "export", "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split(",")[:9] == ["id", "time", "kind", "label", "answer", "probabilities", "submitter", "source",
                                      "model"] and len(rows) == 4


def test_a_commit_waits_for_the_disk(tmp_path):
    """WAL with synchronous=FULL on the connections that write records: kill -9 cannot tell (the page cache
    survives a process), so the setting itself is checked."""
    store = Store(tmp_path / "s")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL


def test_the_schema_is_versioned_and_a_store_of_today_opens_after_the_next_change(tmp_path, monkeypatch):
    kept = record(1)
    Store(tmp_path / "s").append([kept])
    database = tmp_path / "s" / store_module.SQLITE_FILE
    assert sqlite3.connect(database).execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
    # The next change of schema: a new revision beside today's.
    migrations = tmp_path / "migrations"
    shutil.copytree(store_module.MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "0002_note.py").write_text(
        'import sqlalchemy as sa\nfrom alembic import op\nrevision = "0002"\ndown_revision = "0001"\n'
        'def upgrade():\n    op.add_column("records", sa.Column("note", sa.Text))\n')
    monkeypatch.setattr(store_module, "MIGRATIONS", migrations)
    store = Store(tmp_path / "s")
    assert sqlite3.connect(database).execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
    assert [r.id for r in store.get([kept.id])] == [kept.id]


def test_a_corrupted_page_is_refused_for_writing_with_the_problem_named(tmp_path, capsys):
    store = Store(tmp_path / "s")
    store.append([record(i, upload=os.urandom(2000)) for i in range(200)])
    store.close()
    database = tmp_path / "s" / store_module.SQLITE_FILE
    sqlite3.connect(database).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    with database.open("r+b") as handle:  # a bad sector in the middle of the records' pages
        handle.seek(4096 * 20)
        handle.write(os.urandom(4096))
    with pytest.raises(StoreError, match="integrity check"):
        Store(tmp_path / "s")
    assert cli.main(["--store", str(tmp_path / "s"), "add", "--label", "1", "x.png"]) == 2
    assert "fails its integrity check" in capsys.readouterr().err
    code = cli.main(["--store", str(tmp_path / "s"), "export"])  # what it can still read, as the message says
    out, err = capsys.readouterr()
    assert (code, out.count("\n") > 0) in ((0, True), (2, True)) and "Traceback" not in err


def test_a_locked_store_is_unavailable_and_answers_503_with_retry_after(tmp_path, monkeypatch):
    from mnist_pipeline.serving.collect import refusal

    monkeypatch.setattr(store_module, "BUSY_MS", 200)
    store = Store(tmp_path / "s")
    other = sqlite3.connect(tmp_path / "s" / store_module.SQLITE_FILE, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past the busy timeout
    with pytest.raises(StoreUnavailable, match="unavailable"):
        store.append([record(0)])
    refused = Writer(store).submit(record(1))
    with pytest.raises(StoreUnavailable) as caught:
        refused.result(10)
    response = refusal(caught.value)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert refusal(StoreFull("full")).status_code == 507
    other.execute("ROLLBACK")
    assert stored(tmp_path / "s") == {}  # neither was committed
    later = record(2)
    writer = Writer(store)
    writer.submit(later).result(10)  # the writer goes on once the lock is free: no worker stays wedged
    writer.close()
    assert list(stored(tmp_path / "s")) == [later.id]


def test_a_writer_stopped_while_it_holds_the_write_lock_gets_503_not_a_hang(tmp_path, monkeypatch):
    """A `mnist-feedback snapshot` stopped with Ctrl-Z holds the machine's write lock: the others answer 503."""
    import fcntl

    monkeypatch.setattr(store_module, "BUSY_MS", 200)
    store = Store(tmp_path / "s")
    holder = os.open(tmp_path / "s" / store_module.SQLITE_LOCK, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    writer = Writer(store)
    began = time.monotonic()
    queued = [writer.submit(record(i)) for i in range(10, 20)]
    for done in queued:  # the first misses the lock; those queued behind it are refused with it, not in turn
        with pytest.raises(StoreUnavailable, match="locked"):
            done.result(10)
    assert time.monotonic() - began < 1.5  # 10 × 0.2 s, one after the other, would be 2 s
    first = writer.submit(record(1))  # the writer takes it and waits for the lock ...
    time.sleep(0.05)
    dropped = record(2)
    cancelled = writer.submit(dropped)  # ... while this request is cancelled (its client went away)
    assert cancelled.cancel()
    os.close(holder)
    first.result(10)
    last = record(3)
    writer.submit(last).result(10)  # the writer lived through the cancelled request
    writer.close()
    assert len(stored(tmp_path / "s")) == 2 and dropped.id not in stored(tmp_path / "s")
    assert last.id in stored(tmp_path / "s")


def test_a_stuck_lock_holder_costs_one_waiting_thread_at_most(tmp_path, monkeypatch):
    """Each refusal behind a stopped holder used to leave a helper thread and a descriptor waiting in flock."""
    import fcntl

    monkeypatch.setattr(store_module, "BUSY_MS", 50)
    store = Store(tmp_path / "s")
    holders = [os.open(tmp_path / "s" / name, os.O_RDWR) for name in (store_module.SQLITE_LOCK, "buckets")]
    for fd in holders:
        fcntl.flock(fd, fcntl.LOCK_EX)
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for i in range(20):
        with pytest.raises(StoreUnavailable):
            store.append([record(i)])
        with pytest.raises(StoreUnavailable):
            store.wait(store.submitter("client", f"203.0.113.{i}"), 1.0, 1)
    assert threading.active_count() <= threads + 2 and len(os.listdir("/proc/self/fd")) <= fds + 2
    for fd in holders:
        os.close(fd)
    kept = record(99)
    store.append([kept])  # the holder gone, writes go on
    assert list(stored(tmp_path / "s")) == [kept.id] and store.wait(store.submitter("client", "203.0.113.1"), 1.0, 1) == 0.0


def test_the_store_is_its_owners_only_it_holds_the_salt(tmp_path):
    store = Store(tmp_path / "s")
    store.append([record(0)])
    for name in (store_module.SQLITE_FILE, store_module.SQLITE_FILE + "-wal", store_module.SQLITE_BUCKETS):
        assert (tmp_path / "s" / name).stat().st_mode & 0o777 == 0o600, name


def test_no_message_repeats_a_password():
    from mnist_pipeline.feedback.store import shown, url_of

    assert shown(url_of("postgresql://ann:s3cr3t@db:5433/f?password=s3cr3t&sslmode=require")) == \
        "postgresql://ann@db:5433/f"
    for given in ("postgres+psycopg2://ann:s3cr3t@db/f", "postgresql://ann:p@s3cr3t@db/f",
                  "postgresql://ann:p@ss:s3cr3t@db/f"):
        with pytest.raises(StoreError) as caught:
            url_of(given)
        assert "s3cr3t" not in str(caught.value)


def test_group_commit_answers_each_request_once_its_transaction_committed(tmp_path, monkeypatch):
    from sqlalchemy import event

    store = Store(tmp_path / "s")
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    writer = Writer(store)
    seen_at_answer: dict[str, bool] = {}

    def answered(record_id: str) -> None:  # what another connection sees when the request is answered
        with sqlite3.connect(tmp_path / "s" / store_module.SQLITE_FILE) as other:
            seen_at_answer[record_id] = bool(other.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchall())

    futures = {r.id: writer.submit(r) for r in (record(i) for i in range(300))}
    for record_id, done in futures.items():
        done.add_done_callback(lambda _, record_id=record_id: answered(record_id))
    for done in futures.values():
        done.result(30)
        assert done.exception() is None
    writer.close()
    assert sorted(stored(tmp_path / "s")) == sorted(futures)
    assert len(seen_at_answer) == 300 and all(seen_at_answer.values())  # each answer after its commit
    assert len(commits) < 300  # grouped: fewer transactions than requests


def test_snapshots_take_each_record_once_and_a_crash_before_the_mark_repeats_nothing(tmp_path, monkeypatch):
    store, folder = Store(tmp_path / "s"), tmp_path / "shards"
    store.append([record(i) for i in range(20)])
    first = snapshot.take(store, folder)
    assert first.new == 20 and snapshot.take(store, folder).paths == []
    store.append([record(i) for i in range(20, 25)])
    real = snapshot.write_bytes

    def crash(path, data):  # the shard is written, then the process dies before its mark
        real(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshot, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        snapshot.take(store, folder)
    monkeypatch.setattr(snapshot, "write_bytes", real)
    store.append([record(i) for i in range(25, 27)])
    again = snapshot.take(store, folder)  # writes the crashed one's shard (the same bytes), then the new one
    assert again.new == 7 and again.total == 27 and len(again.paths) == 2  # both, for `dvc add` and git
    ids = [r.id for r in read_shards(folder).records]
    assert len(ids) == len(set(ids)) == 27 and len(list(folder.glob("shard-*.rec"))) == 3


def test_snapshots_beside_live_writers_take_every_acknowledged_record_exactly_once(tmp_path):
    store, folder = Store(tmp_path / "s"), tmp_path / "shards"
    acknowledged: list[str] = []

    def writer(n: int) -> None:
        own = Store(tmp_path / "s")
        for k in range(20):
            batch = [record(n * 1000 + k * 10 + j) for j in range(3)]
            own.append(batch)
            acknowledged.extend(r.id for r in batch)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    takers = [threading.Thread(target=lambda: [snapshot.take(Store(tmp_path / "s"), folder) for _ in range(8)])
              for _ in range(2)]
    for t in threads + takers:
        t.start()
    for t in threads + takers:
        t.join()
    snapshot.take(store, folder)
    ids = [r.id for r in read_shards(folder).records]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(acknowledged)


def write_segment_store(folder: Path, salt: bytes) -> tuple[list[str], list[str]]:
    """A store of the segment format (before the database): an `MFB2` segment, an `MFB1` segment with a bit
    flipped in its second record, and a valid frame of a kind this version does not know. (readable ids,
    all ids)."""
    import struct
    import zlib

    (folder / "segments").mkdir(parents=True)
    (folder / "salt").write_bytes(salt)
    new = [record(i, "s" + "a" * 15) for i in range(3)]
    (folder / "segments" / "a.seg").write_bytes(b"".join(encode(r) for r in new))
    old = [record(i) for i in range(10, 15)]

    def v1(payload: bytes) -> bytes:
        return struct.pack("<4sII", b"MFB1", len(payload), zlib.crc32(payload)) + payload

    frames = [v1(encode(r)[records.FRAME.size:]) for r in old]
    damaged = bytearray(frames[1])
    damaged[200] ^= 1
    frames[1] = bytes(damaged)
    header = json.dumps({"id": "unknown-kind", "time": 0, "kind": "vote", "submitter": "x", "source": "cli"}).encode()
    odd = struct.pack("<I", len(header)) + header
    odd_frame = struct.pack("<4sIII", b"MFB2", len(odd), zlib.crc32(b"MFB2" + struct.pack("<I", len(odd))),
                            zlib.crc32(odd)) + odd
    (folder / "segments" / "b.seg").write_bytes(b"".join(frames[:3]) + odd_frame + b"".join(frames[3:]))
    readable = [r.id for r in new] + [r.id for i, r in enumerate(old) if i != 1]
    return readable, [r.id for r in new + old]


def test_migrate_reads_every_readable_record_once_and_says_what_it_could_not(tmp_path, capsys):
    salt = os.urandom(32)
    readable, _ = write_segment_store(tmp_path / "old", salt)
    args = ["--store", str(tmp_path / "new"), "migrate", str(tmp_path / "old")]
    assert cli.main(args) == 1  # something could not be read: said, line by line
    out = capsys.readouterr().out
    assert "7 records migrated" in out and out.count("not read:") == 2
    assert "checksum mismatch" in out and "unknown record kind 'vote'" in out
    assert sorted(stored(tmp_path / "new")) == sorted(readable)  # past the flipped bit, the rest of MFB1 read
    assert Store(tmp_path / "new").salt == salt  # pseudonyms go on as before
    assert cli.main(args) == 1 and "0 records migrated" in capsys.readouterr().out
    assert len(exported(tmp_path / "new")) == 7
    snapshot.take(Store(tmp_path / "new"), tmp_path / "shards")  # then retire could delete what a rerun re-adds
    assert cli.main(args) == 2 and "has snapshots already" in capsys.readouterr().err


def test_migrate_refuses_ids_that_are_not_ours(tmp_path, capsys):
    """An id becomes a shard's file name: one from a hostile segment file is reported, not stored."""
    (tmp_path / "old" / "segments").mkdir(parents=True)
    import dataclasses

    hostile, fine = dataclasses.replace(record(0), id="../../../etc/x"), record(1)
    (tmp_path / "old" / "segments" / "a.seg").write_bytes(encode(hostile) + encode(fine))
    assert cli.main(["--store", str(tmp_path / "new"), "migrate", str(tmp_path / "old")]) == 1
    assert "not one this project makes ('../../../etc/x')" in capsys.readouterr().out
    assert list(stored(tmp_path / "new")) == [fine.id]


def test_stores_of_one_project_share_their_salt_and_a_store_with_records_keeps_its_own(tmp_path, capsys):
    first = Store(tmp_path / "a")
    first.append([record(0)])
    assert cli.main(["--store", str(tmp_path / "a"), "salt", "--export", str(tmp_path / "key")]) == 0
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600 and (tmp_path / "key").read_bytes() == first.salt
    assert cli.main(["--store", str(tmp_path / "b"), "salt", "--import", str(tmp_path / "key")]) == 0
    assert Store(tmp_path / "b").submitter("name", "ann") == first.submitter("name", "ann")
    (tmp_path / "other").write_bytes(os.urandom(32))
    assert cli.main(["--store", str(tmp_path / "a"), "salt", "--import", str(tmp_path / "other")]) == 2
    assert "already holds records" in capsys.readouterr().err and Store(tmp_path / "a").salt == first.salt


def test_reading_a_store_writes_nothing(tmp_path, capsys):
    assert cli.main(["--store", str(tmp_path / "none"), "status"]) == 2
    assert "no feedback store there" in capsys.readouterr().err and not (tmp_path / "none").exists()
    kept = record(0)
    Store(tmp_path / "s").append([kept])
    (tmp_path / "s").chmod(0o500)  # a backup, say: read-only
    try:
        assert cli.main(["--store", str(tmp_path / "s"), "export"]) == 0
    finally:
        (tmp_path / "s").chmod(0o700)
    assert json.loads(capsys.readouterr().out)["id"] == kept.id


def test_status_counts_from_sql(tmp_path, capsys):
    store = Store(tmp_path / "s")
    store.append([record(i) for i in range(4)] + [record(4, "s2")])
    snapshot.take(store, tmp_path / "shards")
    store.append([record(5)])
    assert cli.main(["--store", str(tmp_path / "s"), "--snapshots", str(tmp_path / "shards"), "status"]) == 0
    out = capsys.readouterr().out
    assert "6 corrections, 0 reviews, 1 not yet in a snapshot (snapshots: 1 written" in out
    assert "submitters: 2; most records: s1 5, s2 1" in out and "0: 1  1: 1  2: 1  3: 1  4: 1  5: 1" in out


# ---------------------------------------------------------------- retire: only what DVC tracks


def dvc_checkout(folder: Path, remote: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    folder.mkdir(parents=True)
    run(["git", "init", "-q"], folder, env)
    run([DVC, "init", "-q"], folder, env)
    if remote is not None:
        run([DVC, "remote", "add", "-d", "team", str(remote)], folder, env)
    return env


def feedback(folder: Path, store: str, env: dict[str, str], *args: str) -> str:
    return run([str(BIN / "mnist-feedback"), "--store", store, *args], folder, env).stdout


@pytest.mark.slow
def test_retire_deletes_only_what_dvc_tracks_and_the_remote_holds(tmp_path):
    where = str(tmp_path / "store")
    repo = tmp_path / "repo"
    env = dvc_checkout(repo, remote=tmp_path / "remote")
    store = Store(where)
    store.append([record(i) for i in range(5)])
    feedback(repo, where, env, "snapshot", "--no-dvc")  # a shard DVC does not track
    out = feedback(repo, where, env, "retire")
    assert "0 records deleted" in out and "no .dvc file" in out and len(stored(where)) == 5
    shard = next((repo / "data" / "feedback").glob("shard-*.rec"))
    run([DVC, "add", "-q", str(shard.relative_to(repo))], repo, env)
    out = feedback(repo, where, env, "retire")
    assert "0 records deleted" in out and "not on the DVC remote" in out and len(stored(where)) == 5
    outside = run([str(BIN / "mnist-feedback"), "--store", where, "--snapshots", str(repo / "data" / "feedback"),
                   "retire"], tmp_path, env).stdout  # from cron, say: DVC must still look in the shards' repo
    assert "not on the DVC remote" in outside and len(stored(where)) == 5
    tracked = yaml.safe_load(shard.with_suffix(".rec.dvc").read_text())
    run([DVC, "push", "-q"], repo, env)
    lying = {**tracked, "outs": [{**tracked["outs"][0], "md5": "0" * 32}]}
    shard.with_suffix(".rec.dvc").write_text(yaml.safe_dump(lying))  # a .dvc file that names other bytes
    assert "names 0000" in feedback(repo, where, env, "retire") and len(stored(where)) == 5
    elsewhere = {**tracked, "outs": [{**tracked["outs"][0], "remote": "other"}]}
    shard.with_suffix(".rec.dvc").write_text(yaml.safe_dump(elsewhere))  # dvc status --cloud would skip it
    assert "off the default remote" in feedback(repo, where, env, "retire") and len(stored(where)) == 5
    shard.with_suffix(".rec.dvc").write_text(yaml.safe_dump(tracked))
    late = record(9)
    store.append([late])  # in no snapshot: kept
    out = feedback(repo, where, env, "retire")
    assert "5 records deleted" in out and list(stored(where)) == [late.id]
    assert len(read_shards(repo / "data" / "feedback").records) == 5
    assert store.used_bytes() == sum(store_module.row(r)["bytes"] for r in stored(where).values())


# ---------------------------------------------------------------- real servers under faults


def Burst(url: str, clients: int = 4) -> loadgen.Burst:  # noqa: N802
    return loadgen.Burst(url, BODY, KIND, clients)


def start_server(model: Path, store: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(BIN / "mnist-serve"), "--model", str(model), "--port", "0", "--feedback", store,
                             "--feedback-rate", "100000", "--feedback-burst", "100000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert line.startswith("serving "), line + proc.stderr.read()
    return proc, loadgen.served_url(line)


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def workers_of(proc: subprocess.Popen) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = []
    for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        with contextlib.suppress(FileNotFoundError):  # gone between the listing and the look
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


@pytest.mark.slow
def test_kill_9_a_worker_then_the_server_loses_no_acknowledged_record(exported_models, tmp_path):
    where = str(tmp_path / "store")
    proc, url = start_server(exported_models[1] / "model.onnx", where, "--workers", "2")
    try:
        burst = Burst(url)
        burst.wait_for(100)
        victim = max(workers_of(proc))
        os.kill(victim, signal.SIGKILL)  # one worker, mid-burst: the supervisor starts another
        deadline = time.monotonic() + 30
        while (victim in workers_of(proc) or len(workers_of(proc)) < 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert victim not in workers_of(proc) and len(workers_of(proc)) == 2
        burst.wait_for(len(burst.acknowledged) + 100)
        os.killpg(proc.pid, signal.SIGKILL)  # then the supervisor and every worker at once
        burst.end()
    finally:
        stop_group(proc)
    ids = exported(where)
    assert len(ids) == len(set(ids)) and set(burst.acknowledged) <= set(ids)
    assert set(burst.statuses) == {201}


@pytest.mark.slow
def test_a_full_disk_answers_507_and_keeps_every_acknowledged_record(exported_models, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    try:
        where = str(disk / "store")
        proc, url = start_server(exported_models[1] / "model.onnx", where, "--feedback-reserve-mb", "0")
        try:
            burst = Burst(url, clients=2)
            burst.wait_for(20)
            descriptors = len(os.listdir(f"/proc/{proc.pid}/fd"))
            deadline = time.monotonic() + 60
            while burst.statuses.count(507) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            burst.end()
            assert burst.statuses.count(507) >= 20 and set(burst.statuses) == {201, 507}
            assert json.loads(health(url))["status"] == "ok"  # the server stays up
            assert len(os.listdir(f"/proc/{proc.pid}/fd")) <= descriptors + 2  # refusals leak no files
            ids = exported(where)
            assert len(ids) == len(set(ids)) and set(burst.acknowledged) <= set(ids)
            assert len(set(ids) - set(burst.acknowledged)) <= 2  # nothing 507'd was kept but a batch in flight
        finally:
            stop_group(proc)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_the_rate_buckets_never_crash_a_worker_on_a_full_disk(tmp_path):
    """The buckets' table is mapped: a page first written when the disk is full would be SIGBUS (the worker dead).
    Its blocks are allocated when it is made, so a full disk refuses at start, and a full table keeps working."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        script = """
import sys
from pathlib import Path
from mnist_pipeline.feedback.store import Buckets
folder = Path(sys.argv[1])
table = Buckets(folder / "buckets")
try:
    (folder / "filler").write_bytes(b"x" * (2 << 20))  # the disk fills up
except OSError:
    pass
print(sum(table.wait(f"s{2 * i + 1:015x}", 0.0, 1.0, 0.0, 1.0) == 0.0 for i in range(20000)))  # every page touched
"""
        done = subprocess.run([sys.executable, "-c", script, str(disk)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr  # -7: SIGBUS
        assert int(done.stdout) == 20000
        from mnist_pipeline.feedback.store import Buckets

        with pytest.raises(StoreFull, match="rate buckets"):
            Buckets(disk / "more")  # no room for a table: refused when made, not a crash later
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def health(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
        return response.read().decode()


# ---------------------------------------------------------------- PostgreSQL: a real server


@pytest.fixture(scope="module")
def postgres():
    server = script_module("postgres", ROOT / "scripts" / "postgres.py")
    if server.bindir() is None:
        pytest.skip("PostgreSQL is not installed (Debian's `postgresql`; .ci/run installs it)")
    with server.postgres() as pg:
        yield pg


@pytest.mark.slow
def test_postgresql_restarted_mid_burst_acknowledges_only_what_committed(exported_models, postgres):
    where = postgres.database("restart")
    proc, url = start_server(exported_models[1] / "model.onnx", where, "--workers", "2")
    try:
        burst = Burst(url)
        burst.wait_for(100)
        postgres.restart(immediate=True)  # a crash: no shutdown checkpoint, WAL replayed at start
        burst.wait_for(len(burst.acknowledged) + 100)
        postgres.stop("immediate")
        time.sleep(0.5)
        burst.end()
        assert 503 in burst.statuses and burst.retry_after_missing == 0
        postgres.start()
        status, _ = post(url)
        assert status == 201
    finally:
        stop_group(proc)
    ids = exported(where)
    assert len(ids) == len(set(ids)) and set(burst.acknowledged) <= set(ids)
    assert set(burst.statuses) <= {201, 503}


def post(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/feedback", BODY, {"Content-Type": KIND, **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


@pytest.mark.slow
def test_two_servers_share_one_postgresql_store_its_salt_and_its_rate_limits(exported_models, postgres):
    where = postgres.database("shared")
    model = exported_models[1] / "model.onnx"
    args = ("--feedback", where, "--feedback-rate", "0.001", "--feedback-burst", "3")
    with served(model, *args) as (_, first), served(model, *args) as (_, second):
        statuses = [post(url)[0] for url in (first, second, first, second, first)]
    assert statuses == [201, 201, 201, 429, 429]  # one bucket for the client across both servers
    store = Store(where)
    store.forget_full_buckets(time.time() + 10_000)  # every bucket full again by then: the table empties
    with store.fast.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM buckets").scalar_one() == 0
    assert len({r.submitter for r in stored(where).values()}) == 1  # one salt: one pseudonym
    with Store(where).engine.connect() as conn:  # durable commits whatever the server's default
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"


@pytest.mark.slow
def test_two_checkouts_share_one_postgresql_store_and_retire_only_their_own(exported_models, postgres, tmp_path):
    where = postgres.database("checkouts")
    first, second = tmp_path / "a", tmp_path / "b"
    env = dvc_checkout(first)
    dvc_checkout(second)
    store = Store(where)
    store.append([record(i) for i in range(4)])
    feedback(first, where, env, "snapshot")  # tracked (dvc add) in the first checkout
    store.append([record(i) for i in range(4, 7)])
    feedback(second, where, env, "snapshot")  # the second takes only what the first did not
    a, b = (read_shards(c / "data" / "feedback").records for c in (first, second))
    assert len(a) == 4 and len(b) == 3
    out = feedback(second, where, env, "retire")  # the first's shard has no .dvc file here: kept
    assert "3 records deleted" in out and "no .dvc file" in out and len(stored(where)) == 4
    out = feedback(first, where, env, "retire")
    assert "4 records deleted" in out and stored(where) == {}
