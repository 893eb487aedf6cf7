"""MNIST-format datasets: registry, verified download, IDX reader.

A file is kept only once verified: its .gz matches the official checksum, or its
decompressed payload matches a pinned one (mirrors often recompress the files, so
the .gz bytes differ while the data is identical). Sources are tried in order —
`MNIST_MIRROR` first when set, then the dataset's public mirrors — and a source
serving corrupt or truncated data is skipped for the next.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_pipeline.fileio import atomic_path

MIRROR_ENV = "MNIST_MIRROR"
# Extra pinned payload checksums ({file name: sha256 of the decompressed file}) for
# private MNIST-format data, and for the tests, which build tiny IDX files.
CHECKSUMS_ENV = "MNIST_CHECKSUMS"
USER_AGENT = "mnist-pipeline/0.1 (+https://dvc.org)"


@dataclass(frozen=True)
class IdxFile:
    name: str
    gz_md5: str
    raw_sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    train_size: int = 60_000
    test_size: int = 10_000

    @property
    def files(self) -> tuple[IdxFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


DIGITS = tuple(str(d) for d in range(10))

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        train_images=IdxFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                             "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        train_labels=IdxFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432",
                             "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        test_images=IdxFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3",
                            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        test_labels=IdxFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c",
                            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        mirrors=(
            "https://yann.lecun.com/exdb/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=DIGITS,
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        train_images=IdxFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        train_labels=IdxFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        test_images=IdxFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        test_labels=IdxFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        mirrors=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        ),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "kmnist": DatasetSpec(
        name="kmnist",
        train_images=IdxFile("train-images-idx3-ubyte.gz", "bdb82020997e1d708af4cf47b453dcf7"),
        train_labels=IdxFile("train-labels-idx1-ubyte.gz", "e144d726b3acfaa3e44228e80efcd344"),
        test_images=IdxFile("t10k-images-idx3-ubyte.gz", "5c965bf0a639b31b8f53240b1b52f4d7"),
        test_labels=IdxFile("t10k-labels-idx1-ubyte.gz", "7320c461ea6c1c855c0b718fb2a4b134"),
        mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}


class DatasetError(RuntimeError):
    """A download or a data file is unusable; the message says which and why."""


class ChecksumError(DatasetError):
    pass


# ---------------------------------------------------------------- verification


def _digest(data: bytes, algorithm: str) -> str:
    return hashlib.new(algorithm, data).hexdigest()


def extra_checksums(env: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """Payload sha256s pinned by the user through `MNIST_CHECKSUMS` (a JSON file)."""
    path = env.get(CHECKSUMS_ENV)
    if not path:
        return {}
    try:
        pins = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{CHECKSUMS_ENV}={path}: expected a JSON file of {{file name: sha256}}: {exc}") from None
    if not isinstance(pins, dict) or not all(isinstance(v, str) for v in pins.values()):
        raise DatasetError(f"{CHECKSUMS_ENV}={path}: expected a JSON object of {{file name: sha256}}")
    return pins


def verify_file(path: Path, spec: IdxFile, extra: dict[str, str]) -> None:
    """Raise ChecksumError unless `path` holds the official file or a pinned payload."""
    data = path.read_bytes()
    gz_md5 = _digest(data, "md5")
    if gz_md5 == spec.gz_md5:
        return
    try:
        payload = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ChecksumError(f"not a complete gzip file ({len(data)} bytes; {exc})") from None
    payload_sha = _digest(payload, "sha256")
    pinned = [s for s in (spec.raw_sha256, extra.get(spec.name)) if s]
    if payload_sha in pinned:
        return
    raise ChecksumError(
        f"checksum mismatch: .gz md5 {gz_md5} (expected {spec.gz_md5}), "
        f"payload sha256 {payload_sha} (expected {' or '.join(pinned) or 'no pinned payload'})"
    )


# ---------------------------------------------------------------- download


def _mirror_url(mirror: str) -> str:
    """`MNIST_MIRROR` may be a directory, a file:// URL or an http(s):// URL."""
    if "://" in mirror:
        if not mirror.startswith(("file://", "http://", "https://")):
            raise DatasetError(f"{MIRROR_ENV}={mirror!r}: expected a directory or a file://, http:// or https:// URL")
        return mirror.rstrip("/") + "/"
    folder = Path(mirror).expanduser().resolve()
    if not folder.is_dir():
        raise DatasetError(f"{MIRROR_ENV}={mirror!r}: not a directory (expected a folder holding the .gz files, or a URL)")
    return folder.as_uri() + "/"


