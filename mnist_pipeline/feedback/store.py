"""The live store of users' corrections: append-only segment files, one per writing process.

    STORE/salt                     32 random bytes: the key of the submitter pseudonyms
    STORE/segments/<host>-<pid>-<random>.seg   frames, appended by one process only

A frame is `MAGIC | payload length (u32) | crc32 of MAGIC and the length (u32) | crc32 of the
payload (u32) | payload`, and a payload is `header length (u32) | header JSON | the 28×28 float32
image | the upload's bytes (at most KEPT_UPLOAD of them)`. The header carries the format version
`v`; readers ignore fields they do not know, so newer writers do not make older readers call a
record damaged. (Frames of the first format, `MFB1`, without the length CRC, are still read.)

Every writer appends to a file of its own, so writers never wait for each other, in one
machine or on several sharing a volume; nothing is ever rewritten. A record is
acknowledged only after its bytes are written and fdatasync'd. After any failed write or sync
the writer leaves that segment for a new one, so no later record sits behind a frame that may
be partial. A process killed in the middle of a write leaves at most one torn frame at the end
of its own segment. Readers verify each frame's length by its own CRC, and past damage in the
middle of a file (a torn frame a failed truncate left, a bad sector) they resync at the next
frame whose length and payload both verify, and report exactly which bytes they skipped.

The salt (the pseudonym key) is written 0600 and fsync'd with its folder before first use; a store
that holds records but has lost its salt refuses to make a new one, since every pseudonym would
change (caps, distrust and the user split would silently reset).

The store has a size bound: the sum of the segment files, checked before each append, plus
a reserve of free disk. Past either, `StoreFull` (HTTP 507): the disk is never filled.
Concurrent writers may each overshoot the bound by the record they are appending.

Nothing here imports torch or onnxruntime: the server's workers and the CLI both use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import itertools
import json
import os
import secrets
import shutil
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import fsync_dir

DEFAULT_STORE = Path("feedback")  # the live store, relative to the repository root (ignored by git and DVC)
MIN_FREE_BYTES = 256 << 20  # the store refuses rather than take the disk's last bytes
MAGIC_V1, MAGIC = b"MFB1", b"MFB2"
FRAME_V1 = struct.Struct("<4sII")  # magic, payload length, payload crc
FRAME = struct.Struct("<4sIII")  # magic, payload length, crc of magic + length, payload crc
U32 = struct.Struct("<I")
FORMAT_VERSION = 2
KEPT_UPLOAD = 256 << 10  # of an upload (up to 4 MiB), a record keeps at most this: the image is what trains
SIDE = 28
IMAGE_BYTES = SIDE * SIDE * 4  # float32, as images.prepare returns it
MAX_HEADER = 64 << 10
MAX_PAYLOAD = 64 << 20  # a frame claiming more is damage, not a record
KINDS = ("correction", "review")
VERDICTS = ("accept", "reject")


class StoreFull(PipelineError):
    """The store is at its size bound, or the disk is nearly full: nothing was written."""


class StoreError(PipelineError):
    """A store that cannot be opened or written (permissions, not a store folder)."""


@dataclass(frozen=True)
class Record:
    """One correction (an image, its label, what the model said) or one review verdict."""

    id: str
    time: float
    kind: str  # "correction" | "review"
    submitter: str  # a pseudonym (salted hash), never an address or a name
    source: str  # "web" | "cli"
    label: int = -1  # corrections: the digit the user says it is
    answer: int = -1  # corrections: the model's top class when it was corrected
    probabilities: tuple[float, ...] = ()  # corrections: the model's calibrated probabilities
    model: str = ""  # corrections: sha256 of the exported model file that answered
    upload_type: str = ""  # the upload's media type as received
    upload_size: int = 0  # the upload's size in bytes; its bytes are kept only up to KEPT_UPLOAD
    target: str = ""  # reviews: the id of the correction reviewed
    verdict: str = ""  # reviews: "accept" | "reject"
    image: np.ndarray | None = field(default=None, compare=False)  # 28×28 float32 in [0, 1], as prepared
    upload: bytes = field(default=b"", compare=False, repr=False)

    def header(self) -> dict[str, Any]:
        keys = ("id", "time", "kind", "submitter", "source")
        extra = (
            ("label", "answer", "probabilities", "model", "upload_type", "upload_size")
            if self.kind == "correction"
            else ("target", "verdict")
        )
        out = {"v": FORMAT_VERSION, **{k: getattr(self, k) for k in keys + extra}}
        if self.kind == "correction":
            out["probabilities"] = [round(float(p), 6) for p in self.probabilities]
        return out


def correction(
    image: np.ndarray,
    label: int,
    probabilities: np.ndarray,
    model: str,
    submitter: str,
    source: str,
    upload: bytes = b"",
    upload_type: str = "",
) -> Record:
    """A correction as the server and the CLI both record it."""
    return Record(
        id=new_id(),
        time=round(time.time(), 3),
        kind="correction",
        submitter=submitter,
        source=source,
        label=label,
        answer=int(np.argmax(probabilities)),
        probabilities=tuple(float(p) for p in probabilities),
        model=model,
        upload_type=upload_type,
        upload_size=len(upload),
        image=image,
        upload=upload if len(upload) <= KEPT_UPLOAD else b"",
    )


_SEQUENCE = itertools.count()  # orders one process's ids within a millisecond ("the latest label wins")


def new_id() -> str:
    """Time-ordered and unique across processes and machines: milliseconds, this process's sequence
    number, then 40 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}{next(_SEQUENCE) % 0x10000:04x}{secrets.token_hex(5)}"


