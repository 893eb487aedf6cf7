"""Network download of a registered dataset, verified and bounded.

A file is kept only once verified: its .gz matches the official checksum, or its
decompressed payload matches a pinned one (mirrors often recompress the files, so
the .gz bytes differ while the data is identical). It is kept decompressed, so its
bytes, hence its DVC hash in dvc.lock, do not depend on the mirror that served it. Sources are tried in order —
`MNIST_MIRROR` first when set, then the dataset's public (https) mirrors — and a
source serving corrupt, truncated or oversized data is skipped for the next.

Nothing is trusted to be small: a body is streamed to a temporary file while it is
counted, and refused once it passes the registry's bound; verification inflates in
chunks and stops as soon as the payload passes its known size. Plain http:// is
accepted only from a `MNIST_MIRROR` the user set, and an https source may not
redirect to http.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from mnist_pipeline.datasets import DatasetSpec, IdxFile
from mnist_pipeline.errors import DatasetError
from mnist_pipeline.fileio import atomic_path, scratch_path, sha256_file, write_bytes

MIRROR_ENV = "MNIST_MIRROR"
# Extra pinned payload checksums, {dataset: {file name: sha256 of the decompressed file}},
# for private MNIST-format data and for the tests, which build tiny IDX files.
CHECKSUMS_ENV = "MNIST_CHECKSUMS"
USER_AGENT = "mnist-pipeline/0.1 (+https://dvc.org)"
CHUNK = 1 << 20


class ChecksumError(DatasetError):
    """This source served bytes that are not the file: try the next source."""


def max_gz_bytes(spec: IdxFile) -> int:
    # Deflate never grows data by more than 5 bytes per 16 KiB stored block, plus headers.
    return spec.size + spec.size // 3000 + 4096


# ---------------------------------------------------------------- verification


def extra_checksums(dataset: str, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Payload sha256s the user pinned for `dataset` through `MNIST_CHECKSUMS` (a JSON file)."""
    path = env.get(CHECKSUMS_ENV)
    if not path:
        return {}
    shape = "a JSON object of {dataset: {file name: sha256}}"
    try:
        pins = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{CHECKSUMS_ENV}={path}: expected {shape}: {exc}") from None
    if not isinstance(pins, dict) or not all(
        isinstance(files, dict) and all(isinstance(v, str) for v in files.values()) for files in pins.values()
    ):
        raise DatasetError(f"{CHECKSUMS_ENV}={path}: expected {shape}")
    return pins.get(dataset, {})