def sources(spec: DatasetSpec, env: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    mirror = env.get(MIRROR_ENV)
    return ([_mirror_url(mirror)] if mirror else []) + list(spec.mirrors)


def _fetch(url: str, dest: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        expected = response.headers.get("Content-Length")
        written = 0
        for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)
            written += len(chunk)
    if expected is not None and written != int(expected):
        raise ChecksumError(f"truncated: got {written} of {expected} bytes")


def _is_permanent(exc: Exception) -> bool:
    """Errors that another attempt at the same source will not fix."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code < 500 and exc.code != 429
    reason = getattr(exc, "reason", None)
    if isinstance(reason, (FileNotFoundError, PermissionError)):
        return True
    if isinstance(reason, socket.gaierror) and reason.errno != socket.EAI_AGAIN:
        return True  # an unknown host stays unknown; only "temporary failure" is worth a retry
    return isinstance(exc, (FileNotFoundError, PermissionError, ValueError))


def download_file(
    spec: IdxFile,
    urls: list[str],
    folder: Path,
    extra: dict[str, str],
    *,
    timeout: float = 30.0,
    retries: int = 2,
    backoff: float = 1.0,
    log: Callable[[str], None] = lambda msg: None,
) -> str:
    """Make `folder/spec.name` a verified copy; return where it came from ('present' if kept)."""
    dest = folder / spec.name
    if dest.exists():
        try:
            verify_file(dest, spec, extra)
            return "present"
        except ChecksumError as exc:
            log(f"{dest}: {exc}; fetching it again")
    failures: list[str] = []
    for base in urls:
        url = base + spec.name
        for attempt in range(retries + 1):
            try:
                with atomic_path(dest) as tmp:
                    _fetch(url, tmp, timeout)
                    verify_file(tmp, spec, extra)
                return url
            except ChecksumError as exc:
                failures.append(f"{url}: {exc}")
                log(f"{url}: {exc}; trying the next source")
                break
            except (OSError, ValueError, http.client.HTTPException) as exc:
                # URLError, HTTPError and timeouts are OSErrors; a server hanging up mid-body
                # raises http.client.IncompleteRead.
                reason = getattr(exc, "reason", None) or exc
                if _is_permanent(exc) or attempt == retries:
                    failures.append(f"{url}: {reason}")
                    log(f"{url}: {reason}")
                    break
                log(f"{url}: {reason}; retrying in {backoff * 2 ** attempt:.0f} s")
                time.sleep(backoff * 2 ** attempt)
    raise DatasetError(
        f"could not get a verified {spec.name}; tried:\n  - " + "\n  - ".join(failures)
        + f"\nWithout internet access, point {MIRROR_ENV} at a folder or URL holding the four .gz files, "
        f"e.g. `{MIRROR_ENV}=/path/to/mnist dvc repro`."
    )


def download(
    spec: DatasetSpec, folder: Path, env: dict[str, str] | os._Environ[str] = os.environ, **kwargs
) -> dict[str, str]:
    """Fetch and verify the dataset's four files into `folder`; {file name: source}."""
    urls = sources(spec, env)
    extra = extra_checksums(env)
    folder.mkdir(parents=True, exist_ok=True)
    return {f.name: download_file(f, urls, folder, extra, **kwargs) for f in spec.files}


# ---------------------------------------------------------------- IDX reader

_IDX_UBYTE = 0x08


def parse_idx(data: bytes, name: str) -> torch.Tensor:
    """Parse an (uncompressed) IDX payload of unsigned bytes into a uint8 tensor."""
    if len(data) < 4:
        raise DatasetError(f"{name}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] == 0:
        raise DatasetError(
            f"{name}: bad magic number 0x{data[:4].hex()} (expected 0x00000801 for labels or 0x00000803 for images)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated header ({len(data)} bytes, {ndim} dimensions declared)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = 1
    for d in dims:
        size *= d
    if len(data) - header != size:
        raise DatasetError(
            f"{name}: header declares dimensions {list(dims)} ({size} bytes of data) but the file holds {len(data) - header}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def read_idx(path: Path) -> torch.Tensor:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: not a valid gzip file: {exc}") from None
    return parse_idx(raw, str(path))


def read_images(path: Path, size: tuple[int, int] = (28, 28)) -> torch.Tensor:
    images = read_idx(path)
    if images.ndim != 3 or tuple(images.shape[1:]) != size:
        raise DatasetError(f"{path}: expected images of shape N×{size[0]}×{size[1]}, got {list(images.shape)}")
    return images


def read_labels(path: Path, num_classes: int) -> torch.Tensor:
    labels = read_idx(path)
    if labels.ndim != 1:
        raise DatasetError(f"{path}: expected a 1-D label file, got shape {list(labels.shape)}")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DatasetError(f"{path}: label {int(labels.max())} is out of range (expected 0..{num_classes - 1})")
    return labels.long()


def read_split(folder: Path, images: IdxFile, labels: IdxFile, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_images(folder / images.name)
    y = read_labels(folder / labels.name, num_classes)
    if len(x) != len(y):
        raise DatasetError(f"{folder}: {images.name} holds {len(x)} images but {labels.name} holds {len(y)} labels")
    return x, y
