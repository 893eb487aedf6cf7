"""mnist-serve under load on loopback, next to mnist-predict's per-image time.

    python benchmarks/bench_serve.py          # needs models/export/model.onnx (dvc repro)

- the server: `mnist-serve` as a real process, with 1 and with 2 worker processes, alternated
  over 5 rounds (this host's speed drifts by tens of per cent within minutes; the median round is
  reported); 8 keep-alive clients (benchmarks/loadgen.py, in this same run, on the same 2 cores)
  post one 200×200 PNG digit per request; requests/s, p50/p90/p99 latency, and the resident
  memory of the server's processes after the run (VmRSS, supervisor and workers summed);
- the baseline: `mnist-predict` on the same image, as a fresh process (cold start, what a
  script calling the CLI per image pays) and per image over a batch of 200 files in one call.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import loadgen

CLIENTS, REQUESTS, SECONDS, ROUNDS = 8, 4000, 60, 5




def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_load(model: Path, image: bytes, workers: int) -> dict:
    command = [shutil.which("mnist-serve") or "mnist-serve", "--model", str(model), "--port", "0",
               "--workers", str(workers)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split(" on ")[1].split()[0].rstrip("/")
        body, kind = loadgen.multipart([("file", "digit.png", "image/png", image)])
        loadgen.run_load(url, body, kind, clients=CLIENTS, requests=200, seconds=10)  # warm-up
        result = loadgen.run_load(url, body, kind, clients=CLIENTS, requests=REQUESTS, seconds=SECONDS)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        result["server_rss_mb"] = round(rss_mb(proc.pid) + sum(rss_mb(int(c)) for c in children), 1)
        result["workers"] = workers
        return result
    finally:
        proc.send_signal(2)
        proc.wait(30)


def predict_times(model: Path, image: bytes) -> dict:
    cli = shutil.which("mnist-predict") or "mnist-predict"
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(200):
            files.append(Path(tmp) / f"{i}.png")
            files[-1].write_bytes(image)
        cold = common.median_time(lambda: subprocess.run([cli, str(files[0]), "--model", str(model)], check=True,
                                                         capture_output=True))
        batch = common.median_time(lambda: subprocess.run([cli, *map(str, files), "--model", str(model)],
                                                          check=True, capture_output=True), repeats=3)
    return {"cold_start_one_image_ms": round(cold * 1000, 1), "per_image_in_200_ms": round(batch / 200 * 1000, 2)}


def main() -> None:
    model = common.ROOT / "models" / "export" / "model.onnx"
    if not model.exists():
        sys.exit("run `dvc repro` first: this benchmark serves models/export/model.onnx")
    image = loadgen.digit_png()
    results: dict = {"image_bytes": len(image), "clients": CLIENTS, "rounds": {1: [], 2: []}}
    for _ in range(ROUNDS):
        for workers in (1, 2):
            run = serve_load(model, image, workers)
            results["rounds"][workers].append(run)
            print(f"mnist-serve, {workers} worker(s): {run['requests_per_second']:.0f} req/s, p50 "
                  f"{run['latency_ms']['p50']} ms, p99 {run['latency_ms']['p99']} ms, statuses {run['statuses']}, "
                  f"RSS {run['server_rss_mb']} MB")
            time.sleep(1)
    for workers, runs in results["rounds"].items():
        median = sorted(runs, key=lambda r: r["requests_per_second"])[len(runs) // 2]
        results[f"median_round_{workers}_worker"] = median
    results["mnist_predict"] = predict_times(model, image)
    print(f"mnist-predict: {results['mnist_predict']}")
    common.save("serve", results)


if __name__ == "__main__":
    main()
