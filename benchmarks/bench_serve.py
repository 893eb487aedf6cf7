"""mnist-serve under load on loopback, measured with ApacheBench (`ab`, Debian's apache2-utils).

    python benchmarks/bench_serve.py          # needs models/export/model.onnx and data/processed (dvc repro)

- throughput: `ab -k -c 8 -n 4000` posting a realistic upload (the first MNIST test digit, inverted
  to dark ink on white and upscaled to 200×200: a 4.7 KB PNG), against `mnist-serve` with 1 and
  with 2 workers, alternated over ROUNDS rounds (this host's speed drifts within minutes; the
  median round is reported); requests/s, p50/p99 latency, resident memory of the server's
  processes (supervisor and workers, each and summed). The same run's ceiling: `ab` on `/healthz`,
  a request that does no work, so `predict / healthz` is the share of the server's bare request
  rate that the model's work leaves;
- the stall check: 8 concurrent clients each posting the 16-file request of the stall report
  (`loadgen.heavy_files`: 64-MP PNGs, refused from their header, and 9-MP RGBA PNGs, prepared),
  with `/healthz` timed by a second `ab` meanwhile, one request at a time: its p99, and the
  worker's peak memory;
- `POST /feedback` (with `--feedback`, the same upload and a label) against `/predict` on the same
  2-worker server, alternated over ROUNDS rounds, with a fresh SQLite store and with a fresh database
  on a real PostgreSQL server on this machine (scripts/postgres.py): requests/s, latency, peak memory;
  every 201 is a committed transaction (docs/feedback.md);
- the fleet: two 1-worker servers sharing one PostgreSQL store, each under its own `ab` at once,
  against one 1-worker server on such a store alone, alternated over ROUNDS rounds;
- the switch under load: `ab -k -c 8` for 30 s on a 2-worker server following a model base path
  (`--model DIR`), with a promotion (`registry.publish`, as `mnist-promote` does) 10 s in and
  `mnist-promote rollback` 10 s later, against the same 30 s with no switch: non-2xx answers, p99,
  and the seconds from each step until `/healthz` names the new model 20 times running (both workers);
- where a request's CPU goes: each step of one request timed in this process (multipart parsing,
  decoding, preparation, inference, the answer's PNG and JSON), median of repeats.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

import common
import loadgen
from mnist_pipeline import images, registry
from mnist_pipeline.exported import load_model
from mnist_pipeline.fileio import sha256_file
from mnist_pipeline.serving.app import WEB_MAX_PIXELS, compact_json, png_data_url

CLIENTS, REQUESTS, ROUNDS, HEALTH_SECONDS = 8, 4000, 3, 5
SWITCH_SECONDS, SWITCH_AT, STREAK = 30, 10, 20
AB = shutil.which("ab")


def realistic_upload() -> bytes:
    images_, _ = common.processed()["test"]
    digit = Image.fromarray(255 - images_[0].numpy()).resize((200, 200), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    digit.save(buffer, "PNG")
    return buffer.getvalue()


def ab(url: str, *args: str, body: Path | None = None, kind: str = "") -> dict:
    """One `ab` run: requests/s, latency percentiles (ms), failed and non-2xx counts."""
    command = [AB, "-q", *args] + (["-p", str(body), "-T", kind] if body else []) + [url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    number = lambda pattern: float(m.group(1)) if (m := re.search(pattern, out, re.M)) else 0.0  # noqa: E731
    latency = {f"p{q}": number(rf"^\s+{q}%\s+(\d+)") for q in (50, 90, 99)}
    latency["max"] = number(r"^\s+100%\s+(\d+)")
    latency["mean"] = number(r"Time per request:\s+([\d.]+) \[ms\] \(mean\)")  # ab's percentiles are whole ms
    return {"requests": int(number(r"Complete requests:\s+(\d+)")), "requests_per_second": number(r"Requests per second:\s+([\d.]+)"),
            "failed": int(number(r"Failed requests:\s+(\d+)")), "non_2xx": int(number(r"Non-2xx responses:\s+(\d+)")),
            "latency_ms": latency}


def start(model: Path, workers: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """`mnist-serve` with `workers` workers: (the process, its base URL)."""
    command = [shutil.which("mnist-serve") or "mnist-serve", "--model", str(model), "--port", "0",
               "--workers", str(workers), *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    return proc, loadgen.served_url(proc.stdout.readline())


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(30)


def processes(proc: subprocess.Popen) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [proc.pid, *map(int, children)]


def throughput(model: Path, body: Path, kind: str, workers: int) -> dict:
    proc, url = start(model, workers)
    try:
        ab(url + "/predict", "-k", "-c", str(CLIENTS), "-n", "500", body=body, kind=kind)  # warm-up
        result = ab(url + "/predict", "-k", "-c", str(CLIENTS), "-n", str(REQUESTS), body=body, kind=kind)
        result["healthz"] = ab(url + "/healthz", "-k", "-c", str(CLIENTS), "-n", str(REQUESTS))
        rss = {pid: round(loadgen.memory_kb(pid, "VmRSS") / 1024, 1) for pid in processes(proc)}
        result.update(workers=workers, rss_mb_by_process=list(rss.values()), rss_mb_total=round(sum(rss.values()), 1),
                      rss_mb_largest_process=max(rss.values()))
        result["share_of_bare_request_rate"] = round(result["requests_per_second"]
                                                     / result["healthz"]["requests_per_second"], 3)
        return result
    finally:
        stop(proc)


def serving_after(url: str, sha: str, since: float) -> float:
    """Seconds from `since` to the first of STREAK `/healthz` answers in a row that name `sha`."""
    streak, first = 0, 0.0
    while streak < STREAK:
        if time.perf_counter() - since > 60:
            sys.exit(f"the server never switched to {sha[:12]}: {url}/healthz")
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            named = json.loads(response.read())["model_sha256"]
        if named == sha:
            first, streak = (first if streak else time.perf_counter()), streak + 1
        else:
            streak = 0
        time.sleep(0.02)
    return round(first - since, 2)


def switch(model: Path, body: Path, kind: str, folder: Path) -> dict:
    """A promotion and a rollback under load, against the same load with neither."""
    import onnx

    other = folder / "other.onnx"  # the same graph and one more metadata entry: another file, another SHA-256
    graph = onnx.load(str(model))
    graph.metadata_props.add(key="bench_serve", value="promoted")
    onnx.save(graph, str(other))
    base = folder / "serving"
    registry.publish(base, {"model.onnx": model})
    shas = [sha256_file(model), sha256_file(other)]
    proc, url = start(base, 2)
    load = ("-k", "-c", str(CLIENTS), "-t", str(SWITCH_SECONDS), "-n", "100000000")
    try:
        ab(url + "/predict", "-k", "-c", str(CLIENTS), "-n", "500", body=body, kind=kind)  # warm-up
        steady = ab(url + "/predict", *load, body=body, kind=kind)
        events: dict = {}

        def steps() -> None:
            start_at = time.perf_counter()
            time.sleep(SWITCH_AT)
            promoted = time.perf_counter()
            events["version"] = registry.publish(base, {"model.onnx": other})
            events["promoted_served_after_s"] = serving_after(url, shas[1], promoted)
            time.sleep(max(0.0, start_at + 2 * SWITCH_AT - time.perf_counter()))
            rolled = time.perf_counter()
            subprocess.run([shutil.which("mnist-promote") or "mnist-promote", "rollback", "--to", str(base)],
                           check=True, capture_output=True)
            events["rolled_back_served_after_s"] = serving_after(url, shas[0], rolled)

        with ThreadPoolExecutor(1) as pool:
            timeline = pool.submit(steps)
            switching = ab(url + "/predict", *load, body=body, kind=kind)
            timeline.result()
    finally:
        stop(proc)
    return {"steady": steady, "switching": switching, **events,
            "p99_ratio": round(switching["latency_ms"]["p99"] / max(steady["latency_ms"]["p99"], 1.0), 2)}


UNLIMITED = ("--feedback-rate", "1000000", "--feedback-burst", "1000000")


def feedback_throughput(model: Path, store: str, body: Path, kind: str, predict_body: Path, predict_kind: str) -> dict:
    """`POST /feedback` against `/predict` on one 2-worker server with `--feedback`, in the same round."""
    proc, url = start(model, 2, "--feedback", store, *UNLIMITED)
    try:
        args = ("-k", "-c", str(CLIENTS))
        ab(url + "/feedback", *args, "-n", "500", body=body, kind=kind)  # warm-up
        result = {"feedback": ab(url + "/feedback", *args, "-n", str(REQUESTS), body=body, kind=kind),
                  "predict": ab(url + "/predict", *args, "-n", str(REQUESTS), body=predict_body, kind=predict_kind)}
        peak = {pid: round(loadgen.memory_kb(pid, "VmHWM") / 1024, 1) for pid in processes(proc)}
        result["peak_rss_mb_by_process"] = list(peak.values())
    finally:
        stop(proc)
    result["feedback_share_of_predict"] = round(result["feedback"]["requests_per_second"]
                                                / result["predict"]["requests_per_second"], 3)
    return result


def fleet(model: Path, stores: list[str], body: Path, kind: str) -> dict:
    """/feedback on one 1-worker server alone, then on two 1-worker servers sharing one store, each under its own
    `ab` at the same time: requests/s of each and their sum."""
    import concurrent.futures

    out = {}
    for name, urls in (("one_server", stores[:1]), ("two_servers", [stores[1], stores[1]])):
        procs = [start(model, 1, "--feedback", store, *UNLIMITED) for store in urls]
        try:
            for _, url in procs:
                ab(url + "/feedback", "-k", "-c", str(CLIENTS), "-n", "300", body=body, kind=kind)  # warm-up
            with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
                runs = list(pool.map(lambda u: ab(u + "/feedback", "-k", "-c", str(CLIENTS), "-n", str(REQUESTS),
                                                  body=body, kind=kind), [url for _, url in procs]))
        finally:
            for proc, _ in procs:
                stop(proc)
        out[name] = {"runs": runs, "requests_per_second": round(sum(r["requests_per_second"] for r in runs), 1)}
    out["two_over_one"] = round(out["two_servers"]["requests_per_second"] / out["one_server"]["requests_per_second"], 3)
    return out


def postgres():
    import importlib.util

    spec = importlib.util.spec_from_file_location("postgres", common.ROOT / "scripts" / "postgres.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.postgres()


def stall(model: Path, folder: Path) -> dict:
    """/healthz, one request at a time, while 8 clients post the 16-file heavy request 4 times each."""
    body, kind = loadgen.multipart(loadgen.heavy_files())
    (folder / "heavy.bin").write_bytes(body)
    proc, url = start(model, 1)
    try:
        command = [AB, "-q", "-c", str(CLIENTS), "-n", str(4 * CLIENTS), "-p", str(folder / "heavy.bin"), "-T", kind,
                   url + "/predict"]
        began = time.perf_counter()
        load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        health = ab(url + "/healthz", "-c", "1", "-n", "1000000", "-t", str(HEALTH_SECONDS))
        health_ended = time.perf_counter() - began
        heavy_out = load.communicate(timeout=900)[0]
        seconds = float(re.search(r"Time taken for tests:\s+([\d.]+)", heavy_out).group(1))
        return {"heavy_request_bytes": len(body), "heavy_requests": 4 * CLIENTS, "heavy_seconds": seconds,
                "heavy_non_2xx": int(re.search(r"Non-2xx responses:\s+(\d+)", heavy_out).group(1))
                if "Non-2xx" in heavy_out else 0,
                "healthz_window_s": [0.5, round(health_ended, 2)], "healthz_during": health,
                "heavy_load_outlasted_healthz_window": seconds > health_ended,
                "worker_peak_rss_mb": round(loadgen.memory_kb(proc.pid, "VmHWM") / 1024, 1)}
    finally:
        stop(proc)


def cpu_breakdown(model_path: Path, upload: bytes) -> dict:
    """Microseconds per step of one request, in this process (median of 5 × 500 calls)."""
    body, kind = loadgen.multipart([("file", "digit.png", "image/png", upload)])
    model = load_model(model_path, threads=1)
    loop = asyncio.new_event_loop()

    async def parse() -> None:
        async def stream():
            yield body
        form = await MultiPartParser(Headers({"content-type": kind}), stream(), max_files=16, max_fields=16).parse()
        await form.getlist("file")[0].read()
        await form.close()

    image = images._open(upload, WEB_MAX_PIXELS)
    gray = images.to_gray(image)
    digit = images.prepare(upload, WEB_MAX_PIXELS)
    probs = model.probabilities(digit[None])[0]
    answer = {"file": "digit.png", "digit": 7, "label": "7", "probabilities": [round(float(p), 6) for p in probs],
              "input": png_data_url(digit)}
    steps = {"multipart parsing": lambda: loop.run_until_complete(parse()),
             "decoding (PNG)": lambda: images._open(upload, WEB_MAX_PIXELS),
             "grayscale + reduce": lambda: images.to_gray(image),
             "crop, fit, centre": lambda: images.to_mnist(gray.copy()),
             "inference (onnxruntime, batch 1)": lambda: model.probabilities(digit[None]),
             "answer's PNG (data URL)": lambda: png_data_url(digit),
             "answer's JSON": lambda: compact_json(answer)}
    out = {}
    for name, step in steps.items():
        def many(step=step):
            for _ in range(500):
                step()
        out[name] = round(common.median_time(many) / 500 * 1e6, 1)
    return out


def main() -> None:
    if AB is None:
        sys.exit("needs ApacheBench: apt-get install apache2-utils")
    model = common.ROOT / "models" / "export" / "model.onnx"
    if not model.exists():
        sys.exit("run `dvc repro` first: this benchmark serves models/export/model.onnx")
    upload = realistic_upload()
    version = re.search(r"Version (\S+)", subprocess.run([AB, "-V"], capture_output=True, text=True).stdout)
    results: dict = {"tool": f"ab -k -c 8 -n 4000 (ApacheBench {version.group(1) if version else '?'})",
                     "upload_bytes": len(upload),
                     "clients": CLIENTS, "requests": REQUESTS, "rounds": {1: [], 2: []}}
    with tempfile.TemporaryDirectory() as tmp:
        body, kind = loadgen.multipart([("file", "digit.png", "image/png", upload)])
        (Path(tmp) / "body.bin").write_bytes(body)
        for _ in range(ROUNDS):
            for workers in (1, 2):
                run = throughput(model, Path(tmp) / "body.bin", kind, workers)
                results["rounds"][workers].append(run)
                print(f"{workers} worker(s): {run['requests_per_second']:.0f} req/s, p50 {run['latency_ms']['p50']:.0f} ms, "
                      f"p99 {run['latency_ms']['p99']:.0f} ms, failed {run['failed']}, non-2xx {run['non_2xx']}, "
                      f"RSS {run['rss_mb_by_process']} MB; /healthz {run['healthz']['requests_per_second']:.0f} req/s")
        for workers, runs in results["rounds"].items():
            results[f"median_round_{workers}_worker"] = sorted(runs, key=lambda r: r["requests_per_second"])[len(runs) // 2]
        feedback, feedback_kind = loadgen.multipart([("file", "digit.png", "image/png", upload)], {"label": "7"})
        feedback_body = Path(tmp) / "feedback.bin"
        feedback_body.write_bytes(feedback)
        rounds: dict[str, list] = {"sqlite": [], "postgresql": []}
        fleets = []
        with postgres() as pg:
            for i in range(ROUNDS):
                for engine, store in (("sqlite", str(Path(tmp) / f"store{i}")), ("postgresql", pg.database(f"s{i}"))):
                    rounds[engine].append(feedback_throughput(
                        model, store, feedback_body, feedback_kind, Path(tmp) / "body.bin", kind))
                    print(f"/feedback on {engine}, round {i + 1}: {rounds[engine][-1]}")
                fleets.append(fleet(model, [pg.database(f"one{i}"), pg.database(f"two{i}")], feedback_body,
                                    feedback_kind))
                print(f"fleet round {i + 1}: {fleets[-1]}")
            results["postgresql_version"] = pg.sql("SHOW server_version")
        for engine, runs in rounds.items():
            results["feedback" if engine == "sqlite" else f"feedback_{engine}"] = {"rounds": runs, "median_round": sorted(
                runs, key=lambda r: r["feedback"]["requests_per_second"])[len(runs) // 2]}
        results["fleet"] = {"rounds": fleets,
                            "median_round": sorted(fleets, key=lambda r: r["two_over_one"])[len(fleets) // 2]}
        results["stall"] = stall(model, Path(tmp))
        print(f"stall: {results['stall']}")
        results["switch"] = switch(model, Path(tmp) / "body.bin", kind, Path(tmp))
        print(f"switch: {results['switch']}")
    results["cpu_us_per_request"] = cpu_breakdown(model, upload)
    results["cpu_us_per_request"]["total of the steps"] = round(sum(results["cpu_us_per_request"].values()), 1)
    print(f"CPU per request (µs): {results['cpu_us_per_request']}")
    common.save("serve", results)


if __name__ == "__main__":
    main()
