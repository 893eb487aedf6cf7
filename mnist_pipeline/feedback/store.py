"""The live store of users' corrections: append-only segment files, one per writing process.

    STORE/salt                     32 random bytes: the key of the submitter pseudonyms
    STORE/segments/<host>-<pid>-<random>.seg   frames, appended by one process only

A frame is `MAGIC | payload length (u32) | crc32 of the payload (u32) | payload`, and a
payload is `header length (u32) | header JSON | the 28×28 float32 image | the upload's bytes`.
Every writer appends to a file of its own, so writers never wait for each other, in one
machine or on several sharing a volume; nothing is ever rewritten. A record is
acknowledged only after its bytes are written and fdatasync'd. A process killed in the
middle of a write leaves at most one torn frame at the end of its own segment, which no
later write follows (a new process opens a new segment); readers stop there, so a
record is either whole and verified by its CRC or not read at all.

The store has a size bound: the sum of the segment files, checked before each append, plus
a reserve of free disk. Past either, `StoreFull` (HTTP 507): the disk is never filled.
Concurrent writers may each overshoot the bound by the record they are appending.

Nothing here imports torch or onnxruntime: the server's workers and the CLI both use it.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnist_pipeline.errors import PipelineError

DEFAULT_STORE = Path("feedback")  # the live store, relative to the repository root (ignored by git and DVC)
MIN_FREE_BYTES = 256 << 20  # the store refuses rather than take the disk's last bytes
MAGIC = b"MFB1"
FRAME = struct.Struct("<4sII")
U32 = struct.Struct("<I")
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
    target: str = ""  # reviews: the id of the correction reviewed
    verdict: str = ""  # reviews: "accept" | "reject"
    image: np.ndarray | None = field(default=None, compare=False)  # 28×28 float32 in [0, 1], as prepared
    upload: bytes = field(default=b"", compare=False, repr=False)

    def header(self) -> dict[str, Any]:
        keys = ("id", "time", "kind", "submitter", "source")
        extra = (
            ("label", "answer", "probabilities", "model", "upload_type")
            if self.kind == "correction"
            else ("target", "verdict")
        )
        out = {k: getattr(self, k) for k in keys + extra}
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
        image=image,
        upload=upload,
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
    payload = U32.pack(len(header)) + header + image + record.upload
    return FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> Record:
    (size,) = U32.unpack_from(payload)
    if size > MAX_HEADER or 4 + size > len(payload):
        raise ValueError("header length out of range")
    header = json.loads(payload[4 : 4 + size])
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
    torn: list[str]  # "<file>: <why>" for each file whose tail (or middle) could not be read


def read_frames(data: bytes, name: str) -> tuple[list[Record], str | None]:
    """The whole, verified records of one segment or shard, and why reading stopped early, if it did."""
    records: list[Record] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < FRAME.size:
            return records, f"{name}: {len(data) - offset} bytes of a torn frame at offset {offset}"
        magic, size, crc = FRAME.unpack_from(data, offset)
        end = offset + FRAME.size + size
        if magic != MAGIC or size > MAX_PAYLOAD:
            return records, f"{name}: no frame at offset {offset}"
        if end > len(data):
            return records, f"{name}: torn frame at offset {offset} ({len(data) - offset} of {end - offset} bytes)"
        payload = data[offset + FRAME.size : end]
        if zlib.crc32(payload) != crc:
            return records, f"{name}: checksum mismatch at offset {offset}"
        try:
            records.append(decode(payload))
        except (ValueError, TypeError, KeyError) as exc:
            return records, f"{name}: unreadable record at offset {offset} ({exc})"
        offset = end
    return records, None


def read_files(paths: list[Path]) -> ReadResult:
    result = ReadResult([], [])
    for path in paths:
        records, problem = read_frames(path.read_bytes(), path.name)
        result.records += records
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
    """The store's pseudonym key, made once by whichever process comes first (link() is atomic)."""
    path = root / "salt"
    for _ in range(50):
        try:
            salt = path.read_bytes()
            if len(salt) == 32:
                return salt
        except FileNotFoundError:
            pass
        tmp = root / f".salt.{secrets.token_hex(4)}.tmp"
        tmp.write_bytes(secrets.token_bytes(32))
        try:
            os.link(tmp, path)
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
            self._pid = os.getpid()
            self._synced[self._fd] = 0
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the new file's name is durable before any record in it is acknowledged
            finally:
                os.close(dir_fd)
        return self._fd

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
            fd = self._segment()
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                os.ftruncate(fd, start)  # no partial frame stays behind a failed write
                raise StoreFull(f"cannot write to the feedback store: {exc.strerror or exc}") from None
            end = start + len(frame)
        self._sync(fd, end)
        return record.id

    def _sync(self, fd: int, end: int) -> None:
        """Return once the segment is durable up to `end` (an fdatasync by this thread or another)."""
        with self._sync_lock:
            if self._synced.get(fd, 0) >= end:
                return  # a sync that began after this frame was written has covered it
            target = os.lseek(fd, 0, os.SEEK_END)
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise StoreFull(f"cannot sync the feedback store: {exc.strerror or exc}") from None
            self._synced[fd] = target

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._synced.pop(self._fd, None)
                self._fd = None
