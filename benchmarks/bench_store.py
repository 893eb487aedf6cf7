"""The feedback store under faults, and the speed of its other operations (issue 35).

    python benchmarks/bench_store.py [--posts 10000]     # needs models/export/model.onnx (dvc repro), Debian's
                                                         # postgresql, and root (a tmpfs for the full disk)

Fault runs: `mnist-serve --feedback` (2 workers) under 8 keep-alive clients posting a realistic
correction (the first MNIST test digit as a 200×200 PNG, as bench_serve.py sends it) until at least
`--posts` are acknowledged with 201, with a fault at a third and at two thirds of the way:
- worker: one worker killed with SIGKILL (uvicorn's supervisor starts another);
- server: the supervisor and every worker killed with SIGKILL, then a new server on the same store
  (and the whole server killed once more at the end);
- postgresql: the store is a real PostgreSQL server (scripts/postgres.py), restarted in immediate
  mode (a crash: no shutdown checkpoint, its WAL replayed);
- disk: a SQLite store on a tmpfs that fills up (`--feedback-reserve-mb 0`, so the disk's own ENOSPC
  answers), then gets some space back (a filler file removed).
After each: every acknowledged id must be in `mnist-feedback export`, and each once.

Operations, on SQLite and on PostgreSQL: a snapshot of 1,000 new records on a store of 10,000 and on a
store of 100,000 (the rest snapshotted before), and `mnist-feedback export` of 100,000 records (jsonl
to /dev/null). Records are written through `Store.append` in batches, with random images and no upload.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import loadgen
import numpy as np
from bench_serve import realistic_upload

from mnist_pipeline.feedback import snapshot
from mnist_pipeline.feedback.records import correction
from mnist_pipeline.feedback.store import Store

FEEDBACK = shutil.which("mnist-feedback") or "mnist-feedback"
SERVE = shutil.which("mnist-serve") or "mnist-serve"
CLIENTS = 8


def postgres_module():
    spec = importlib.util.spec_from_file_location("postgres", common.ROOT / "scripts" / "postgres.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(model: Path, store: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([SERVE, "--model", str(model), "--port", "0", "--workers", "2", "--feedback", store,
                             "--feedback-rate", "1000000", "--feedback-burst", "1000000", *extra],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    return proc, loadgen.served_url(proc.stdout.readline())


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def exported_ids(store: str) -> list[str]:
    out = subprocess.run([FEEDBACK, "--store", store, "export"], capture_output=True, text=True, check=True).stdout
    return [json.loads(line)["id"] for line in out.splitlines()]


def fault_run(name: str, model: Path, store: str, body: bytes, kind: str, posts: int,
              fault: Callable[[subprocess.Popen, loadgen.Burst], subprocess.Popen], extra: tuple[str, ...] = (),
              until: Callable[[loadgen.Burst], bool] | None = None) -> dict:
    proc, url = serve(model, store, *extra)
    began = time.perf_counter()
    burst = loadgen.Burst(url, body, kind, CLIENTS)
    try:
        for share in (1 / 3, 2 / 3):
            burst.wait_for(int(posts * share), timeout=600)
            proc = fault(proc, burst)
        if until is None:
            burst.wait_for(posts, timeout=600)
        else:
            deadline = time.monotonic() + 600
            while not until(burst) and time.monotonic() < deadline:
                time.sleep(0.05)
        if name == "server":
            os.killpg(proc.pid, signal.SIGKILL)  # the end, too, mid-burst
    finally:
        burst.end()
        kill(proc)
    seconds = time.perf_counter() - began
    ids = exported_ids(store)
    acknowledged, stored = set(burst.acknowledged), set(ids)
    result = {"acknowledged": len(burst.acknowledged), "in_export": len(ids),
              "acknowledged_missing_from_export": len(acknowledged - stored),
              "duplicate_ids_in_export": len(ids) - len(stored),
              "committed_not_acknowledged": len(stored - acknowledged),  # answered 503/507 or cut off mid-answer
              "statuses": dict(collections.Counter(burst.statuses)), "connection_errors": burst.errors,
              "503_without_retry_after": burst.retry_after_missing, "seconds": round(seconds, 1)}
    result["all_acknowledged_exported_once"] = (result["acknowledged_missing_from_export"] == 0
                                                and result["duplicate_ids_in_export"] == 0)
    print(f"{name}: {result}", flush=True)
    return result


def faults(model: Path, body: bytes, kind: str, posts: int, pg, work: Path) -> dict:
    def kill_worker(proc, burst):
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(c) for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
        os.kill(max(workers), signal.SIGKILL)
        return proc

    def kill_server(proc, burst):
        kill(proc)
        again, url = serve(model, str(work / "server"))
        burst.retarget(url)
        return again

    def restart_postgres(proc, burst):
        pg.restart(immediate=True)
        return proc

    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(disk)], check=True)
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (24 << 20))

        def free_space(proc, burst):  # at a third: wait for the disk to fill first, then give space back
            deadline = time.monotonic() + 600
            while burst.statuses.count(507) < 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            if filler.exists():
                filler.unlink()
            return proc

        def full_again(burst: loadgen.Burst) -> bool:
            return len(burst.acknowledged) >= posts and burst.statuses[-50:].count(507) == 50

        results = {
            "worker": fault_run("worker", model, str(work / "worker"), body, kind, posts, kill_worker),
            "server": fault_run("server", model, str(work / "server"), body, kind, posts, kill_server),
            "postgresql": fault_run("postgresql", model, pg.database("faults"), body, kind, posts, restart_postgres),
            "disk": fault_run("disk", model, str(disk / "store"), body, kind, posts, free_space,
                              ("--feedback-reserve-mb", "0"), until=full_again),
        }
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    return results


def fill(store: Store, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    probs = np.full(10, 0.1, np.float32)
    for start in range(0, n, 1000):
        store.append([correction(rng.random((28, 28), dtype=np.float32), int(i % 10), probs, "m", f"s{i % 97}", "cli")
                      for i in range(start, min(n, start + 1000))])


def operations(where: str, work: Path) -> dict:
    """Snapshot of 1,000 new records on stores of 10,000 and 100,000; export of 100,000."""
    store, shards = Store(where), work / "shards"
    out: dict = {}
    for total in (10_000, 100_000):
        fill(store, total - 1000 - (0 if total == 10_000 else 10_000), seed=total)
        snapshot.take(store, shards)  # all but the last 1,000
        fill(store, 1000, seed=total + 1)
        began = time.perf_counter()
        taken = snapshot.take(store, shards)
        out[f"snapshot_1000_new_of_{total}_s"] = round(time.perf_counter() - began, 3)
        assert taken.new == 1000 and taken.total == total, taken
        out[f"store_bytes_at_{total}"] = store.used_bytes()
    for form in ("jsonl", "csv"):
        began = time.perf_counter()
        subprocess.run([FEEDBACK, "--store", where, "export", "--format", form], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        out[f"export_100000_{form}_s"] = round(time.perf_counter() - began, 2)
    out["snapshot_ratio_100k_over_10k"] = round(out["snapshot_1000_new_of_100000_s"]
                                                / out["snapshot_1000_new_of_10000_s"], 2)
    store.close()
    print(f"operations on {where.split('://')[0] if '://' in where else 'sqlite'}: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=10_000, help="acknowledged posts per fault run")
    args = parser.parse_args()
    model = common.ROOT / "models" / "export" / "model.onnx"
    if not model.exists():
        raise SystemExit("run `dvc repro` first: this benchmark serves models/export/model.onnx")
    body, kind = loadgen.multipart([("file", "digit.png", "image/png", realistic_upload())], {"label": "7"})
    results: dict = {"clients": CLIENTS, "posts_per_run_at_least": args.posts, "workers": 2}
    with tempfile.TemporaryDirectory() as tmp, postgres_module().postgres() as pg:
        work = Path(tmp)
        results["faults"] = faults(model, body, kind, args.posts, pg, work)
        (work / "ops").mkdir()
        results["operations"] = {"sqlite": operations(str(work / "ops" / "store"), work / "ops"),
                                 "postgresql": operations(pg.database("ops"), work / "pgops")}
    results["postgresql_version"] = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    common.save("store", results)


if __name__ == "__main__":
    main()
