"""Load on `pinsface serve`: many concurrent clients uploading 224-px Pins photos to a real server on 127.0.0.1,
against batched `identify_many` in-process on the same photos; then the same load with hostile uploads mixed in.

    python bench/serve_load.py --run RUN_DIR [--clients 200] [--seconds 60] [--max-requests 5000] [--hostile 0.1]

Each phase is bounded in requests and in time and then stops; only loopback addresses are used. Prints req/s,
p50/p95/p99 latency, responses by status, /v1/health latency under load and the server's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PINS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pins" / "105_classes_pins_dataset"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.badinput: the same awkward files the tests use

IN_PROCESS = """
import json, statistics, sys, time
from pathlib import Path
from pinsface.predict import Recognizer
rec = Recognizer.load(sys.argv[1])
photos = [Path(p).read_bytes() for p in json.loads(sys.argv[2])]
batch = int(sys.argv[3])
rec.identify_many(photos[:batch], batch_size=batch)  # warm up the graphs
rates, cpu_rates = [], []
for _ in range(int(sys.argv[4])):
    t, c = time.perf_counter(), time.process_time()
    rec.identify_many(photos, batch_size=batch)
    rates.append(len(photos) / (time.perf_counter() - t))
    cpu_rates.append(len(photos) / (time.process_time() - c))