def encode(record: Record) -> bytes:
    header = json.dumps(record.header(), separators=(",", ":"), sort_keys=True).encode()
    if record.kind == "correction":
        if record.image is None or record.image.shape != (SIDE, SIDE):
            raise ValueError("a correction carries the 28×28 prepared image")
        image = np.ascontiguousarray(record.image, dtype="<f4").tobytes()
    else:
        image = b""
    payload = U32.pack(len(header)) + header + image + record.upload[:KEPT_UPLOAD]
    return FRAME.pack(MAGIC, len(payload), _length_crc(len(payload)), zlib.crc32(payload)) + payload


def _length_crc(size: int) -> int:
    return zlib.crc32(MAGIC + U32.pack(size))


FIELDS = frozenset(f.name for f in fields(Record))


def decode(payload: bytes) -> Record:
    (size,) = U32.unpack_from(payload)
    if size > MAX_HEADER or 4 + size > len(payload):
        raise ValueError("header length out of range")
    header = {k: v for k, v in json.loads(payload[4 : 4 + size]).items() if k in FIELDS}  # newer fields ignored
    if header.get("kind") not in KINDS:
        raise ValueError(f"unknown record kind {header.get('kind')!r}")
    rest = payload[4 + size :]
    if header["kind"] == "correction":
        if len(rest) < IMAGE_BYTES:
            raise ValueError("correction without its image")
        image = np.frombuffer(rest[:IMAGE_BYTES], dtype="<f4").reshape(SIDE, SIDE).astype(np.float32)
        header["probabilities"] = tuple(header["probabilities"])
        return Record(**header, image=image, upload=bytes(rest[IMAGE_BYTES:]))
    return Record(**header)


@dataclass
class ReadResult:
    records: list[Record]
    torn: list[str]  # "<file>: <why>" for each file whose last bytes are a torn frame (a writer killed mid-record)
    skipped: list[str] = field(default_factory=list)  # "<file>: N bytes at offset O (why)": damage mid-file


def _frame_at(data: bytes, offset: int) -> tuple[int, bytes] | str:
    """(end, payload) of the verified frame at `offset`, or why there is none."""
    if len(data) - offset < FRAME_V1.size:
        return f"{len(data) - offset} bytes of a torn frame"
    magic = data[offset : offset + 4]
    if magic == MAGIC:
        if len(data) - offset < FRAME.size:
            return f"{len(data) - offset} bytes of a torn frame"
        _, size, length_crc, crc = FRAME.unpack_from(data, offset)
        if length_crc != _length_crc(size):
            return "damaged frame header"
        start = offset + FRAME.size
    elif magic == MAGIC_V1:
        _, size, crc = FRAME_V1.unpack_from(data, offset)
        if size > MAX_PAYLOAD:
            return "damaged frame header"
        start = offset + FRAME_V1.size
    else:
        return "no frame"
    end = start + size
    if end > len(data):
        return f"torn frame ({len(data) - offset} of {end - offset} bytes)"
    payload = data[start:end]
    return (end, payload) if zlib.crc32(payload) == crc else "checksum mismatch"


