"""Tiny generated MNIST-format datasets, so tests never touch the network."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import torch
import pytest
import yaml

from mnist_pipeline.datasets import DATASETS

SPEC = DATASETS["mnist"]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """Serialise a uint8 tensor as an IDX payload (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, tensor.ndim]) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    return header + tensor.to(torch.uint8).contiguous().numpy().tobytes()


# One fixed 7×7 binary glyph per class, shared by every generated dataset.
GLYPHS = torch.rand(10, 7, 7, generator=torch.Generator().manual_seed(1234)) > 0.5


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: the class's glyph drawn 14×14 at a jittered position, on noise,
    in a class-specific brightness (a cue even a two-layer, globally pooled CNN learns in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.int32)
    offsets = torch.randint(4, 11, (n, 2), generator=g)
    for i, y in enumerate(labels.tolist()):
        glyph = GLYPHS[y].repeat_interleave(2, 0).repeat_interleave(2, 1)
        r, c = offsets[i].tolist()
        images[i, r : r + 14, c : c + 14][glyph] = 93 + 18 * y
    return images.to(torch.uint8), labels.to(torch.uint8)


def write_mirror(folder: Path, n_train: int = 600, n_test: int = 200, seed: int = 0, compressed: bool = True) -> Path:
    """Write the four .gz files of a tiny dataset into `folder` (or, not `compressed`, the decompressed
    files the download stage keeps); return a MNIST_CHECKSUMS json ({"mnist": pins})."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_digits(n_train, seed)
    test_x, test_y = synthetic_digits(n_test, seed + 1)
    pins = {}
    for spec, tensor in ((SPEC.train_images, train_x), (SPEC.train_labels, train_y),
                         (SPEC.test_images, test_x), (SPEC.test_labels, test_y)):
        payload = idx_bytes(tensor)
        if compressed:
            (folder / spec.name).write_bytes(gzip.compress(payload, mtime=0))
        else:
            (folder / spec.payload).write_bytes(payload)
        pins[spec.name] = hashlib.sha256(payload).hexdigest()
    checksums = folder.parent / f"{folder.name}-checksums.json"
    checksums.write_text(json.dumps({"mnist": pins}))
    return checksums


# ---------------------------------------------------------------- a git copy of the repository for dvc runs


def output_roots() -> set[str]:
    """Top-level folders of the pipeline's outputs, as dvc.yaml declares them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])]
    return {o.split("/")[0] for o in outs}


def copy_repo(dest: Path) -> None:
    """The files a fresh clone would have (git-tracked ones, committed metrics included, plus
    uncommitted edits and new source files), without the DVC-tracked outputs."""
    def listed(*flags: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", *flags, "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
        return list(filter(None, out.stdout.split("\0")))

    skip = output_roots()
    untracked = [n for n in listed("-o", "--exclude-standard") if n.split("/")[0] not in skip]
    for name in listed("-c") + untracked:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(args: list[str], repo: Path, env: dict[str, str], check: bool = True, timeout: float = 600):
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def merge(base: dict, changes: dict) -> dict:
    """`changes` written into the nested mapping `base` (as `dvc exp run -S` would, key by key)."""
    for key, value in changes.items():
        if isinstance(value, dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def tiny_repo(work: Path, changes: dict) -> tuple[Path, dict[str, str]]:
    """A git copy of this repository in work/repo whose params.yaml has `changes` (uncommitted), and a
    generated mirror in work/mirror its download stage reads: (repo, env for dvc runs there)."""
    repo = work / "repo"
    checksums = write_mirror(work / "mirror", n_train=600, n_test=200)
    env = git_repo_env(repo, MNIST_MIRROR=str(work / "mirror"), MNIST_CHECKSUMS=str(checksums))
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), changes)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo, env


# The tiny pipeline every dvc test starts from (conftest's session-scoped `tiny_baseline` reproduces it once).
TINY = {
    "data": {"val_size": 100},
    "mlp": {"hidden": [32], "dropout": 0.0,
            "train": {"epochs": 2, "batch_size": 64, "ema": 0.0, "distill": {"teacher": "none"}}},
    "cnn": {"channels": [[4], [8]], "dropout": 0.0, "train": {"epochs": 2, "batch_size": 64, "ema": 0.0}},
    "evaluate": {"batch_size": 100},
    "export": {"parity_samples": 50},
}


