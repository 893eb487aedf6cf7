"""A throwaway OpenSSH server on 127.0.0.1 for a real DVC ssh remote (tests and benchmarks).

    with sshd(folder) as server:
        server.url("/srv/dvc")   # ssh://USER@127.0.0.1:PORT/srv/dvc
        server.key               # the private key the client must use

Generates its host key and a user key in `folder`, listens on a free loopback port, lets
only that key in (as the current user) and serves SFTP in-process. `stop()` kills the
server and every session it forked, the way a crashed or unplugged remote goes away;
`start()` brings it back on the same port.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Server:
    def __init__(self, folder: Path) -> None:
        self.folder, self.user, self.port = folder, getpass.getuser(), free_port()
        self.key = folder / "client_key"
        self.proc: subprocess.Popen | None = None
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
        (folder / "authorized_keys").write_bytes((folder / "client_key.pub").read_bytes())
        self.config = folder / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_key'}",
            f"AuthorizedKeysFile {folder / 'authorized_keys'}", f"PidFile {folder / 'sshd.pid'}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "UsePAM no", "StrictModes no", "Subsystem sftp internal-sftp", "MaxStartups 100", "LogLevel ERROR", ""]))

    def url(self, path: str | os.PathLike[str]) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{Path(path).resolve()}"

    def start(self, timeout: float = 10) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation needs it when root
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.proc.stderr.read().decode(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        # The per-connection processes start their own sessions: find them by parentage.
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stderr.close()
        self.proc = None


@contextlib.contextmanager
def sshd(folder: Path) -> Iterator[Server]:
    folder.mkdir(parents=True, exist_ok=True)
    server = Server(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
