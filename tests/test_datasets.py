import dataclasses
import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from helpers import SPEC, idx_bytes, synthetic_digits, write_mirror
from mnist_pipeline.datasets import DATASETS
from mnist_pipeline.download import (
    ChecksumError,
    _is_permanent,
    _NoDowngrade,
    download,
    extra_checksums,
    verify_file,
)
from mnist_pipeline.errors import DatasetError
from mnist_pipeline.idx import parse_idx, read_images, read_labels, read_split


# ---------------------------------------------------------------- IDX reader

def test_parse_idx_round_trip():
    images, labels = synthetic_digits(30, seed=1)
    assert torch.equal(parse_idx(idx_bytes(images), "x"), images)
    assert torch.equal(parse_idx(idx_bytes(labels), "y"), labels)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "bad magic number 0x00000d03"),
        (lambda b: b"\x01" + b[1:], "bad magic number"),
        (lambda b: b[:-5], "holds"),
        (lambda b: b + b"\x00", "holds"),
        (lambda b: b[:2], "too short"),
        (lambda b: b[:9], "truncated header"),
    ],
)
def test_parse_idx_rejects_corrupt_payloads(mutate, message):
    images, _ = synthetic_digits(4, seed=0)
    with pytest.raises(DatasetError, match=message) as err:
        parse_idx(mutate(idx_bytes(images)), "corrupt-file")
    assert "corrupt-file" in str(err.value)


def test_readers_check_shapes_ranges_and_counts(tmp_path):
    images, labels = synthetic_digits(10, seed=0)
    (tmp_path / "img.gz").write_bytes(gzip.compress(idx_bytes(images[:, :20, :])))
    with pytest.raises(DatasetError, match=r"img.gz: expected images of shape N×28×28"):
        read_images(tmp_path / "img.gz")
    bad_labels = labels.clone()
    bad_labels[3] = 12
    (tmp_path / "lab.gz").write_bytes(gzip.compress(idx_bytes(bad_labels)))
    with pytest.raises(DatasetError, match=r"lab.gz: label 12 is out of range \(expected 0..9\)"):
        read_labels(tmp_path / "lab.gz", 10)
    (tmp_path / "notgz.gz").write_bytes(b"plain bytes")
    with pytest.raises(DatasetError, match="notgz.gz: not a valid gzip file"):
        read_images(tmp_path / "notgz.gz")
    images20, _ = synthetic_digits(20, seed=1)
    (tmp_path / SPEC.test_images.payload).write_bytes(idx_bytes(images20))
    (tmp_path / SPEC.test_labels.payload).write_bytes(idx_bytes(labels))
    with pytest.raises(DatasetError, match="holds 20 images but t10k-labels-idx1-ubyte holds 10 labels"):
        read_split(tmp_path, SPEC.test_images, SPEC.test_labels, 10)


# ---------------------------------------------------------------- verification and download

def test_verify_accepts_pinned_payload_whatever_the_compression(tmp_path):
    pins_file = write_mirror(tmp_path / "m")
    pins = extra_checksums("mnist", {"MNIST_CHECKSUMS": str(pins_file)})
    assert extra_checksums("kmnist", {"MNIST_CHECKSUMS": str(pins_file)}) == {}  # pins are per dataset
    path = tmp_path / "m" / SPEC.train_labels.name
    verify_file(path, SPEC.train_labels, pins)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1))
    verify_file(path, SPEC.train_labels, pins)  # recompressed, same payload: accepted
    with pytest.raises(DatasetError, match="checksum mismatch"):
        verify_file(path, SPEC.train_labels, {})


def mirror_env(good: Path, pins: Path, first: str | None = None) -> dict[str, str]:
    return {"MNIST_MIRROR": first or str(good), "MNIST_CHECKSUMS": str(pins)}


def test_download_from_directory_and_skip_when_present(tmp_path):
    pins = write_mirror(tmp_path / "mirror")
    out = tmp_path / "raw"
    spec = dataclasses.replace(SPEC, mirrors=())
    got = download(spec, out, mirror_env(tmp_path / "mirror", pins), retries=0)
    assert set(got) == {f.payload for f in spec.files}
    assert all(src.startswith("file://") for src in got.values())
    again = download(spec, out, mirror_env(tmp_path / "mirror", pins), retries=0)
    assert set(again.values()) == {"present"}
    assert sorted(p.name for p in out.iterdir()) == sorted(f.payload for f in spec.files)


FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def test_unpinned_payload_verified_by_its_gz_is_kept_on_the_next_run(tmp_path):
    """KMNIST publishes .gz md5s only: its payloads are verified at download, then must count as
    present (not be fetched again on every run) while they are unchanged."""
    write_mirror(tmp_path / "mirror")
    md5s = {f.name: hashlib.md5((tmp_path / "mirror" / f.name).read_bytes()).hexdigest() for f in SPEC.files}
    spec = dataclasses.replace(SPEC, mirrors=(), **{key: dataclasses.replace(f, gz_md5=md5s[f.name], raw_sha256=None)
                                                    for key, f in zip(FILE_KEYS, SPEC.files)})
    out = tmp_path / "raw"
    env = {"MNIST_MIRROR": str(tmp_path / "mirror")}
    assert all(src.startswith("file://") for src in download(spec, out, env, retries=0).values())
    for gz in (tmp_path / "mirror").iterdir():
        gz.unlink()  # nothing to fetch from now: present, or an error
    assert set(download(spec, out, env, retries=0).values()) == {"present"}
    changed = out / SPEC.train_labels.payload
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x09")  # a kept file that changed is not present
    with pytest.raises(DatasetError, match="could not get a verified"):
        download(spec, out, env, retries=0)


def test_kept_files_do_not_depend_on_the_mirror_or_its_compression(tmp_path):
    """dvc.lock hashes data/raw: the official .gz files, a recompressed copy and a second mirror
    must leave the same bytes, or a lock made from one mirror is stale for a user of another."""
    pins = write_mirror(tmp_path / "a")
    recompressed = tmp_path / "b"
    recompressed.mkdir()
    for f in SPEC.files:
        payload = gzip.decompress((tmp_path / "a" / f.name).read_bytes())
        (recompressed / f.name).write_bytes(gzip.compress(payload, compresslevel=1, mtime=12345))
        assert (recompressed / f.name).read_bytes() != (tmp_path / "a" / f.name).read_bytes()
    spec = dataclasses.replace(SPEC, mirrors=())
    kept = {}
    for mirror in ("a", "b"):
        out = tmp_path / f"raw-{mirror}"
        download(spec, out, mirror_env(tmp_path / mirror, pins), retries=0)
        kept[mirror] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert kept["a"] == kept["b"]
    assert kept["a"][SPEC.train_labels.payload] == gzip.decompress((tmp_path / "a" / SPEC.train_labels.name).read_bytes())


def test_a_kept_file_that_changed_is_fetched_again_and_old_gz_layout_is_replaced(tmp_path):
    pins = write_mirror(tmp_path / "mirror")
    out = tmp_path / "raw"
    spec = dataclasses.replace(SPEC, mirrors=())
    download(spec, out, mirror_env(tmp_path / "mirror", pins), retries=0)
    good = (out / SPEC.train_labels.payload).read_bytes()
    (out / SPEC.train_labels.payload).write_bytes(good[:-1] + b"\x09")
    (out / SPEC.test_labels.name).write_bytes(b"a .gz kept by an older version")
    logs: list[str] = []
    got = download(spec, out, mirror_env(tmp_path / "mirror", pins), retries=0, log=logs.append)
    assert got[SPEC.train_labels.payload].startswith("file://") and got[SPEC.test_labels.payload] == "present"
    assert any("checksum mismatch; fetching it again" in line for line in logs)
    assert (out / SPEC.train_labels.payload).read_bytes() == good
    assert sorted(p.name for p in out.iterdir()) == sorted(f.payload for f in SPEC.files)


def test_corrupt_mirror_falls_through_to_next_and_leaves_no_partial_file(tmp_path):
    pins = write_mirror(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in SPEC.files:
        data = (tmp_path / "good" / f.name).read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if "images" in f.name else b"\x1f\x8bjunk")
    spec = dataclasses.replace(SPEC, mirrors=((tmp_path / "good").as_uri() + "/",))
    logs: list[str] = []
    out = tmp_path / "raw"
    got = download(spec, out, mirror_env(tmp_path / "good", pins, first=bad.as_uri()), retries=0, log=logs.append)
    assert all(src.startswith((tmp_path / "good").as_uri()) for src in got.values())
    assert any("not a complete gzip file" in line for line in logs)
    assert sorted(p.name for p in out.iterdir()) == sorted(f.payload for f in SPEC.files)


def test_all_sources_fail_lists_each_and_explains_mirror(tmp_path):
    pins = write_mirror(tmp_path / "good")
    wrong = tmp_path / "wrong"
    write_mirror(wrong, seed=7)  # valid gzip files, other bytes: checksum mismatch
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = dataclasses.replace(SPEC, mirrors=(empty.as_uri() + "/",))
    out = tmp_path / "raw"
    with pytest.raises(DatasetError) as err:
        download(spec, out, mirror_env(wrong, pins), retries=0)
    message = str(err.value)
    assert wrong.as_uri() in message and "checksum mismatch" in message
    assert empty.as_uri() in message
    assert "MNIST_MIRROR" in message
    assert list(out.iterdir()) == []


