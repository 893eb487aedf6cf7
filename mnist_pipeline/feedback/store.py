"""The live store of users' feedback: a database, SQLite by default, PostgreSQL for a fleet.

    --feedback DIR                    DIR/feedback.sqlite3 (default feedback/), made on first use
    --feedback postgresql://…         one store that any number of servers on any number of machines share

Tables (the schema is Alembic's, migrations/): `records` (one row per correction or review, its
28×28 image and the upload's first KEPT_UPLOAD bytes), `snapshots` (the mark: a row per snapshot
with its shard and hashes, snapshot.py), `meta` (the pseudonym salt) and `usage` (bytes held, a row
per writer so that writers never wait on one counter). Beside them, `buckets`: the rate limit of
every client, shared by every server of the store, disposable and so not migrated (with SQLite, a
table mapped from a file beside it, so that a bucket never waits on a commit's fsync).

An acknowledgement means committed: `append` returns once the transaction holding the records has
committed durably (SQLite: WAL with `synchronous=FULL`; PostgreSQL: `synchronous_commit=on` for
these sessions whatever the server's default). `Writer` groups the records of concurrent requests
into one transaction and answers each only when that transaction is durable. Failures are typed
for the HTTP layer: a store that is down or locked is `StoreUnavailable` (503), a full store or
disk `StoreFull` (507), a SQLite file that fails its integrity check `StoreError`, refused for
writing at open with the problem named. Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import mmap
import os
import queue
import secrets
import shutil
import socket
import sqlite3
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, SQLAlchemyError

from mnist_pipeline.defaults import DEFAULT_FEEDBACK_MAX_BYTES, DEFAULT_FEEDBACK_MIN_FREE
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.feedback.records import KEPT_UPLOAD, SIDE, Record, pseudonym

DEFAULT_STORE = "feedback"  # a folder relative to the repository root (ignored by git and DVC), or a URL
SQLITE_FILE = "feedback.sqlite3"
SQLITE_BUCKETS = "buckets"  # SQLite: the rate buckets, a table every process of the machine maps (Buckets)
COUNTED_S = 0.5  # how often a writer reads what the store holds, for its bound
BUCKET_WAIT_S = 0.1  # a bucket's decision takes microseconds: held longer, its holder is stuck (503)
SQLITE_LOCK = "write.lock"  # SQLite: writers queue on this flock, woken at once (SQLite's busy handler sleeps)
REFUSED = "it is refused for writing; restore it from a backup, or `mnist-feedback export` what it can still read"
BUSY_MS = 5000  # how long a write waits for another writer's lock before the answer is 503
MIGRATIONS = Path(__file__).with_name("migrations")
COLUMNS = (
    "id",
    "time",
    "kind",
    "submitter",
    "source",
    "label",
    "answer",
    "probabilities",
    "model",
    "upload_type",
    "upload_size",
    "target",
    "verdict",
    "image",
    "upload",
    "bytes",
)
INSERT = text(f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + c for c in COLUMNS)})")
COUNT = text(
    "INSERT INTO usage (writer, bytes) VALUES (:writer, :bytes) "
    "ON CONFLICT (writer) DO UPDATE SET bytes = usage.bytes + excluded.bytes"
)
# Not a migrated table: a bucket is disposable (losing one gives a client a full burst), so a new schema can
# drop and remake it. A SQLite store keeps its buckets in a mapped file instead (Buckets).
BUCKETS = text(
    "CREATE TABLE IF NOT EXISTS buckets (client VARCHAR(64) PRIMARY KEY, tat FLOAT NOT NULL, ok INTEGER NOT NULL)"
)
# A token bucket as GCRA: `tat` is when the client's bucket is full again; SET sees the old row in both engines.
TAKE = text("""
INSERT INTO buckets (client, tat, ok) VALUES (:client, :now + :interval, 1)
ON CONFLICT (client) DO UPDATE SET
  ok = CASE WHEN buckets.tat - :now > :tolerance THEN 0 ELSE 1 END,
  tat = CASE WHEN buckets.tat - :now > :tolerance THEN buckets.tat
             WHEN buckets.tat > :now THEN buckets.tat + :interval
             ELSE :now + :interval END
