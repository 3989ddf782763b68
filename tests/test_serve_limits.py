"""`pinsface serve` against hostile and careless clients, on a real uvicorn on 127.0.0.1: the key by default,
the Host check, the key outside the run folder, connection caps, slow headers and bodies, oversized and cut
bodies, security headers, and health under load."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.serving import API_KEY, ThreadServer, copy_run, free_port, start_process, uploads, wait_healthy

KEY = {"X-API-Key": API_KEY}
LIMITS = dict(
    max_request_mb=1.0,
    max_upload_mb=1.0,
    max_connections_per_client=40,
    header_timeout_s=1.0,
    body_grace_s=1.0,
    body_idle_s=1.0,
    min_body_rate_kb=64.0,
)


@pytest.fixture(scope="module")
def server(small_run, tmp_path_factory):
    from pinsface.serve import ServeSettings, create_app

    run = copy_run(small_run[0], tmp_path_factory.mktemp("limits") / "run")
    with ThreadServer(create_app(run, ServeSettings(**LIMITS), api_key=API_KEY), guarded=True) as s:
        yield s


def photo(pins_dir, folder="pins_Bill Gates", k=60):
    return sorted((pins_dir / folder).glob("*.jpg"))[k]


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_every_endpoint_needs_the_key_and_the_host_must_be_allowed(server, pins_dir):
    for method, path in (("GET", "/v1/health"), ("GET", "/v1/identities"), ("GET", "/metrics")):
        r = httpx.request(method, server.url + path)
        assert (r.status_code, r.json()["code"]) == (401, "missing_api_key"), path
    r = httpx.post(f"{server.url}/v1/identify", files=uploads([photo(pins_dir)]))
    assert r.status_code == 401
    assert httpx.get(server.url).status_code == 200  # the page holds no data
    assert httpx.head(f"{server.url}/v1/health", headers=KEY).status_code == 200
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
        r = httpx.get(f"{server.url}/v1/health", headers={**KEY, "Host": host})
        assert (r.status_code, r.json()["code"]) == (400, "host_not_allowed"), host
    assert httpx.get(f"http://localhost:{server.port}/v1/health", headers=KEY).status_code == 200
    # Security headers on answers the app never saw (refused by the guard) as on the others.
    for r in (httpx.get(f"{server.url}/v1/identities"), httpx.get(f"{server.url}/nowhere", headers=KEY)):
        assert (
            r.headers["x-content-type-options"] == "nosniff"
            and "frame-ancestors" in r.headers["content-security-policy"]
        )


def test_oversized_chunked_bodies_get_413_and_cut_multipart_bodies_400(server, pins_dir):
    def chunks():
        yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(
        f"{server.url}/v1/identify",
        content=chunks(),
        headers={**KEY, "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert (r.status_code, r.json()["code"]) == (413, "request_too_large")
    body = httpx.Request("POST", server.url, files=uploads([photo(pins_dir)])).read()
    boundary = body.split(b"\r\n", 1)[0][2:]
    cut = body[: body.rindex(b"--" + boundary + b"--")]
    headers = {**KEY, "Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}
    r = httpx.post(f"{server.url}/v1/identify", content=cut, headers=headers)
    assert (r.status_code, r.json()["code"]) == (400, "truncated_body")
    r = httpx.post(f"{server.url}/v1/identify", content=body, headers=headers, timeout=120)
    assert r.status_code == 200 and r.json()["results"][0]["faces"]


def test_slow_headers_and_slow_bodies_are_cut_off(server):
    slow_headers = connect(server.port)
    slow_headers.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    slow_body = connect(server.port)
    slow_body.sendall(
        b"POST /v1/identify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + API_KEY.encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
    )
    assert read_all(slow_headers).startswith(b"HTTP/1.1 408")
    answer = read_all(slow_body)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


@pytest.fixture()
def patient_server(small_run, tmp_path):
    """The server with its default header timeout: slow connections stay open for the length of a test."""
    from pinsface.serve import ServeSettings, create_app

    settings = ServeSettings(**{**LIMITS, "header_timeout_s": 60.0})
    with ThreadServer(
        create_app(copy_run(small_run[0], tmp_path / "run"), settings, api_key=API_KEY), guarded=True
    ) as s:
        yield s


def test_three_hundred_slow_connections_leave_room_for_a_normal_request(patient_server, pins_dir):
    """300 connections from 10 other loopback addresses send part of their headers and wait; one address over
    its cap is refused at once (429); a normal client is answered meanwhile and health reports the
    connections."""
    server = patient_server
    slow = []
    try:
        for k in range(300):
            s = connect(server.port, f"127.0.0.{2 + k % 10}")
            s.sendall(b"POST /v1/identify HTTP/1.1\r\n")
            slow.append(s)
        over = [connect(server.port, "127.0.0.2") for _ in range(15)]  # 127.0.0.2 had 30 of its 40
        slow += over
        answers = []
        for s in over:
            s.settimeout(2)
            try:
                answers.append(s.recv(100))
            except TimeoutError:  # admitted: nothing to read yet
                answers.append(b"")
        assert sum(a.startswith(b"HTTP/1.1 429") for a in answers) == 5
        r = httpx.post(f"{server.url}/v1/identify", files=uploads([photo(pins_dir)]), headers=KEY, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["faces"][0]["identity"] == "Bill Gates"
        health = httpx.get(f"{server.url}/v1/health", headers=KEY).json()
        connections = health["load"]["connections"]
        assert connections["open"] >= 250 and connections["refused"] >= 1
        assert connections["busiest_client"] <= connections["max_per_client"] == 40
    finally:
        for s in slow:
            s.close()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/v1/health", headers=KEY).json()["load"]["connections"]["open"] > 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_the_key_lives_outside_the_run_and_the_url_is_printed(small_run, tmp_path, monkeypatch):
    run = copy_run(small_run[0], tmp_path / "run")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    port = free_port()
    log = tmp_path / "serve.log"
    process = start_process(run, port, log=log)
    try:
        key_file = tmp_path / "config" / "pinsface" / "api_key"
        deadline = time.monotonic() + 180
        while not key_file.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        key = {"X-API-Key": key_file.read_text().strip()}
        wait_healthy(f"http://127.0.0.1:{port}", process, headers=key)
        assert not list(run.rglob("api_key*"))
        deadline = time.monotonic() + 30
        while f"http://127.0.0.1:{port}/" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"http://127.0.0.1:{port}/" in log.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/identities").status_code == 401
    finally:
        process.kill()
        process.wait(30)


def flat_png(side: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_request_of_huge_photos_over_the_pixel_budget_is_refused_undecoded(server, pins_dir):
    huge = flat_png(6000)  # 36 megapixels in a few hundred KB: within every size cap
    r = httpx.post(
        f"{server.url}/v1/identify", files=uploads([(f"{k}.png", huge) for k in range(3)]), headers=KEY, timeout=60
    )
    assert (r.status_code, r.json()["code"]) == (413, "too_many_pixels")
    r = httpx.post(f"{server.url}/v1/identities/Flat/faces", files=uploads([("a.png", huge)] * 3), headers=KEY)
    assert (r.status_code, r.json()["code"]) == (413, "too_many_pixels")
    r = httpx.post(f"{server.url}/v1/identify", files=uploads([("one.png", huge)]), headers=KEY, timeout=120)
    assert r.status_code == 200 and r.json()["results"][0]["note"] == "no face found"


def test_a_one_photo_request_is_not_queued_behind_all_of_a_large_one(small_run, pins_dir, tmp_path):
    """Fair queueing: behind a busy inference thread, 16 photos from one client and then 1 from another are
    queued; batches of 4 then serve the single photo second, not after the 16."""
    import asyncio

    from pinsface.serve import ServeSettings, create_app
    from tests.test_serve import hold_worker

    settings = ServeSettings(max_batch=4, max_wait_ms=0.0)
    app = create_app(copy_run(small_run[0], tmp_path / "run"), settings, api_key=API_KEY)
    many = uploads(sorted((pins_dir / "pins_Chris Evans").glob("*.jpg"))[:16])
    one = uploads([photo(pins_dir)])
    with ThreadServer(app, guarded=True) as server:
        release, thread = hold_worker(server)
        done = []

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=300, headers=KEY) as client:

                async def post(files, what):
                    r = await client.post("/v1/identify", files=files)
                    done.append(what)
                    return r

                big = asyncio.create_task(post(many, "sixteen"))
                while (await client.get("/v1/health")).json()["pending_images"] < 17:
                    await asyncio.sleep(0.02)
                small = asyncio.create_task(post(one, "one"))
                while (await client.get("/v1/health")).json()["pending_images"] < 18:
                    await asyncio.sleep(0.02)
                release.set()
                return await big, await small

        try:
            big, small = asyncio.run(scenario())
        finally:
            release.set()
            thread.join(60)
    assert big.status_code == small.status_code == 200 and len(big.json()["results"]) == 16
    assert done == ["one", "sixteen"]
    assert small.json()["results"][0]["faces"][0]["identity"] == "Bill Gates"


def test_binding_beyond_loopback_with_open_reads_is_warned_of():
    from pinsface.serve.auth import allowed_hosts, exposure_warning

    assert exposure_warning("0.0.0.0", "write") and "--public-read" in exposure_warning("192.168.1.5", "write")
    assert exposure_warning("0.0.0.0", "all") is None and exposure_warning("127.0.0.1", "write") is None
    assert exposure_warning("::1", "write") is None and exposure_warning("localhost", "write") is None
    assert allowed_hosts("0.0.0.0", ["faces.example.org"]) == {"localhost", "127.0.0.1", "::1", "faces.example.org"}
