"""Talking to a running mnist-serve from outside: its URL, its memory, the uploads, and a small load generator.

Used by benchmarks/bench_serve.py and by the tests (tests/helpers.py). The load generator runs N
keep-alive clients on loopback: each sends the same pre-encoded multipart request back to back and
times each answer; the run stops after `requests` answers or `seconds`, whichever comes first.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import statistics
import threading
import time
import uuid
from urllib.parse import urlsplit

import numpy as np
from PIL import Image


def served_url(banner: str) -> str:
    """The base URL (no trailing /) in the line mnist-serve prints first: "serving MODEL on URL (…)"."""
    if not banner.startswith("serving ") or " on " not in banner:
        raise ValueError(f"not mnist-serve's first line: {banner!r}")
    return banner.split(" on ", 1)[1].split()[0].rstrip("/")


def memory_kb(pid: int, field: str = "VmRSS") -> int:
    """A process's memory from /proc/PID/status: VmRSS now, VmHWM its peak (kB)."""
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} for process {pid}")


def digit_png(height: int = 200, width: int = 200) -> bytes:
    """A plain test upload: a dark vertical stroke (a "1") on white paper, as a grayscale PNG."""
    canvas = np.full((height, width), 255, np.uint8)
    canvas[height * 3 // 20: height * 17 // 20, width * 19 // 40: width * 22 // 40] = 0
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, "PNG")
    return buffer.getvalue()


def bar_png(height: int, width: int, mode: str = "L") -> bytes:
    """A large, mostly white image with one dark bar: a small file that decodes to many pixels.
    RGBA: the bar as ink on a transparent sheet, the costliest mode per decoded pixel."""
    canvas = np.full((height, width), 255, np.uint8)
    canvas[height // 8: height * 7 // 8, width * 2 // 5: width * 3 // 5] = 0
    image = Image.fromarray(canvas, "L")
    if mode == "RGBA":
        image = Image.merge("RGBA", [image] * 3 + [Image.fromarray(255 - canvas, "L")])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def heavy_files() -> list[tuple[str, str, str, bytes]]:
    """The 16 files of the stall report: 8 copies of an 8000×7990 PNG (79 KB, 64 MP decoded; once 4 s and
    1.6 GB of server time each) and 8 RGBA PNGs of 3000×3000 (9 MP: under the web limit, so prepared)."""
    bomb, large = bar_png(7990, 8000), bar_png(3000, 3000, "RGBA")
    return ([("file", f"bomb{i}.png", "image/png", bomb) for i in range(8)]
            + [("file", f"large{i}.png", "image/png", large) for i in range(8)])


def multipart(files: list[tuple[str, str, str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(body, content type) for form fields [(field, file name, content type, bytes), …] and plain `fields`."""
    boundary = uuid.uuid4().hex
    parts = []
    for field, name, kind, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    for field, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def raw_request(url: str, body: bytes, content_type: str) -> bytes:
    parts = urlsplit(url)
    return (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _client(host: str, port: int, request: bytes, quota: list[int], stop: float, out: list[tuple[int, float]]):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while quota[0] > 0 and time.perf_counter() < stop:
            quota[0] -= 1
            start = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            out.append((int(head.split(b" ", 2)[1]), time.perf_counter() - start))
    finally:
        writer.close()


def run_load(url: str, body: bytes, content_type: str, clients: int = 8, requests: int = 1000,
             seconds: float = 30.0) -> dict[str, float | int | dict[int, int]]:
    """Statuses, requests/s and latency percentiles (ms) of `clients` concurrent keep-alive clients."""
    parts = urlsplit(url)
    request = raw_request(url.rstrip("/") + "/predict", body, content_type)
    results: list[tuple[int, float]] = []

    async def main() -> float:
        quota, start = [requests], time.perf_counter()
        await asyncio.gather(*(_client(parts.hostname, parts.port, request, quota, start + seconds, results)
                               for _ in range(clients)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    latencies = sorted(ms * 1000 for _, ms in results)
    statuses: dict[int, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"requests": len(results), "clients": clients, "seconds": round(elapsed, 3),
            "requests_per_second": round(len(results) / elapsed, 1), "statuses": statuses,
            "latency_ms": {"p50": round(statistics.median(latencies), 2), "p90": round(pick(0.90), 2),
                           "p99": round(pick(0.99), 2), "max": round(latencies[-1], 2)}}


class Burst:
    """`clients` threads posting one correction back to back to `/feedback`, each on a keep-alive connection
    (a new one after an error: a killed worker, a restarted server); every 201's id and every status kept,
    and how many 503s came without `Retry-After`. For fault runs: `acknowledged` must all be in the store."""

    def __init__(self, url: str, body: bytes, content_type: str, clients: int = 4) -> None:
        self.parts, self.body, self.content_type = urlsplit(url), body, content_type
        self.acknowledged: list[str] = []
        self.statuses: list[int] = []
        self.errors = self.retry_after_missing = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def retarget(self, url: str) -> None:
        self.parts = urlsplit(url)

    def _client(self) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=30)
                conn.request("POST", "/feedback", self.body, {"Content-Type": self.content_type})
                response = conn.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException):
                conn = None
                self.errors += 1
                time.sleep(0.01)
                continue
            self.statuses.append(response.status)
            if response.status == 201:
                self.acknowledged.append(json.loads(answer)["id"])
            elif response.status == 503 and not response.getheader("Retry-After"):
                self.retry_after_missing += 1

    def wait_for(self, acknowledged: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < acknowledged and time.monotonic() < deadline:
            time.sleep(0.02)
        if len(self.acknowledged) < acknowledged:
            raise TimeoutError(f"{len(self.acknowledged)} of {acknowledged} acknowledged; last {self.statuses[-5:]}")

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