def _resync(data: bytes, offset: int) -> int | None:
    """The offset of the next frame after `offset` whose length and payload both verify."""
    at = data.find(MAGIC, offset + 1)
    while at != -1:
        if not isinstance(_frame_at(data, at), str):
            return at
        at = data.find(MAGIC, at + 1)
    return None


@dataclass
class Scan:
    records: list[Record]
    end: int  # where the whole frames end: the start of the torn tail, or the end of the data
    torn: str | None  # "<name>: <why> at offset O" when the data ends in a torn frame
    skipped: list[str]  # "<name>: N bytes at offset O (why)": damage in the middle, resynced past


def scan(data: bytes, name: str, offset: int = 0) -> Scan:
    """The whole, verified records of one segment or shard, from `offset` (the start of a frame) on."""
    records: list[Record] = []
    skipped: list[str] = []
    while offset < len(data):
        found = _frame_at(data, offset)
        problem = found if isinstance(found, str) else None
        if not isinstance(found, str):
            end, payload = found
            try:
                records.append(decode(payload))
                offset = end
                continue
            except (ValueError, TypeError, KeyError) as exc:
                problem = f"unreadable record ({exc})"
        after = _resync(data, offset)
        if after is None:
            return Scan(records, offset, f"{name}: {problem} at offset {offset}", skipped)
        skipped.append(f"{name}: {after - offset} bytes at offset {offset} ({problem})")
        offset = after
    return Scan(records, offset, None, skipped)


def read_frames(data: bytes, name: str) -> tuple[list[Record], str | None, list[str]]:
    """The whole, verified records of one segment or shard; the torn tail, if any; the damage skipped
    in the middle (each `<name>: N bytes at offset O (why)`)."""
    found = scan(data, name)
    return found.records, found.torn, found.skipped


def read_files(paths: list[Path]) -> ReadResult:
    result = ReadResult([], [])
    for path in paths:
        records, problem, skipped = read_frames(path.read_bytes(), path.name)
        result.records += records
        result.skipped += skipped
        if problem:
            result.torn.append(problem)
    return result


def segments(root: Path) -> list[Path]:
    folder = root / "segments"
    return sorted(p for p in folder.iterdir() if p.suffix == ".seg") if folder.is_dir() else []


def read_store(root: Path) -> ReadResult:
    """Every whole record in the store, in id order (time, then random)."""
    result = read_files(segments(root))
    result.records.sort(key=lambda r: r.id)
    return result


def load_salt(root: Path) -> bytes:
    """The store's pseudonym key, made once by whichever process comes first (link() is atomic), 0600,
    and durable (file and folder fsync'd) before anything uses it. A store that already holds records
    and has lost its salt is refused: a new salt would silently give every submitter a new pseudonym."""
    path = root / "salt"
    for _ in range(50):
        try:
            salt = path.read_bytes()
            if len(salt) == 32:
                return salt
        except FileNotFoundError:
            if segments(root) and any(p.stat().st_size for p in segments(root)):
                raise StoreError(
                    f"{path} is missing but the store holds records: a new salt would change every pseudonym "
                    "(rate limits, caps and the user split). Restore the salt from a backup; start a new "
                    "store only on purpose"
                ) from None
        tmp = root / f".salt.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            fsync_dir(root)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    raise StoreError(f"{path}: not a 32-byte salt; remove it only if the store is new")


def pseudonym(salt: bytes, kind: str, value: str) -> str:
    """A stable submitter id that does not reveal `value` (an address, a name) without the salt."""
    return "s" + hmac.new(salt, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:15]