def _digests(path: Path, limit: int) -> tuple[str, str | None, str | None]:
    """(md5 of the file, sha256 of its gzip payload, why the payload is unusable).

    Inflates chunk by chunk and gives up once the payload passes `limit` bytes."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    inflate = zlib.decompressobj(wbits=31)  # gzip framing
    size, problem = 0, None
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            md5.update(chunk)
            if problem:
                continue
            data = chunk
            try:
                while data and not inflate.eof:
                    out = inflate.decompress(data, CHUNK)
                    size += len(out)
                    if size > limit:
                        problem = f"payload larger than the {limit:,} bytes this file has"
                        break
                    sha.update(out)
                    data = inflate.unconsumed_tail
            except zlib.error as exc:
                problem = f"not a gzip file ({exc})"
    if not problem and not inflate.eof:
        problem = f"not a complete gzip file ({path.stat().st_size} bytes)"
    return md5.hexdigest(), (None if problem else sha.hexdigest()), problem


def verify_file(path: Path, spec: IdxFile, extra: Mapping[str, str]) -> None:
    """Raise ChecksumError unless `path` holds the official file or a pinned payload."""
    if path.stat().st_size > max_gz_bytes(spec):
        raise ChecksumError(f"{path.stat().st_size:,} bytes, more than a {spec.name} can be")
    gz_md5, payload_sha, problem = _digests(path, spec.size)
    if gz_md5 == spec.gz_md5:
        return
    if problem:
        raise ChecksumError(problem)
    pinned = _pinned(spec, extra)
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
        raise DatasetError(
            f"{MIRROR_ENV}={mirror!r}: not a directory (expected a folder holding the .gz files, or a URL)"
        )
    return folder.as_uri() + "/"


def sources(spec: DatasetSpec, env: Mapping[str, str] = os.environ) -> list[str]:
    """`MNIST_MIRROR` first when set, then the registry's mirrors (all https: tests/test_datasets.py)."""
    mirror = env.get(MIRROR_ENV)
    return ([_mirror_url(mirror)] if mirror else []) + list(spec.mirrors)


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https to anything else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if req.full_url.startswith("https://") and not newurl.startswith("https://"):
            raise ChecksumError(f"refused a redirect from https to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, dest: Path, timeout: float, limit: int) -> None:
    opener = urllib.request.build_opener(_NoDowngrade)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with opener.open(request, timeout=timeout) as response, open(dest, "wb") as out:
        expected = response.headers.get("Content-Length")
        if expected is not None and expected.isdigit() and int(expected) > limit:
            raise ChecksumError(f"announces {int(expected):,} bytes, more than the {limit:,} this file can be")
        written = 0
        for chunk in iter(lambda: response.read(CHUNK), b""):
            written += len(chunk)
            if written > limit:
                raise ChecksumError(f"sent more than the {limit:,} bytes this file can be")
            out.write(chunk)
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


def _pinned(spec: IdxFile, extra: Mapping[str, str]) -> list[str]:
    return [s for s in (spec.raw_sha256, extra.get(spec.name)) if s]


# A payload with no pinned sha256 (KMNIST publishes .gz md5s only) is verified through its .gz at
# download; its sha256 is then kept beside it, so an unchanged payload is present on the next run.
RECORD_SUFFIX = ".sha256"


def _recorded(record: Path) -> list[str]:
    try:
        return [record.read_text().strip()]
    except OSError:
        return []


def _inflate(gz: Path, dest: Path, limit: int) -> None:
    inflate = zlib.decompressobj(wbits=31)
    size = 0
    with open(gz, "rb") as src, open(dest, "wb") as out:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            data = chunk
            while data and not inflate.eof:
                piece = inflate.decompress(data, CHUNK)
                size += len(piece)
                if size > limit:  # verified already, so only a hash collision could get here
                    raise ChecksumError(f"payload larger than the {limit:,} bytes this file has")
                out.write(piece)
                data = inflate.unconsumed_tail


def download_file(
    spec: IdxFile,
    urls: list[str],
    folder: Path,
    extra: Mapping[str, str],
    *,
    timeout: float = 30.0,
    retries: int = 2,
    backoff: float = 1.0,
    log: Callable[[str], None] = lambda msg: None,
) -> str:
    """Make `folder/spec.payload` the verified, decompressed file; return where it came from
    ('present' if kept). The .gz is fetched beside it, verified, inflated and deleted."""
    dest = folder / spec.payload
    stale_gz = folder / spec.name  # what versions before the decompressed layout kept
    stale_gz.unlink(missing_ok=True)
    record = folder / (spec.payload + RECORD_SUFFIX)
    pinned = _pinned(spec, extra)
    if dest.exists():
        known = pinned or _recorded(record)
        if dest.stat().st_size <= spec.size and sha256_file(dest) in known:
            return "present"
        log(
            f"{dest}: "
            + ("checksum mismatch" if known else "no pinned payload checksum to verify it against")
            + "; fetching it again"
        )
    failures: list[str] = []
    for base in urls:
        url = base + spec.name
        for attempt in range(retries + 1):
            try:
                with scratch_path(folder, spec.name) as gz, atomic_path(dest) as tmp:
                    _fetch(url, gz, timeout, max_gz_bytes(spec))
                    verify_file(gz, spec, extra)
                    _inflate(gz, tmp, spec.size)
                if not pinned:  # verified by the official .gz md5 alone: remember what that payload was
                    write_bytes(record, (sha256_file(dest) + "\n").encode())
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
                log(f"{url}: {reason}; retrying in {backoff * 2**attempt:.0f} s")
                time.sleep(backoff * 2**attempt)
    raise DatasetError(
        f"could not get a verified {spec.name}; tried "
        + "; ".join(failures)
        + f". Without internet access, point {MIRROR_ENV} at a folder or URL holding the four .gz files, "
        f"e.g. `{MIRROR_ENV}=/path/to/mnist dvc repro`."
    )


def download(spec: DatasetSpec, folder: Path, env: Mapping[str, str] = os.environ, **kwargs) -> dict[str, str]:
    """Fetch, verify and decompress the dataset's four files into `folder`; {payload name: source}."""
    urls = sources(spec, env)
    extra = extra_checksums(spec.name, env)
    folder.mkdir(parents=True, exist_ok=True)
    return {f.payload: download_file(f, urls, folder, extra, **kwargs) for f in spec.files}
