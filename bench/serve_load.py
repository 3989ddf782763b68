"""Load on `pinsface serve`: many concurrent clients uploading 224-px Pins photos to a real server on 127.0.0.1,
against batched `identify_many` in-process on the same photos; then the same load with hostile uploads mixed in;
then three phases against starvation:

- storm: identify load from a few clients, idle and then during 10 enrolments and forgettings (p95 of both);
- slow: 300 connections that send part of their headers or body and wait, from 10 other loopback addresses,
  while a normal client names a photo now and then (its latency, what health says, how the slow ones end);
- huge: requests of two 39.7-megapixel PNGs (small files) beside a client naming one photo at a time (its
  latency), one request of eight such PNGs (refused), and the server's peak RSS.

    python bench/serve_load.py --run RUN_DIR [--clients 200] [--seconds 60] [--max-requests 5000] [--hostile 0.1]
                               [--phases clean,hostile,storm,slow,huge]

Each phase is bounded in requests and in time and then stops; only loopback addresses are used. Prints req/s,
p50/p95/p99 latency, responses by status, /v1/health latency under load and the server's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from pinsface.testing.shared import pins_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PINS = pins_dir()
# Loopback source addresses the load clients are spread over (fewer per address than the server's per-client cap).
CLIENT_ADDRESSES = 10

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
url, seconds, key = sys.argv[1], float(sys.argv[2]), sys.argv[3]
out, end = [], time.monotonic() + seconds
with httpx.Client(timeout=60, headers={"X-API-Key": key}) as client:
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
    from pinsface.testing.badinput import make_bad_corpus

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

    def __init__(self, host: str, port: int, key: str, source: str | None = None):
        self.host, self.port, self.key = host, port, key
        self.local_addr = (source, 0) if source else None
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        for attempt in (0, 1):  # a connection the server closed (after a 413, say) is opened again once
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port, local_addr=self.local_addr
                )
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"X-API-Key: {self.key}\r\nContent-Length: {len(body)}\r\n\r\n"
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
    key: str,
    photos: list[bytes],
    *,
    clients: int,
    seconds: float,
    max_requests: int,
    seed: int,
    server_pid: int,
    hostile: list[tuple[str, bytes]] | None = None,
    hostile_rate: float = 0.0,
) -> dict:
    probe = subprocess.Popen([sys.executable, "-c", PROBE, url, str(seconds), key], stdout=subprocess.PIPE, text=True)
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()

    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    bodies = [multipart("photo.jpg", data) for data in photos]
    bad_bodies = [multipart(name, data) for name, data in hostile or []]
    rng = random.Random(seed)
    latencies: list[float] = []
    timeline: list[tuple[float, float]] = []  # (perf_counter when sent, latency)
    statuses: Counter = Counter()
    per_file_errors: Counter = Counter()
    sent = 0
    deadline = time.monotonic() + seconds

    async def one_client(k: int):
        nonlocal sent
        # From CLIENT_ADDRESSES loopback addresses, as many clients on many machines: the server caps the
        # connections of one address (ServeSettings.max_connections_per_client).
        client = RawClient(host, int(port), key, source=f"127.0.0.{2 + k % CLIENT_ADDRESSES}")
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
                timeline.append((t, latencies[-1]))
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*[one_client(k) for k in range(clients)])
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
        "timeline": timeline,
        "statuses": dict(statuses),
        "per_file_errors": dict(per_file_errors),
        "health_p50_ms": pct(health_ms, 50),
        "health_p99_ms": pct(health_ms, 99),
        "health_max_ms": max(health_ms) if health_ms else float("nan"),
        "health_probes": len(health_ms),
    }


def storm(url: str, key: str, photos: list[bytes], clients: int, seconds: float, pid: int) -> None:
    """Identify p95 idle; during a burst of 10 enrolments and 10 forgettings (5 photos each, one after the
    other); and while enrolments and forgettings run back to back for the rest of the window."""
    import httpx

    idle = asyncio.run(
        drive(url, key, photos, clients=clients, seconds=seconds, max_requests=100_000, seed=3, server_pid=pid)
    )
    folders = sorted(p for p in PINS.iterdir() if p.is_dir())[:5]
    timings: dict[str, list[float]] = {"enrol": [], "forget": []}
    burst: list[float] = []

    async def changes(end: float):
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=300) as client:
            k = 0
            while k < 10 or time.monotonic() < end:
                mine = sorted(folders[k % 5].glob("*.jpg"))
                start = 5 * (k // 5) % (len(mine) - 5)
                files = [("files", (p.name, p.read_bytes())) for p in mine[start : start + 5]]
                t = time.perf_counter()
                r = await client.post(f"/v1/identities/Storm {k}/faces", files=files)
                timings["enrol"].append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
                t = time.perf_counter()
                r = await client.delete(f"/v1/identities/Storm {k}")
                timings["forget"].append(time.perf_counter() - t)
                k += 1
                if k == 10:
                    burst.append(time.perf_counter())
                    await asyncio.sleep(2)  # the burst ends; naming alone for a moment, then back to back

    async def both():
        await asyncio.sleep(0)
        loaded = asyncio.create_task(
            drive(url, key, photos, clients=clients, seconds=seconds, max_requests=100_000, seed=4, server_pid=pid)
        )
        await asyncio.sleep(1)
        burst.append(time.perf_counter())
        await changes(time.monotonic() + seconds - 2)
        return await loaded

    during = asyncio.run(both())
    started, ended = burst
    in_burst = [lat for t, lat in during["timeline"] if started <= t <= ended]
    after = [lat for t, lat in during["timeline"] if t > ended + 2]
    print(
        f"storm ({clients} clients naming 224-px photos): identify p95 idle {idle['p95']:.2f} s; during a burst of "
        f"10 enrolments and 10 forgettings ({ended - started:.1f} s, {len(in_burst)} requests) "
        f"{pct(in_burst, 95):.2f} s ({pct(in_burst, 95) / idle['p95']:.2f}x); while "
        f"{len(timings['enrol']) - 10} more ran back to back {pct(after, 95):.2f} s "
        f"({pct(after, 95) / idle['p95']:.2f}x); enrolment of 5 photos median "
        f"{statistics.median(timings['enrol']):.2f} s, forgetting median {statistics.median(timings['forget']):.3f} s "
        f"(wall, from the client); statuses {during['statuses']}"
    )


def slow_clients(url: str, key: str, photo: bytes, n: int = 300) -> None:
    """``n`` slow connections (half stuck in their headers, half in their body) and a normal client."""
    import httpx

    port = int(url.rsplit(":", 1)[1])
    slow = []
    for k in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(f"127.0.0.{2 + k % 10}", 0))
        if k % 2:
            s.sendall(b"POST /v1/identify HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        else:
            s.sendall(
                b"POST /v1/identify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + key.encode() + b"\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n--b\r\n"
            )
        slow.append(s)
    opened = time.monotonic()
    latencies, health = [], None
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as client:
        health = client.get("/v1/health").json()
        for _ in range(5):
            t = time.perf_counter()
            r = client.post("/v1/identify", files=[("files", ("p.jpg", photo))])
            latencies.append(time.perf_counter() - t)
            assert r.status_code == 200
            time.sleep(0.5)
    answers = Counter()
    for s in slow:
        s.settimeout(max(1.0, 40 - (time.monotonic() - opened)))
        try:
            answers[(s.recv(12) or b"closed").decode("latin-1").strip()] += 1
        except TimeoutError:
            answers["still open"] += 1
        s.close()
    c = health["load"]["connections"]
    print(
        f"slow clients ({n} connections from 10 addresses, half in their headers, half in their body): normal "
        f"identify median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s (5 requests); health "
        f"said {health['status']}, {c['open']} connections open, busiest client {c['busiest_client']}; the slow "
        f"ones ended with {dict(answers)} within {time.monotonic() - opened:.0f} s"
    )


def flat_png(side: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def huge_images(url: str, key: str, photo: bytes, seconds: float, pid: int) -> None:
    """Requests of two 39.7-megapixel PNGs from 2 clients beside one client naming one photo at a time."""
    import httpx

    huge = flat_png(6300)
    end = time.monotonic() + seconds
    single: list[float] = []
    statuses: Counter = Counter()

    async def big_client(client):
        while time.monotonic() < end:
            r = await client.post("/v1/identify", files=[("files", (f"{k}.png", huge)) for k in range(2)])
            statuses[r.status_code] += 1

    async def one_photo(client):
        await asyncio.sleep(1)
        while time.monotonic() < end:
            t = time.perf_counter()
            r = await client.post("/v1/identify", files=[("files", ("p.jpg", photo))])
            single.append(time.perf_counter() - t)
            assert r.status_code == 200
            await asyncio.sleep(0.5)

    async def run():
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=300) as client:
            eight = await client.post("/v1/identify", files=[("files", (f"{k}.png", huge)) for k in range(8)])
            await asyncio.gather(big_client(client), big_client(client), one_photo(client))
            return eight

    eight = asyncio.run(run())
    print(
        f"huge images ({len(huge) // 1024} KB PNGs of 39.7 MP; 2 clients sending 2 at a time, {sum(statuses.values())} "
        f"requests, {dict(statuses)}): a 1-photo identify beside them took median {statistics.median(single):.2f} s, "
        f"max {max(single):.2f} s ({len(single)} requests); 8 at once: {eight.status_code} "
        f"{eight.json().get('code')}; server peak RSS so far {peak_rss_mb(pid):.0f} MB"
    )


def report(title: str, r: dict) -> None:
    print(
        f"{title}: {r['requests']} requests in {r['seconds']:.1f} s = {r['req_per_s']:.1f} req/s; latency p50 "
        f"{r['p50']:.2f} s, p95 {r['p95']:.2f} s, p99 {r['p99']:.2f} s; by status {r['statuses']}; per-file "
        f"errors {r['per_file_errors'] or 'none'}; /v1/health under load: median {r['health_p50_ms']:.0f} ms, "
        f"p99 {r['health_p99_ms']:.0f} ms, max {r['health_max_ms']:.0f} ms ({r['health_probes']} probes); "
        f"CPU: server {r['server_cpu_s']:.0f} s, "
        f"load clients {r['client_cpu_s']:.0f} s"
    )


def in_process(run: str, paths: list[Path], repeats: int) -> tuple[list[float], list[float]]:
    """Batched identify_many in its own process on the same photos: (photos/s, photos per CPU-second) per run."""
    out = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, run, json.dumps([str(p) for p in paths]), "32", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["runs"], result["cpu_runs"]


def start_server(run: Path, port: int, key_file: Path) -> subprocess.Popen:
    log_path = Path(tempfile.gettempdir()) / "serve_load_server.log"
    print(f"server log: {log_path}")
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pinsface.cli", "serve", str(run), "--port", str(port)]
            + ["--api-key-file", str(key_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def load_phases(args, url: str, key: str, photos: list[bytes], pid: int, tmp: Path) -> dict | None:
    """The clean and hostile phases; the clean phase's figures."""
    import httpx

    clean = None
    load = {"clients": args.clients, "seconds": args.seconds, "max_requests": args.max_requests, "server_pid": pid}
    if "clean" in args.phases:
        clean = asyncio.run(drive(url, key, photos, seed=1, **load))
        report(f"{args.clients} clients, 224-px photos", clean)
        print(f"  {clean['ok'] / clean['server_cpu_s']:.1f} photos per server CPU-second")
    if "hostile" in args.phases:
        hostile = hostile_files(PINS / "pins_Bill Gates" / "Bill Gates104_500.jpg", tmp / "bad", 10.0)
        mixed = asyncio.run(drive(url, key, photos, seed=2, hostile=hostile, hostile_rate=args.hostile, **load))
        report(f"{args.clients} clients, {args.hostile:.0%} hostile uploads", mixed)
        fives = {k: v for k, v in mixed["statuses"].items() if str(k).startswith("5") or not str(k).isdigit()}
        health = httpx.get(f"{url}/v1/health", timeout=10, headers={"X-API-Key": key}).json()
        print(f"  5xx or failed requests: {fives or 'none'}; health afterwards: {health['status']}")
    return clean


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
    parser.add_argument("--phases", default="clean,hostile,storm,slow,huge", help="which phases, comma-separated")
    parser.add_argument("--storm-clients", type=int, default=4, help="clients naming photos in the storm phase")
    args = parser.parse_args()
    args.phases = set(args.phases.split(","))

    import shutil

    from pinsface.testing.servers import free_port, wait_healthy

    paths = pick_photos(args.photos)
    photos = [p.read_bytes() for p in paths]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        if "clean" in args.phases:  # in-process first, alone on the machine
            rates, cpu_rates = in_process(args.run, paths, args.repeats)
            print(
                f"in-process identify_many (batch 32, {len(photos)} photos, median of {args.repeats}): "
                f"{statistics.median(rates):.1f} photos/s, {statistics.median(cpu_rates):.1f} photos per CPU-second"
            )
        run = tmp / "run"
        shutil.copytree(args.run, run)
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(run, port, tmp / "key")
        try:
            for _ in range(600):
                if (tmp / "key").exists() or server.poll() is not None:
                    break
                time.sleep(0.5)
            key = (tmp / "key").read_text().strip()
            wait_healthy(url, server, headers={"X-API-Key": key}, timeout=300)
            # Warm up as the in-process figure does: the first batches of each size build the graphs.
            asyncio.run(drive(url, key, photos, clients=32, seconds=60, max_requests=96, seed=0, server_pid=server.pid))
            clean = load_phases(args, url, key, photos, server.pid, tmp)
            if "storm" in args.phases:
                storm(url, key, photos, args.storm_clients, args.seconds, server.pid)
            if "slow" in args.phases:
                slow_clients(url, key, photos[0])
            if "huge" in args.phases:
                huge_images(url, key, photos[0], args.seconds, server.pid)
            print(f"server peak RSS: {peak_rss_mb(server.pid):.0f} MB")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        if clean is not None:  # the machine's load drifts: in-process again, after, against the median of both
            more, more_cpu = in_process(args.run, paths, args.repeats)
            both, both_cpu = statistics.median(rates + more), statistics.median(cpu_rates + more_cpu)
            print(
                f"server / in-process ({both:.1f} photos/s, median of {len(rates + more)} runs): throughput "
                f"{clean['req_per_s'] / both:.0%}, photos per CPU-second "
                f"{clean['ok'] / clean['server_cpu_s'] / both_cpu:.0%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