class Store:
    """One process's writer: appends records to its own segment file, durably, within the bound."""

    def __init__(self, root: Path, max_bytes: int, min_free: int = MIN_FREE_BYTES) -> None:
        self.root, self.max_bytes, self.min_free = Path(root), max_bytes, min_free
        try:
            (self.root / "segments").mkdir(parents=True, exist_ok=True)
            self.salt = load_salt(self.root)
        except OSError as exc:
            raise StoreError(f"{self.root}: cannot use it as a feedback store ({exc.strerror or exc})") from None
        self._lock = threading.Lock()  # the threads of one process share its segment
        self._sync_lock = threading.Lock()
        self._synced: dict[int, int] = {}  # segment fd → bytes known to be on disk
        self._written: dict[int, int] = {}  # segment fd → end of its last whole frame
        self._failed: set[int] = set()  # segments whose fdatasync failed: nothing more in them is acknowledged
        self._retired: list[int] = []  # segments left after an error, closed with the store
        self._fd: int | None = None
        self._pid = 0

    def submitter(self, kind: str, value: str) -> str:
        return pseudonym(self.salt, kind, value)

    def used_bytes(self) -> int:
        total = 0
        with os.scandir(self.root / "segments") as entries:
            for entry in entries:
                if entry.name.endswith(".seg"):
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        pass
        return total

    def _segment(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child writes a file of its own
            name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.seg"
            folder = self.root / "segments"
            self._fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
            # Held while this process may append, before any byte is written: `mnist-feedback retire`
            # removes only segments that are unlocked and not empty, so never one still being written.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._pid = os.getpid()
            self._synced[self._fd] = self._written[self._fd] = 0
            fsync_dir(folder)  # the new file's name is durable before any record in it is acknowledged
        return self._fd

    def _retire(self, fd: int) -> None:
        """Leave a segment after a failed write or sync: later records go to a new one, never behind a
        frame that may be partial. Its fd stays open until the threads syncing it are done with it."""
        if self._fd == fd:
            self._fd = None
            self._retired.append(fd)

    def append(self, record: Record) -> str:
        """Write `record` and return its id once it is on disk; StoreFull when over the bound.

        Group commit: the write happens under the lock, the fdatasync outside it, and one
        fdatasync covers every frame written before it, so threads that append together share it.
        """
        frame = encode(record)
        with self._lock:
            used = self.used_bytes()
            if used + len(frame) > self.max_bytes:
                raise StoreFull(f"the feedback store is full ({used:,} of {self.max_bytes:,} bytes)")
            if shutil.disk_usage(self.root).free - len(frame) < self.min_free:
                raise StoreFull(f"the disk under {self.root} has less than {self.min_free:,} bytes free")
            try:
                fd = self._segment()
            except OSError as exc:
                raise StoreFull(f"cannot open a segment of the feedback store: {exc.strerror or exc}") from None
            start = self._written[fd]
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                self._retire(fd)
                try:
                    os.ftruncate(fd, start)  # best effort: readers resync past a partial frame anyway
                except OSError:
                    pass
                raise StoreFull(f"cannot write to the feedback store: {exc.strerror or exc}") from None
            end = self._written[fd] = start + len(frame)
        self._sync(fd, end)
        return record.id

    def _sync(self, fd: int, end: int) -> None:
        """Return once the segment is durable up to `end` (an fdatasync by this thread or another)."""
        with self._sync_lock:
            if self._synced.get(fd, 0) >= end:
                return  # a sync that began after this frame was written has covered it
            if fd in self._failed:  # Linux may report the next fdatasync as a success though pages were lost
                raise StoreFull("cannot sync the feedback store: an earlier sync of this segment failed")
            with self._lock:  # whole frames only: a write in progress is not covered by this sync
                target = self._written[fd]
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._lock:
                    self._retire(fd)  # after a failed fdatasync the page cache may not match the disk
                self._failed.add(fd)
                raise StoreFull(f"cannot sync the feedback store: {exc.strerror or exc}") from None
            self._synced[fd] = target

    def close(self) -> None:
        with self._lock:
            for fd in [*self._retired, *([self._fd] if self._fd is not None else [])]:
                os.close(fd)
                for marks in (self._synced, self._written):
                    marks.pop(fd, None)
            self._fd, self._retired = None, []