def test_bad_mirror_setting_is_explained(tmp_path):
    with pytest.raises(DatasetError, match="MNIST_MIRROR='/no/such/dir': not a directory"):
        download(SPEC, tmp_path, {"MNIST_MIRROR": "/no/such/dir"})
    with pytest.raises(DatasetError, match="expected a directory or a file://"):
        download(SPEC, tmp_path, {"MNIST_MIRROR": "ftp://example.org/mnist"})


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `truncate` cuts bodies short, `fail_first` answers 503 once per path."""

    truncate = False
    failed: set[str] = set()
    fail_first = False
    extra_body = 0  # bytes appended past the real file, without announcing them

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        if self.fail_first and self.path not in self.failed:
            self.failed.add(self.path)
            self.send_error(503)
            return
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.exists():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        if not self.extra_body:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 3] if self.truncate else data + b"\0" * self.extra_body)


@pytest.fixture
def http_mirror(tmp_path):
    pins = write_mirror(tmp_path / "served")
    servers = []

    def start(**behaviour):
        handler = type("H", (_Handler,), {**behaviour, "failed": set()})
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tmp_path / "served")))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start, pins
    for server in servers:
        server.shutdown()
        server.server_close()


def test_http_truncated_mirror_is_skipped_and_503_is_retried(tmp_path, http_mirror):
    start, pins = http_mirror
    truncating = start(truncate=True)
    flaky = start(fail_first=True)
    spec = dataclasses.replace(SPEC, mirrors=(flaky,))
    logs: list[str] = []
    got = download(spec, tmp_path / "raw", mirror_env(tmp_path, pins, first=truncating),
                   retries=1, backoff=0.01, timeout=5, log=logs.append)
    assert all(src.startswith(flaky) for src in got.values())
    assert any("truncated" in line for line in logs)
    assert any("retrying" in line for line in logs)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(f.payload for f in SPEC.files)


def test_which_failures_are_retried():
    import socket
    import urllib.error

    unknown_host = urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    dns_hiccup = urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert _is_permanent(unknown_host) and not _is_permanent(dns_hiccup)
    assert _is_permanent(urllib.error.HTTPError("u", 404, "Not Found", {}, None))
    assert not _is_permanent(urllib.error.HTTPError("u", 503, "Unavailable", {}, None))
    assert not _is_permanent(TimeoutError("timed out"))


# ---------------------------------------------------------------- bounds: a hostile mirror cannot exhaust memory or disk

def small(spec, size):
    return dataclasses.replace(spec, size=size)


def test_body_longer_than_the_file_can_be_is_cut_off(tmp_path, http_mirror):
    start, pins = http_mirror
    endless = start(extra_body=5 << 20)  # 5 MB more than the tiny labels file, no Content-Length
    logs: list[str] = []
    spec = dataclasses.replace(SPEC, mirrors=(), train_labels=small(SPEC.train_labels, 100))
    with pytest.raises(DatasetError, match="sent more than the"):
        download(spec, tmp_path / "raw", mirror_env(tmp_path, pins, first=endless), retries=0, log=logs.append)
    assert not (tmp_path / "raw" / SPEC.train_labels.payload).exists()
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")], "no temp file left"


def test_announced_oversize_is_refused_before_reading(tmp_path, http_mirror):
    start, pins = http_mirror
    url = start()
    with pytest.raises(DatasetError, match="announces .* bytes, more than"):
        download(dataclasses.replace(SPEC, mirrors=(), train_images=small(SPEC.train_images, 10)),
                 tmp_path / "raw", mirror_env(tmp_path, pins, first=url), retries=0)


def test_gzip_bomb_is_not_inflated_past_the_known_size(tmp_path):
    path = tmp_path / SPEC.train_labels.name
    path.write_bytes(gzip.compress(b"\0" * (50 << 20)))  # 50 KB on disk, 50 MB inflated
    with pytest.raises(ChecksumError, match="payload larger than the 60,008 bytes"):
        verify_file(path, SPEC.train_labels, {})


def test_https_may_not_redirect_to_http():
    import urllib.request

    request = urllib.request.Request("https://mirror.example/mnist/x.gz")
    with pytest.raises(ChecksumError, match="refused a redirect from https"):
        _NoDowngrade().redirect_request(request, None, 302, "Found", {}, "http://evil.example/x.gz")
    followed = _NoDowngrade().redirect_request(request, None, 302, "Found", {}, "https://other.example/x.gz")
    assert followed.full_url == "https://other.example/x.gz"


def test_public_mirrors_are_https_only():
    # Plain http:// is accepted only from a MNIST_MIRROR the user set.
    assert all(m.startswith("https://") for spec in DATASETS.values() for m in spec.mirrors)


def test_every_dataset_pins_payloads_or_says_why_not():
    for spec in DATASETS.values():
        pinned = [f.raw_sha256 for f in spec.files]
        assert all(pinned) or spec.name == "kmnist", f"{spec.name}: recompressed copies would be refused"
        assert len({f.size for f in spec.files}) == 4


@pytest.mark.slow
def test_stale_temp_files_are_removed_by_the_download_stage(tmp_path):
    import subprocess
    import sys

    pins = write_mirror(tmp_path / "mirror")
    out = tmp_path / "raw"
    out.mkdir()
    stale = out / ".train-images-idx3-ubyte.k2j4h1x9.tmp.gz"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"half a download")
    root = Path(__file__).resolve().parents[1]
    env = {**mirror_env(tmp_path / "mirror", pins), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(root / "stages/download.py"), str(out),
                             "--params", str(root / "params.yaml")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and f"removed {stale}" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f.payload for f in SPEC.files)
