"""A record of users' feedback, and the frame format of the shards that snapshots write.

    data/feedback/shard-<first id>-<sha256[:12]>.rec   frames, one per record, sorted by id

A frame is `MAGIC | payload length (u32) | crc32 of MAGIC and the length (u32) | crc32 of the
payload (u32) | payload`, and a payload is `header length (u32) | header JSON | the 28×28 float32
image | the upload's bytes (at most KEPT_UPLOAD of them)`. The header carries the format version
`v`; readers ignore fields they do not know, so newer writers do not make older readers call a
record damaged. Frames of the first format, `MFB1` (no length CRC), still read: the segment files
of the store before the database (`mnist-feedback migrate`) hold both. Readers verify each frame's
length by its own CRC, and past damage in the middle of a file they resync at the next frame of
either format whose length and payload verify, and report exactly which bytes they skipped.

The curate stage reads shards through this module alone, so the live store (store.py) is none of
the pipeline's inputs. Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import secrets
import struct
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from mnist_pipeline.errors import PipelineError

DEFAULT_SNAPSHOTS = Path("data/feedback")
PATTERN = "shard-*.rec"
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
    """The offset of the next frame of either format after `offset` whose length and payload verify."""
    found = [at for at in (data.find(m, offset + 1) for m in (MAGIC, MAGIC_V1)) if at != -1]
    while found:
        at = min(found)
        if not isinstance(_frame_at(data, at), str):
            return at
        found = [x for x in (data.find(m, at + 1) for m in (MAGIC, MAGIC_V1)) if x != -1]
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


# Identities anyone can make more of: an anonymous network, a name in an imported file nobody vouched for.
ANONYMOUS_KINDS = frozenset({"client", "import"})
LEGACY_PSEUDONYM = re.compile(r"s[0-9a-f]{15}")


def pseudonym(salt: bytes, kind: str, value: str) -> str:
    """A stable submitter id that does not reveal `value` (an address, a name) without the salt; its first letter
    says whether the identity cost something (`n`: signed in, a token, an operator's name) or not (`a`). Stores
    written before the letter meant anything gave every kind `s`."""
    prefix = "a" if kind in ANONYMOUS_KINDS else "n"
    return prefix + hmac.new(salt, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:15]


def anonymous(submitter: str) -> bool:
    """Whether a pseudonym may be of an identity anyone can multiply: `a`, and an old `s` one, which may be an
    address: nothing in the record says which."""
    return submitter.startswith("a") or LEGACY_PSEUDONYM.fullmatch(submitter) is not None


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob(PATTERN)) if folder.is_dir() else []


def read_shards(folder: Path) -> ReadResult:
    """Every record of every shard, in id order; a damaged shard is an error, not a torn tail."""
    result = read_files(shards(folder))
    problems = result.torn + result.skipped
    if problems:
        raise PipelineError(f"{folder}: damaged shard: {problems[0]} (run `dvc checkout {folder}`)")
    result.records.sort(key=lambda r: r.id)
    return result