RETURNING ok, tat""")


class StoreError(PipelineError):
    """A store that cannot be opened or must not be written (not a store, fails its integrity check)."""


class StoreFull(StoreError):
    """The store is at its size bound, or its disk is full: nothing was written (HTTP 507)."""


class StoreUnavailable(StoreError):
    """The database is down, unreachable or locked for longer than the busy timeout (HTTP 503)."""


def url_of(where: str | Path) -> str:
    """The SQLAlchemy URL of `--feedback WHERE`: a folder is a SQLite file in it. A message never repeats a URL
    as given: it may hold a password."""
    where = str(where)
    if where.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        url = "postgresql+psycopg://" + where.split("://", 1)[1]
        try:
            host = make_url(url).host or ""
        except (ValueError, ArgumentError):
            raise StoreError(
                "the postgresql:// URL does not parse (is a password's @ or : unescaped? better, keep "
                "the password in PGPASSWORD or ~/.pgpass)"
            ) from None
        if "@" in host:
            raise StoreError(
                "the postgresql:// URL has an unescaped @ (write a password's @ as %40; better, keep "
                "the password in PGPASSWORD or ~/.pgpass)"
            )
        return url
    if "://" in where:
        raise StoreError(f"{where.split('://', 1)[0]}://…: expected a folder (a SQLite store) or a postgresql:// URL")
    return f"sqlite:///{Path(where).resolve() / SQLITE_FILE}"


def shown(url: str) -> str:
    """Where the store is, for messages: no password, no query (which may hold one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ""
    user = f"{parsed.username}@" if parsed.username else ""
    port = f":{parsed.port}" if parsed.port else ""
    return f"postgresql://{user}{parsed.host or ''}{port}/{parsed.database or ''}"


def failure(exc: SQLAlchemyError, where: str) -> StoreError:
    """The typed error of a failed database call."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlite_errorcode", None)
    code = None if code is None else code & 0xFF  # the primary code of an extended one (SQLITE_CORRUPT_INDEX, …)
    lines = str(orig).strip().splitlines()
    why = lines[0] if lines else type(orig).__name__
    if code == sqlite3.SQLITE_FULL or getattr(orig, "sqlstate", None) == "53100":
        return StoreFull(f"the disk under the feedback store {where} is full ({why})")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreError(f"{where} fails its integrity check ({why}): {REFUSED}")
    if isinstance(exc, OperationalError | InterfaceError) or getattr(exc, "connection_invalidated", False):
        return StoreUnavailable(f"the feedback store {where} is unavailable ({why}); retry shortly")
    return StoreError(f"{where}: {why}")


def _engine(url: str, durable: bool = True, readonly: bool = False) -> Engine:
    """Durable: transactions, each commit waits for the disk. Not durable (PostgreSQL's rate buckets): each
    statement is its own transaction, and its commit does not wait for the disk. Read-only: for reading a store
    that must not be written (a damaged one, a backup)."""
    if url.startswith("sqlite"):
        if readonly:  # SQLite's URI form, opened read-only
            url = f"sqlite:///file:{urllib.parse.quote(make_url(url).database or '')}?mode=ro&uri=true"
        engine = create_engine(url, pool_size=8, max_overflow=8)
        pragmas = [f"busy_timeout = {BUSY_MS}"]
        if not readonly:
            pragmas += ["journal_mode = WAL", "synchronous = FULL", "foreign_keys = ON"]

        @event.listens_for(engine, "connect")
        def connected(dbapi: Any, _: Any) -> None:
            dbapi.isolation_level = None  # transactions are begun below, not by the driver
            for pragma in pragmas:
                dbapi.execute(f"PRAGMA {pragma}")

        @event.listens_for(engine, "begin")
        def begin(conn: Connection) -> None:
            # A writer takes the lock first, so that it waits (busy_timeout) rather than fail on upgrade.
            conn.exec_driver_sql("BEGIN" if readonly or conn.get_execution_options().get("read") else "BEGIN IMMEDIATE")

        return engine
    options = f"-c synchronous_commit={'on' if durable else 'off'} -c lock_timeout={BUSY_MS}"
    if readonly:
        options += " -c default_transaction_read_only=on"
    # A host that vanishes without a reset (a partition, a power cut) is noticed in seconds, not TCP's minutes.
    alive = {
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,
    }
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=8,
        connect_args={"connect_timeout": 5, "options": options, **alive},
    )
    return engine if durable else engine.execution_options(isolation_level="AUTOCOMMIT")


_queued: dict[str, threading.Event] = {}  # lock file → the wait of a helper whose caller gave up, while it waits
_queued_guard = threading.Lock()


def locked(fd: int, seconds: float, name: str) -> bool:
    """Take `fd`'s exclusive flock (the lock file `name`), waiting at most `seconds` (0: not at all); whether it
    was taken. The wait is the kernel's queue (a helper thread blocks in flock), so a busy lock is handed on at
    once and in turn, and a holder that was stopped (Ctrl-Z, a frozen container) makes the others answer 503
    rather than hang. While a helper whose caller gave up still waits, later callers poll instead of queueing
    another: one thread and one descriptor per lock file at most, however long the holder is stuck. On a miss
    `fd` is no longer the caller's: it is closed now, or by the helper when its flock returns."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    with _queued_guard:
        stuck = name in _queued and not _queued[name].is_set()
    if not seconds or stuck:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.001)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
        os.close(fd)
        return False
    done, gave_up, guard, taken = threading.Event(), threading.Event(), threading.Lock(), []

    def take() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            taken.append(True)
        except OSError:
            taken.append(False)
        with guard:
            done.set()
            if gave_up.is_set() or not taken[0]:
                os.close(fd)  # the caller left (or the flock failed): releasing it is ours

    threading.Thread(target=take, name="flock", daemon=True).start()
    if done.wait(seconds):
        return taken[0]
    with guard:
        if done.is_set():
            return taken[0]
        gave_up.set()
    with _queued_guard:
        _queued[name] = done
    return False


def _upgrade(conn: Connection) -> None:
    """Bring the schema to the newest revision, inside the caller's transaction (one upgrader at a time)."""
    from alembic import command
    from alembic.config import Config

    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(20261205)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    command.upgrade(config, "head")


def row(record: Record) -> dict[str, Any]:
    values = {c: getattr(record, c) for c in COLUMNS[:-3]}
    values["probabilities"] = json.dumps(record.header().get("probabilities", []))
    values["image"] = None if record.image is None else record.image.astype("<f4").tobytes()
    values["upload"] = record.upload[:KEPT_UPLOAD]
    values["bytes"] = 512 + len(values["image"] or b"") + len(values["upload"])
    return values


def record_of(values: Any) -> Record:
    import numpy as np

    fields = dict(values._mapping)
    image = fields.pop("image")
    fields.pop("bytes", None)
    fields.pop("snapshot", None)
    fields["probabilities"] = tuple(json.loads(fields["probabilities"] or "[]"))
    fields["upload"] = bytes(fields["upload"] or b"")
    if image is not None:
        fields["image"] = np.frombuffer(bytes(image), "<f4").reshape(SIDE, SIDE).astype(np.float32)
    return Record(**fields)


class Store:
    """One process's handle on the store: its engines, the salt, the size bound."""

    def __init__(
        self,
        where: str | Path = DEFAULT_STORE,
        max_bytes: int = DEFAULT_FEEDBACK_MAX_BYTES,
        min_free: int = DEFAULT_FEEDBACK_MIN_FREE,
        check: bool = True,
        readonly: bool = False,
    ) -> None:
        self.url = url_of(where)
        self.where = shown(self.url)
        self.max_bytes, self.min_free = max_bytes, min_free
        self.folder = Path(where) if self.url.startswith("sqlite") else None
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            if self.folder is not None and not readonly:
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                # Owner-only before SQLite first opens it (it gives its -wal and -shm files the same mode): the
                # file holds the salt, with which a pseudonym of an address can be reversed by trying addresses.
                # Only a file that is not there: closing any descriptor of a database file drops the POSIX locks
                # that SQLite connections of this process hold on it.
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.folder / SQLITE_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                for name in (SQLITE_FILE, SQLITE_FILE + "-wal", SQLITE_FILE + "-shm"):
                    path = self.folder / name
                    if path.exists() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
                        path.chmod(0o600)
            elif self.folder is not None and not (self.folder / SQLITE_FILE).is_file():
                raise StoreError(f"{self.where}: no feedback store there")
            self.engine = _engine(self.url, readonly=readonly)
            # The rate buckets: losing a bucket's last update loses nothing, so it need not wait on the disk.
            self.buckets, self.fast = None, None
            if readonly:
                pass
            elif self.folder is not None:
                self.buckets = Buckets(self.folder / SQLITE_BUCKETS)
            else:
                self.fast = _engine(self.url, durable=False)
                with self.fast.connect() as conn:
                    conn.execute(BUCKETS)
            if check and self.folder is not None:  # read-only: writers go on meanwhile
                with self.read() as conn:
                    problems = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise StoreError(f"{self.where} fails its integrity check ({'; '.join(problems)}): {REFUSED}")
            self.salt = self._prepared(readonly)
        except OSError as exc:
            raise StoreError(f"{where}: cannot use it as a feedback store ({exc.strerror or exc})") from None
        except SQLAlchemyError as exc:
            raise failure(exc, self.where) from None
        self._used, self._counted = 0, -1e9

    def _prepared(self, readonly: bool) -> bytes:
        """The salt, once the schema is the newest and the salt made: a write (one process at a time) only when
        either is missing, so that opening a store to read it takes no lock."""
        from alembic.script import ScriptDirectory
        from sqlalchemy import inspect

        with self.read() as conn:
            current = (
                inspect(conn).has_table("alembic_version")
                and conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            )
            salt = current and conn.execute(text("SELECT value FROM meta WHERE key = 'salt'")).scalar()
        if salt and current == ScriptDirectory(str(MIGRATIONS)).get_current_head():
            return bytes.fromhex(salt)
        if readonly:
            raise StoreError(
                f"{self.where}: its schema is not this version's: a command that writes (or a server) migrates it first"
            )
        with self.writing() as conn:
            _upgrade(conn)
            conn.execute(
                text("INSERT INTO meta (key, value) VALUES ('salt', :salt) ON CONFLICT (key) DO NOTHING"),
                {"salt": secrets.token_hex(32)},
            )
            return bytes.fromhex(conn.execute(text("SELECT value FROM meta WHERE key = 'salt'")).scalar_one())

    def submitter(self, kind: str, value: str) -> str:
        return pseudonym(self.salt, kind, value)

    def set_salt(self, salt: bytes) -> None:
        """Key this store's pseudonyms with another store's salt, so that one person is one submitter in both;
        refused once it holds records under its own (every pseudonym would change: caps, distrust, user split)."""
        if len(salt) != 32:
            raise StoreError(f"a salt is 32 bytes, not {len(salt)}")
        if salt == self.salt:
            return
        try:
            with self.writing() as conn:
                if conn.execute(text("SELECT count(*) FROM records")).scalar_one():
                    raise StoreError(
                        f"{self.where} already holds records keyed by its own salt: give a new store "
                        "the other's salt before its first record"
                    )
                conn.execute(text("UPDATE meta SET value = :v WHERE key = 'salt'"), {"v": salt.hex()})
        except SQLAlchemyError as exc:
            raise failure(exc, self.where) from None
        self.salt = salt

    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        """A write transaction, committed when the block ends. SQLite writers of this machine queue on a flock
        first: the kernel wakes the next at once, where SQLite's own busy handler polls with sleeps."""
        if self.folder is None:
            with self.engine.begin() as conn:
                yield conn
            return
        fd = os.open(self.folder / SQLITE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        if not locked(
            fd, BUSY_MS / 1000, str(self.folder / SQLITE_LOCK)
        ):  # fd is closed, or the waiting helper's: not ours to close
            raise StoreUnavailable(
                f"the feedback store {self.where} is locked by another writer for over {BUSY_MS / 1000:g} s; retry "
                "shortly"
            )
        try:
            with self.engine.begin() as conn:
                yield conn
        finally:
            os.close(fd)

    def read(self) -> Connection:
        """A connection for reading: in SQLite its transactions take no write lock."""
        return self.engine.connect().execution_options(read=True)

    def used_bytes(self) -> int:
        with self.read() as conn:
            return int(conn.execute(text("SELECT coalesce(sum(bytes), 0) FROM usage")).scalar_one())

    def _room(self, size: int) -> None:
        """StoreFull past the bound. What the store holds is read at most every COUNTED_S and this process's own
        records added in between, so concurrent writers can overshoot by what they write within that time."""
        if time.monotonic() - self._counted > COUNTED_S:
            self._used, self._counted = self.used_bytes(), time.monotonic()
        if self._used + size > self.max_bytes:
            raise StoreFull(
                f"the feedback store is full ({self._used:,} of {self.max_bytes:,} bytes): "
                "`mnist-feedback snapshot` then `retire` frees it"
            )
        if self.folder is not None and shutil.disk_usage(self.folder).free - size < self.min_free:
            raise StoreFull(f"the disk under {self.folder} has less than {self.min_free:,} bytes free")

    def append(self, records: Sequence[Record]) -> None:
        """Insert `records` in one transaction; return once it has committed durably."""
        self.insert([row(r) for r in records])

    def insert(self, rows: list[dict[str, Any]], more: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        """`append` for rows made beforehand (`row`), and those `more()` gives once the write lock is held (what
        arrived meanwhile): the least work while other writers wait."""
        try:
            with self.writing() as conn:
                rows = rows + (more() if more else [])
                size = sum(r["bytes"] for r in rows)
                self._room(size)
                conn.execute(INSERT, rows)
                conn.execute(COUNT, {"writer": self.writer_id, "bytes": size})
            self._used += size
        except SQLAlchemyError as exc:
            raise failure(exc, self.where) from None
        except OSError as exc:
            raise StoreUnavailable(f"{self.where}: {exc.strerror or exc}") from None

    def _bucket(self, rate: float, burst: int) -> tuple[float, float]:
        interval = 1.0 / rate
        return interval, (burst - 1) * interval

    def try_wait(self, submitter: str, rate: float, burst: int, now: float | None = None) -> float | None:
        """`wait` for a SQLite store's mapped table when no other process holds it (microseconds: the event
        loop calls it), else None (then `wait`, off the loop)."""
        if self.buckets is None:
            return None
        interval, tolerance = self._bucket(rate, burst)
        return self.buckets.wait(submitter, time.time() if now is None else now, interval, tolerance, 0.0)

    def wait(self, submitter: str, rate: float, burst: int, now: float | None = None) -> float:
        """0 and a token taken if `submitter` (a pseudonym) may send one more, else the seconds until it may: one
        bucket per submitter for every worker and server of this store (a token bucket as GCRA: a bucket is the
        time it is full again)."""
        key, (interval, tolerance) = submitter, self._bucket(rate, burst)
        if self.buckets is not None:
            found = self.buckets.wait(key, time.time() if now is None else now, interval, tolerance, BUCKET_WAIT_S)
            if found is None:
                raise StoreUnavailable(f"the rate buckets of {self.where} are held by another process")
            return found
        assert self.fast is not None
        now = time.time() if now is None else now
        try:
            with self.fast.connect() as conn:
                ok, tat = conn.execute(
                    TAKE, {"client": key, "now": now, "interval": interval, "tolerance": tolerance}
                ).one()
        except SQLAlchemyError as exc:
            raise failure(exc, self.where) from None
        return 0.0 if ok else float(tat) - now - tolerance

    def forget_full_buckets(self, now: float) -> None:
        """A bucket full again is the same as none: keeps the table at the clients of the last minutes."""
        if self.fast is not None:
            with self.fast.connect() as conn:
                conn.execute(text("DELETE FROM buckets WHERE tat < :now"), {"now": now})

    def get(self, ids: Sequence[str]) -> list[Record]:
        with self.read() as conn:
            found = conn.execute(
                text(f"SELECT {', '.join(COLUMNS)} FROM records WHERE id IN :ids").bindparams(_expanding("ids")),
                {"ids": list(ids)},
            )
            return [record_of(r) for r in found]

    def close(self) -> None:
        self.engine.dispose()
        if self.fast is not None:
            self.fast.dispose()


class Buckets:
    """A SQLite store's rate buckets: a table of `slots` (the client's hash, the time its bucket is full again)
    in a file beside the database that every process of this machine maps. A decision holds the file's lock for
    microseconds, where a row in SQLite would queue behind every commit's fsync. A new client whose probe window
    is taken replaces the one whose bucket has been full longest (forgotten, it starts from a full bucket)."""

    SLOT = struct.Struct("<Qd")
    PROBES = 16

    def __init__(self, path: Path, slots: int = 1 << 14) -> None:
        self.path, self.slots, size = path, slots, slots * self.SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "r+b")
        try:  # blocks on disk, not a sparse file: a page first written on a full disk would be SIGBUS
            os.posix_fallocate(fd, 0, size)  # zeros: every slot empty
        except OSError as exc:
            self._file.close()
            raise StoreFull(f"{path}: cannot make the rate buckets' table ({exc.strerror})") from None
        self._map = mmap.mmap(fd, size)
        self._lock = threading.Lock()  # flock excludes other processes; this, the threads of this one

    def wait(self, client: str, now: float, interval: float, tolerance: float, seconds: float) -> float | None:
        """The decision, or None when another process held the table for `seconds`."""
        key = int(client[1:], 16) | 1 << 63  # a pseudonym's hex digits; never 0, the empty slot
        if not (self._lock.acquire(timeout=seconds) if seconds else self._lock.acquire(blocking=False)):
            return None
        try:
            # An open file of its own each time: a flock belongs to the open file (a dup would share it), and on a
            # miss `locked` keeps this one to close when its wait ends.
            fd = os.open(self.path, os.O_RDWR)
            if not locked(fd, seconds, str(self.path)):
                return None
            try:
                first, oldest = key % self.slots, None
                for i in range(self.PROBES):
                    offset = ((first + i) % self.slots) * self.SLOT.size
                    held, tat = self.SLOT.unpack_from(self._map, offset)
                    if held in (key, 0):
                        break
                    if oldest is None or tat < oldest[0]:
                        oldest = (tat, offset)
                else:
                    assert oldest is not None
                    offset, tat = oldest[1], 0.0
                tat = max(tat if held == key else 0.0, now)
                if tat - now > tolerance:
                    return tat - now - tolerance
                self.SLOT.pack_into(self._map, offset, key, tat + interval)
                return 0.0
            finally:
                os.close(fd)
        finally:
            self._lock.release()


def _expanding(name: str) -> Any:
    from sqlalchemy import bindparam

    return bindparam(name, expanding=True)


class Writer:
    """Group commit for a server's worker: the records of concurrent requests go into one transaction,
    and each request's future resolves only once that transaction has committed (or with its error)."""

    BATCH = 128
    PRUNE_S = 60.0  # how often the buckets of clients idle long enough to be full again are forgotten

    def __init__(self, store: Store) -> None:
        self.store, self.pruned = store, time.monotonic()
        self.queue: queue.SimpleQueue[tuple[dict[str, Any], Future[None]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self.thread.start()

    def submit(self, record: Record) -> Future[None]:
        done: Future[None] = Future()
        self.queue.put((row(record), done))
        return done

    def _more(self, pending: dict[str, Future[None]], everything: bool = False) -> list[dict[str, Any]]:
        """What arrived while the first record waited for the write lock: it goes into the same transaction
        (`everything`: all that is queued, to be refused at once with the error that refused the first)."""
        extra: list[dict[str, Any]] = []
        while everything or len(pending) < self.BATCH:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)
                break
            if item[1].set_running_or_notify_cancel():  # a request cancelled meanwhile is neither written nor answered
                extra.append(item[0])
                pending[item[0]["id"]] = item[1]
        return extra

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if not item[1].set_running_or_notify_cancel():
                continue
            pending = {item[0]["id"]: item[1]}
            try:
                self.store.insert([item[0]], functools.partial(self._more, pending))
            except Exception as exc:  # noqa: BLE001  every waiter gets the error; the writer goes on
                if isinstance(exc, StoreUnavailable | StoreFull):  # so would everything queued behind it
                    self._more(pending, everything=True)
                for done in pending.values():
                    done.set_exception(exc)
            else:
                for done in pending.values():
                    done.set_result(None)
            if time.monotonic() - self.pruned > self.PRUNE_S:
                self.pruned = time.monotonic()
                try:
                    self.store.forget_full_buckets(time.time())
                except SQLAlchemyError:
                    pass  # the next batch tells its requests what is wrong; pruning waits for the next minute

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
