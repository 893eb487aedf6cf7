"""Push and pull of the full artifact set over a real ssh DVC remote, against scp.

    python benchmarks/bench_remote.py [--repeats 3]      # after `dvc repro` in this workspace

Clones this repository, fills the clone's cache from this workspace's (everything the
committed dvc.lock names: raw and processed data, checkpoint, exported models, figures),
starts an OpenSSH server on loopback (scripts/sshd.py), then for each repeat times
`dvc push` to an empty remote folder and `dvc pull` into a fresh clone with an empty cache.
The baseline is `scp -r` of the same remote folder over the same server: the transport
alone, with none of DVC's hashing, checking and bookkeeping. Writes
benchmarks/results/remote.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

import common  # noqa: E402

DVC = shutil.which("dvc") or "dvc"


def _sshd():
    spec = importlib.util.spec_from_file_location("sshd", common.ROOT / "scripts" / "sshd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    common.run(args, cwd)
    return time.perf_counter() - start


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache = common.ROOT / ".dvc" / "cache"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a = common.clone(work, "a", shared_cache=False)
        common.run([DVC, "remote", "add", "workspace-cache", str(cache)], a)  # a DVC 3 cache is laid out like a remote
        common.run([DVC, "pull", "-r", "workspace-cache"], a)
        common.run([DVC, "remote", "remove", "workspace-cache"], a)
        if "up to date" not in common.run([DVC, "status"], a):
            raise SystemExit("this workspace's cache lacks outputs of the committed dvc.lock: run `dvc repro` first")
        with _sshd().sshd(work / "sshd") as server:
            push, pull, scp = [], [], []
            for i in range(args.repeats):
                remote = work / f"remote-{i}"
                common.run([DVC, "remote", "add", "-f", "-d", "storage", server.url(remote)], a)
                common.run([DVC, "remote", "modify", "--local", "storage", "keyfile", str(server.key)], a)
                push.append(timed([DVC, "push"], a))
                files, size = folder_size(remote)
                b = work / f"b-{i}"
                common.run(["git", "clone", "-q", str(a), str(b)], work)
                common.run(["cp", str(a / ".dvc" / "config"), str(b / ".dvc" / "config")], work)
                common.run([DVC, "remote", "modify", "--local", "storage", "keyfile", str(server.key)], b)
                pull.append(timed([DVC, "pull"], b))
                if "up to date" not in common.run([DVC, "status"], b):
                    raise SystemExit("the pulled clone is not up to date")
                scp.append(timed(["scp", "-q", "-r", "-i", str(server.key), "-P", str(server.port),
                                  "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                  str(remote), f"{server.user}@127.0.0.1:{work / f'scp-{i}'}"], work))
                print(f"repeat {i + 1}: push {push[-1]:.1f} s, pull {pull[-1]:.1f} s, scp -r {scp[-1]:.1f} s "
                      f"({files} objects, {size / 1e6:.1f} MB)")
    results = {
        "objects": files, "bytes": size, "megabytes": round(size / 1e6, 1), "repeats": args.repeats,
        "push_seconds_median": round(statistics.median(push), 2), "pull_seconds_median": round(statistics.median(pull), 2),
        "scp_seconds_median": round(statistics.median(scp), 2),
        "push_seconds": [round(t, 2) for t in push], "pull_seconds": [round(t, 2) for t in pull],
        "scp_seconds": [round(t, 2) for t in scp],
        "push_vs_scp": round(statistics.median(push) / statistics.median(scp), 2),
        "pull_vs_scp": round(statistics.median(pull) / statistics.median(scp), 2),
        "transport": "OpenSSH server on 127.0.0.1 (loopback), dvc-ssh client; baseline scp -r of the same objects",
    }
    common.save("remote", results)


if __name__ == "__main__":
    main()