print(json.dumps({"runs": rates, "cpu_runs": cpu_rates}))
"""


# /v1/health probed from its own process, so the clients' event loop does not delay the probes.
PROBE = """
import json, sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
out, end = [], time.monotonic() + seconds
with httpx.Client(timeout=60) as client:
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            ok = client.get(url + "/v1/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        out.append(1000 * (time.perf_counter() - t) if ok else float("inf"))
        time.sleep(0.25)
print(json.dumps(out))
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pick_photos(n: int, seed: int = 0) -> list[Path]:
    files = sorted(PINS.rglob("*.jpg"))
    return random.Random(seed).sample(files, min(n, len(files)))


def hostile_files(source: Path, folder: Path, max_upload_mb: float) -> list[tuple[str, bytes]]:
    from tests.badinput import make_bad_corpus

    bad = make_bad_corpus(folder, source)
    out = [(p.name, p.read_bytes()) for p in sorted(bad.iterdir()) if p.is_file() and not p.is_symlink()]
    out.append(("oversize.jpg", b"\xff\xd8\xff" + os.urandom(int(max_upload_mb * 1024 * 1024) + 1024)))
    out.append(("fake.jpg", b"\xff\xd8\xff\xe0" + os.urandom(4000)))  # JPEG magic, garbage after it
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class RawClient:
    """One keep-alive HTTP/1.1 connection that posts prebuilt multipart bodies: a load generator that costs the
    machine little, so that the 2 cores measure the server rather than the clients (httpx's own parsing and
    multipart encoding took about a quarter of the CPU under this load)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        for attempt in (0, 1):  # a connection the server closed (after a 413, say) is opened again once
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            try:
                self.writer.write(head + body)
                await self.writer.drain()
                status_line = await self.reader.readuntil(b"\r\n")
                headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
                continue
            status = int(status_line.split()[1])
            fields = dict(line.split(": ", 1) for line in headers.split("\r\n") if ": " in line)
            if "content-length" in fields:
                data = await self.reader.readexactly(int(fields["content-length"]))
            else:  # chunked
                data = b""
                while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                    data += await self.reader.readexactly(size + 2)
                await self.reader.readuntil(b"\r\n")
            if fields.get("connection") == "close":
                await self.close()
            return status, data
        raise ConnectionError("unreachable")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
        self.reader = self.writer = None


def multipart(name: str, data: bytes, boundary: str = "pinsface-load-boundary") -> tuple[bytes, str]:
    """(body, content type) of a one-file upload in the form field "files"."""
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


async def drive(
    url: str,
    photos: list[bytes],
    hostile: list[tuple[str, bytes]],
    hostile_rate: float,
    clients: int,
    seconds: float,
    max_requests: int,
    seed: int,
    server_pid: int,
) -> dict:
    probe = subprocess.Popen([sys.executable, "-c", PROBE, url, str(seconds)], stdout=subprocess.PIPE, text=True)
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()

    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    bodies = [multipart("photo.jpg", data) for data in photos]
    bad_bodies = [multipart(name, data) for name, data in hostile]
    rng = random.Random(seed)
    latencies: list[float] = []
    statuses: Counter = Counter()
    per_file_errors: Counter = Counter()
    sent = 0
    deadline = time.monotonic() + seconds

    async def one_client():
        nonlocal sent
        client = RawClient(host, int(port))
        try:
            while sent < max_requests and time.monotonic() < deadline:
                sent += 1
                bad = bool(bad_bodies) and rng.random() < hostile_rate
                body, content_type = rng.choice(bad_bodies if bad else bodies)
                t = time.perf_counter()
                try:
                    status, data = await asyncio.wait_for(client.post("/v1/identify", body, content_type), 120)
                    statuses[status] += 1
                    if status == 200 and (bad or b'"error":null' not in data):
                        for result in json.loads(data)["results"]:
                            if result["error"]:
                                per_file_errors[result["error"]] += 1
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    statuses[type(exc).__name__] += 1
                    await client.close()
                latencies.append(time.perf_counter() - t)
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*[one_client() for _ in range(clients)])
    elapsed = time.perf_counter() - started
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
    health_ms = json.loads(probe.communicate(timeout=seconds + 120)[0] or "[]")
    return {
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "ok": statuses[200],
        "requests": len(latencies),
        "seconds": elapsed,
        "req_per_s": len(latencies) / elapsed,
        "p50": pct(latencies, 50),
        "p95": pct(latencies, 95),
        "p99": pct(latencies, 99),
        "statuses": dict(statuses),
        "per_file_errors": dict(per_file_errors),
        "health_p50_ms": pct(health_ms, 50),
        "health_p99_ms": pct(health_ms, 99),
        "health_max_ms": max(health_ms) if health_ms else float("nan"),
        "health_probes": len(health_ms),
    }


def report(title: str, r: dict) -> None:
    print(
        f"{title}: {r['requests']} requests in {r['seconds']:.1f} s = {r['req_per_s']:.1f} req/s; latency p50 "
        f"{r['p50']:.2f} s, p95 {r['p95']:.2f} s, p99 {r['p99']:.2f} s; by status {r['statuses']}; per-file "
        f"errors {r['per_file_errors'] or 'none'}; /v1/health under load: median {r['health_p50_ms']:.0f} ms, "
        f"p99 {r['health_p99_ms']:.0f} ms, max {r['health_max_ms']:.0f} ms ({r['health_probes']} probes); "
        f"CPU: server {r['server_cpu_s']:.0f} s, "
        f"load clients {r['client_cpu_s']:.0f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder (copied: the bench changes nothing in it)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60, help="time bound per phase")
    parser.add_argument("--max-requests", type=int, default=5000, help="request bound per phase")
    parser.add_argument("--hostile", type=float, default=0.1, help="share of hostile uploads in the second phase")
    parser.add_argument("--photos", type=int, default=256, help="distinct Pins photos uploaded")
    parser.add_argument("--repeats", type=int, default=3, help="in-process identify_many repeats (median)")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args()

    import httpx

    from tests.serving import free_port, wait_healthy

    paths = pick_photos(args.photos)
    photos = [p.read_bytes() for p in paths]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)

        # In-process first, alone on the machine: batched identify_many on the same photos.
        def in_process() -> tuple[list[float], list[float]]:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    IN_PROCESS,
                    args.run,
                    json.dumps([str(p) for p in paths]),
                    "32",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            return result["runs"], result["cpu_runs"]

        rates, cpu_rates = in_process()
        inproc = {"photos_per_s": statistics.median(rates)}
        print(
            f"in-process identify_many (batch 32, {len(photos)} photos, median of {args.repeats}): "
            f"{inproc['photos_per_s']:.1f} photos/s, {statistics.median(cpu_rates):.1f} photos per CPU-second"
        )

        import shutil

        run = tmp / "run"
        shutil.copytree(args.run, run)
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tempfile.gettempdir()) / "serve_load_server.log"
        print(f"server log: {log_path}")
        log = open(log_path, "wb")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pinsface.cli",
                "serve",
                str(run),
                "--port",
                str(port),
                "--api-key-file",
                str(tmp / "key"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(url, server, timeout=300)
            # Warm up as the in-process figure does: the first batches of each size build the graphs.
            asyncio.run(drive(url, photos, [], 0.0, 32, 60, 96, 0, server.pid))
            clean = asyncio.run(
                drive(url, photos, [], 0.0, args.clients, args.seconds, args.max_requests, 1, server.pid)
            )
            report(f"{args.clients} clients, 224-px photos", clean)
            print(
                f"  server throughput / in-process: {clean['req_per_s'] / inproc['photos_per_s']:.0%}; "
                f"{clean['ok'] / clean['server_cpu_s']:.1f} photos per server CPU-second"
            )
            hostile = hostile_files(PINS / "pins_Bill Gates" / "Bill Gates104_500.jpg", tmp / "bad", 10.0)
            mixed = asyncio.run(
                drive(url, photos, hostile, args.hostile, args.clients, args.seconds, args.max_requests, 2, server.pid)
            )
            report(f"{args.clients} clients, {args.hostile:.0%} hostile uploads", mixed)
            fives = {k: v for k, v in mixed["statuses"].items() if str(k).startswith("5") or not str(k).isdigit()}
            health = httpx.get(f"{url}/v1/health", timeout=10)
            print(
                f"  5xx or failed requests in the hostile run: {fives or 'none'}; health afterwards: "
                f"{health.status_code} {health.json().get('status')}, {health.json().get('pending_images')} pending"
            )
            print(f"server peak RSS: {peak_rss_mb(server.pid):.0f} MB")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
            log.close()
        # The machine's load drifts: measure in-process again, after, and compare with the median of both.
        more, more_cpu = in_process()
        rates += more
        cpu_rates += more_cpu
        both, both_cpu = statistics.median(rates), statistics.median(cpu_rates)
        print(
            f"in-process identify_many again: median of all {len(rates)} runs {both:.1f} photos/s "
            f"(min {min(rates):.1f}, max {max(rates):.1f}), {both_cpu:.1f} photos per CPU-second"
        )
        print(
            f"server / in-process: throughput {clean['req_per_s'] / both:.0%}, photos per CPU-second "
            f"{clean['ok'] / clean['server_cpu_s'] / both_cpu:.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