def copy_baseline(baseline: tuple[Path, dict[str, str], str], dest: Path) -> tuple[Path, dict[str, str]]:
    """A private copy of the reproduced baseline (workspace, git and DVC cache) at `dest`: (repo, env there)."""
    source, env, _ = baseline
    shutil.copytree(source, dest, symlinks=True)
    return dest, {**env, "PYTHONPATH": str(dest)}


def git_repo_env(repo: Path, **extra: str) -> dict[str, str]:
    """Copy the repository into `repo`, commit it, and return the environment for dvc runs there."""
    copy_repo(repo)
    env = {**os.environ, **extra, "PYTHONPATH": str(repo), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(args, repo, env)
    return env


# ---------------------------------------------------------------- the real server and a real browser


def script_module(name: str, path: Path):
    """A script that is not in a package (a benchmark, a stage, a helper script), loaded by path as `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def benchmark_module(name: str):
    """A module of benchmarks/, under a name of its own."""
    if str(ROOT / "benchmarks") not in sys.path:  # the scripts import their neighbours (`import common`)
        sys.path.append(str(ROOT / "benchmarks"))
    return script_module(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")


def load_stage(name: str):
    """stages/NAME.py, to call its `main` in this process."""
    return script_module(f"stage_script_{name}", ROOT / "stages" / f"{name}.py")


# benchmarks/loadgen.py: the sample uploads (and load generator) the serving benchmark uses too.
loadgen = benchmark_module("loadgen")


@contextlib.contextmanager
def served(model: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`mnist-serve --model MODEL --port 0` as a real process; yields it and its base URL (no trailing /).

    Stops it with SIGINT (Ctrl-C) and checks that it exits cleanly."""
    proc = subprocess.Popen([str(BIN / "mnist-serve"), "--model", str(model), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), line + proc.stderr.read()
        url = loadgen.served_url(line)
        assert url.startswith("http://127.0.0.1:")
        yield proc, url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("mnist-serve did not stop on Ctrl-C") from None
    assert proc.returncode == 0 and "stopped" in rest and "Traceback" not in err, (proc.returncode, rest, err)


def stored(where: str | Path) -> dict:
    """Every record of a feedback store, by id, read as `mnist-feedback export` reads it."""
    from sqlalchemy import text

    from mnist_pipeline.feedback.store import COLUMNS, Store, record_of

    store = Store(where, check=False)
    try:
        with store.read() as conn:
            return {r.id: r for r in map(record_of, conn.execute(text(f"SELECT {', '.join(COLUMNS)} FROM records")))}
    finally:
        store.close()


def _response_complete(got: bytes) -> bool:
    head, found, body = got.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is not None and len(body) >= int(length.group(1))


def exchange(url: str, head: bytes, chunks: Iterable[bytes] = (), timeout: float = 30) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 request over a socket: send `head`, then `chunks` while the server has not answered;
    return its one response as (status, header block, body).

    The response is read while the body is still being sent, as RFC 9110 asks of a client: a server may
    refuse an upload (413) and close before it has all arrived, and a client that reads only after
    sending everything then sees a broken pipe or a reset instead of the answer."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    got, answered = bytearray(), threading.Event()

    def read() -> None:
        try:
            while not _response_complete(bytes(got)):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got.extend(chunk)
        except OSError:
            pass
        finally:
            answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(head)
        for chunk in chunks:
            if answered.is_set():
                break
            sock.sendall(chunk)
    except OSError:
        pass  # the server answered and closed while the body was still on its way
    reader.join(timeout)
    sock.close()
    response, _, body = bytes(got).partition(b"\r\n\r\n")
    status = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert status, f"no HTTP response: {bytes(got)[:200]!r}"
    return int(status.group(1)), response, body


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# The browser tests' one skip condition (under CI=true conftest turns the skip into a failure).
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@contextlib.contextmanager
def chromium(profile: Path):
    """Debian's headless Chromium driven by Selenium through Debian's chromedriver (nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1000,720", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def draw_strokes(driver, canvas, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw polylines on `canvas` with pointer events; points in canvas pixels from its top-left."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.actions.interaction import POINTER_MOUSE

    size = canvas.size
    actions = ActionBuilder(driver, mouse=PointerInput(POINTER_MOUSE, "pen"), duration=0)
    for line in strokes:
        for i, (x, y) in enumerate(line):
            # Selenium offsets are from the element's centre.
            actions.pointer_action.move_to(canvas, int(x - size["width"] / 2), int(y - size["height"] / 2))
            if i == 0:
                actions.pointer_action.pointer_down()
        actions.pointer_action.pointer_up()
    actions.perform()


def trace(digit, scale: float = 10.0, threshold: int = 110) -> list[list[tuple[float, float]]]:
    """Strokes that retrace a 28×28 uint8 digit: one horizontal stroke per run of ink in each row."""
    strokes = []
    for row in range(digit.shape[0]):
        ink = [c for c in range(digit.shape[1]) if int(digit[row, c]) > threshold]
        runs, start = [], None
        for c in ink:
            if start is None:
                start = prev = c
            elif c != prev + 1:
                runs.append((start, prev))
                start = c
            prev = c
        if start is not None:
            runs.append((start, prev))
        y = (row + 0.5) * scale
        strokes += [[((a + 0.5) * scale, y), ((b + 0.5) * scale, y)] for a, b in runs]
    return strokes


def wait_answers(driver, at_least: int, timeout: float = 20) -> None:
    """Wait until the page has shown `at_least` answers and has no request in flight."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.execute_script("return [document.body.dataset.answers || '0', document.body.dataset.busy]")
        if int(state[0]) >= at_least and state[1] != "1":
            return
        time.sleep(0.05)
    raise AssertionError(f"the page showed {state[0]} answers, expected {at_least} (busy={state[1]})")


# ---------------------------------------------------------------- a real Ray cluster on this machine


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# No usage reports; no auth token: the test clusters listen on loopback only, and Ray would otherwise write
# ~/.ray/auth_token for a new local instance and then require it of every later cluster on the machine.
RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


class RayCluster:
    """A Ray head (no CPUs: trials go to the workers) and worker nodes started with `ray start --block`,
    all inside one PID namespace this process owns (`unshare --pid`, root only), so that stopping it,
    or this process dying, ends every process of it and no other Ray on the machine.

    Each node runs in its own process group inside the namespace, so one node can be killed alone.
    Every address is loopback: the nodes use 127.0.0.1, and clients bootstrap through 127.0.0.2,
    which Ray does not rewrite to the machine's network address as it does "127.0.0.1"."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**env, **RAY_TEST_ENV, "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        self.log_dir = log_dir
        # pdeathsig: if this process dies, unshare is killed, and with it (--kill-child) the namespace's init.
        self.owner = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--fork", "--pid",
                                       "--mount-proc", "--kill-child=KILL", "--", "sleep", "infinity"],
                                      env=self.env)
        self.init = self._namespace_init()
        self.port = free_port()
        self.address = f"127.0.0.2:{self.port}"
        self.nodes: list[tuple[subprocess.Popen, int]] = []
        self._node(["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false"])

    def _namespace_init(self) -> int:
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.owner.pid}/task/{self.owner.pid}/children")
            found = children.read_text().split() if children.exists() else []
            if found:
                return int(found[0])
            time.sleep(0.05)
        raise AssertionError("unshare did not start its PID namespace")

    def inside(self, *command: str, cwd: Path | None = None) -> list[str]:
        """`command` run inside the cluster's PID namespace (the sweep driver must be: Ray checks its PID)."""
        return ["nsenter", "--target", str(self.init), "--pid", "--mount", *([f"--wd={cwd}"] if cwd else []),
                "--", *command]

    def _node(self, args: list[str]) -> None:
        ports = [a for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
                 for a in (flag, str(free_port()))]
        start = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                 "--object-store-memory", str(80 << 20), *ports, *args]
        log = open(self.log_dir / f"node{len(self.nodes)}.log", "w")
        proc = subprocess.Popen(self.inside("setsid", "sh", "-c", 'echo $$; exec "$@"', "node", *start),
                                env=self.env, stdout=subprocess.PIPE, stderr=log, text=True)
        self.nodes.append((proc, int(proc.stdout.readline())))  # its process group, inside the namespace

    def add_worker(self, cpus: int = 1) -> None:
        self._node(["--address", self.address, "--num-cpus", str(cpus)])

    def wait_for(self, alive: int, timeout: float = 90) -> None:
        import time

        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(self.inside(sys.executable, "-c", probe, self.address), env=self.env,
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(alive)]:
                return
            time.sleep(1)
        raise AssertionError(f"the cluster never had {alive} live nodes: {out.stdout[-500:]} {out.stderr[-2000:]}")

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of one node: its raylet, agents and the workers running its trials."""
        subprocess.run(self.inside("kill", "-KILL", "--", f"-{self.nodes[index][1]}"), check=True)

    def stop(self) -> None:
        self.owner.kill()  # unshare's --kill-child takes the namespace's init, and the kernel all the rest
        self.owner.wait(30)
        for proc, _ in self.nodes:
            proc.wait(30)
