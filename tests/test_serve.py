"""`pinsface serve` against a real uvicorn on 127.0.0.1: every endpoint and error, batching, the queue bound,
concurrent enrolments, and an enrolment that survives a killed server."""

from __future__ import annotations

import asyncio
import io
import signal
import stat
import time
from dataclasses import fields

import httpx
import numpy as np
import pytest
from PIL import Image

from pinsface.predict import Face, ImageResult
from pinsface.testing.badinput import SOURCE, make_bad_corpus
from tests.serving import API_KEY, ThreadServer, copy_run, free_port, start_process, uploads, wait_healthy

KEY = {"X-API-Key": API_KEY}
# Reads open (--public-read): the default, every endpoint behind the key, is tested in test_serve_limits.py.
LIMITS = dict(max_upload_mb=1.0, max_request_mb=3.0, max_files=4, max_pending=6, auth="write")


def photos(pins_dir, folder: str, n: int, start: int = 60) -> list:
    return sorted((pins_dir / folder).glob("*.jpg"))[start : start + n]


@pytest.fixture(scope="module")
def server(small_run, tmp_path_factory):
    from pinsface.serve import ServeSettings, create_app

    run = copy_run(small_run[0], tmp_path_factory.mktemp("serve") / "run")
    with ThreadServer(create_app(run, ServeSettings(**LIMITS), api_key=API_KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def bad_files(pins_dir, tmp_path_factory):
    return make_bad_corpus(tmp_path_factory.mktemp("bad"), pins_dir.joinpath(*SOURCE))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_health_page_docs_and_openapi(server):
    h = httpx.get(f"{server.url}/v1/health").json()
    assert h["status"] == "ok" and h["identities"] == 6 and h["model"]["kind"] == "embedding"
    assert 0 < h["thresholds"]["distance"] < 2 and 0 <= h["thresholds"]["probability"] <= 1
    assert h["uptime_s"] >= 0 and h["version"]
    page = httpx.get(server.url)
    assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("app.js", "app.css"):
        assert httpx.get(f"{server.url}/static/{asset}").status_code == 200
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text
    assert httpx.get(f"{server.url}/docs/assets/swagger-ui-bundle.js").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {
        "/v1/identify",
        "/v1/identities",
        "/v1/identities/{name}/faces",
        "/v1/identities/{name}",
        "/v1/health",
    } <= set(paths)


def test_identify_names_faces_in_the_predict_json_record(server, pins_dir):
    files = photos(pins_dir, "pins_Adriana Lima", 2) + photos(pins_dir, "pins_Bill Gates", 2)
    r = httpx.post(f"{server.url}/v1/identify", files=uploads(files), timeout=120)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["source"] for x in results] == [p.name for p in files]
    named = [x["faces"][0]["identity"] for x in results]
    truth = ["Adriana Lima"] * 2 + ["Bill Gates"] * 2
    assert sum(n == t for n, t in zip(named, truth)) >= 3 and set(named) <= set(truth) | {None}
    record, face = results[0], results[0]["faces"][0]
    assert set(record) == {f.name for f in fields(ImageResult)} and set(face) == {f.name for f in fields(Face)}
    assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and len(face["alternatives"]) == 3
    # Overrides: fewer alternatives; a distance threshold nobody meets makes every face unknown.
    r = httpx.post(
        f"{server.url}/v1/identify", params={"top_k": 1, "threshold": 0.0}, files=uploads(files[2:3]), timeout=120
    ).json()["results"][0]
    assert r["faces"][0]["identity"] is None and r["faces"][0]["best_match"] == "Bill Gates"
    assert len(r["faces"][0]["alternatives"]) == 1


def metric(text: str, name: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def test_concurrent_requests_share_batches(server, pins_dir):
    files = photos(pins_dir, "pins_Chris Evans", 6)
    before = httpx.get(f"{server.url}/metrics").text

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*[client.post("/v1/identify", files=uploads([f])) for f in files])

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.json()["results"][0]["source"] for r in responses] == [f.name for f in files]  # each gets its own
    after = httpx.get(f"{server.url}/metrics").text
    batches = metric(after, "pinsface_batch_images_count") - metric(before, "pinsface_batch_images_count")
    images = metric(after, "pinsface_batch_images_sum") - metric(before, "pinsface_batch_images_sum")
    assert images == 6 and batches < 6  # while the first batch runs, the others queue and are named together


def test_bad_files_get_a_per_file_error_in_a_200(server, pins_dir, bad_files):
    blank = png(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1)))
    sent = [
        ("blank.png", blank),
        ("not_an_image.jpg", (bad_files / "not_an_image.jpg").read_bytes()),
        ("bomb.png", (bad_files / "bomb.png").read_bytes()),
        ("empty.jpg", b""),
    ]
    # The declared type says JPEG for every file: the server goes by the content.
    files = [("files", (name, data, "image/jpeg")) for name, data in sent]
    r = httpx.post(f"{server.url}/v1/identify", files=files, timeout=120)
    assert r.status_code == 200
    out = {x["source"]: x for x in r.json()["results"]}
    assert out["blank.png"]["note"] == "no face found" and out["blank.png"]["error"] is None
    assert out["not_an_image.jpg"]["error"] == "not_an_image"
    assert out["bomb.png"]["error"] == "too_large"
    assert out["empty.jpg"]["error"] == "empty_file"
    truncated = httpx.post(f"{server.url}/v1/identify", files=uploads([bad_files / "truncated.jpg"]), timeout=120)
    assert truncated.status_code == 200 and truncated.json()["results"][0]["error"] == "truncated"


def test_upload_caps_and_json_errors(server, pins_dir):
    def error(r, status, code):
        assert r.status_code == status, r.text
        body = r.json()
        assert body["code"] == code and body["message"]
        return r

    big = ("big.png", png(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)))  # > 1 MB
    error(httpx.post(f"{server.url}/v1/identify", files=uploads([big])), 413, "file_too_large")
    parts = [(f"p{i}.bin", b"\0" * 900_000) for i in range(4)]  # each under the file cap, 3.6 MB together
    error(httpx.post(f"{server.url}/v1/identify", files=uploads(parts)), 413, "request_too_large")
    five = photos(pins_dir, "pins_Bill Gates", 5)
    error(httpx.post(f"{server.url}/v1/identify", files=uploads(five)), 413, "too_many_files")
    error(httpx.post(f"{server.url}/v1/identify"), 422, "validation_error")
    error(
        httpx.post(f"{server.url}/v1/identify", params={"top_k": 0}, files=uploads(five[:1])), 422, "validation_error"
    )
    error(httpx.get(f"{server.url}/v1/nothing-here"), 404, "not_found")
    error(httpx.put(f"{server.url}/v1/identify", files=uploads(five[:1])), 405, "method_not_allowed")


def test_state_changes_need_the_key(server, pins_dir):
    one = uploads(photos(pins_dir, "pins_Ben Affleck", 1))
    for headers, status, code in (
        ({}, 401, "missing_api_key"),
        ({"X-API-Key": "wrong-key-wrong-key"}, 403, "invalid_api_key"),
    ):
        r = httpx.post(f"{server.url}/v1/identities/Ben Affleck/faces", files=one, headers=headers)
        assert (r.status_code, r.json()["code"]) == (status, code)
        r = httpx.delete(f"{server.url}/v1/identities/Bill Gates", headers=headers)
        assert (r.status_code, r.json()["code"]) == (status, code)
    people = httpx.get(f"{server.url}/v1/identities").json()  # reads need no key (auth "write")
    assert "Bill Gates" in [p["name"] for p in people["identities"]]


def test_enrol_and_forget_errors(server, pins_dir, bad_files):
    url = f"{server.url}/v1/identities"
    good = photos(pins_dir, "pins_Ben Affleck", 2)
    r = httpx.post(f"{url}/%20/faces", files=uploads(good), headers=KEY)
    assert (r.status_code, r.json()["code"]) == (422, "invalid_name")
    r = httpx.delete(f"{url}/%20%20", headers=KEY)
    assert (r.status_code, r.json()["code"]) == (422, "invalid_name")
    r = httpx.delete(f"{url}/Nobody Atall", headers=KEY)
    assert (r.status_code, r.json()["code"]) == (404, "unknown_identity")
    for name, reason in (("not_an_image.jpg", "not_an_image"), ("bomb.png", "too_large")):
        r = httpx.post(f"{url}/Ben Affleck/faces", files=uploads(good + [bad_files / name]), headers=KEY)
        assert (r.status_code, r.json()["code"], r.json()["reason"]) == (422, "bad_image", reason)
    blank = ("blank.png", png(np.full((200, 200, 3), 128, np.uint8)))
    r = httpx.post(f"{url}/Ben Affleck/faces", files=uploads([blank]), headers=KEY, timeout=120)
    assert (r.status_code, r.json()["code"]) == (422, "no_face")
    assert "Ben Affleck" not in [p["name"] for p in httpx.get(url).json()["identities"]]


def hold_worker(server):
    """Occupy the server's inference thread until the returned event is set (an exclusive call that waits):
    what queues behind it stays queued, so the queue's bound can be tested without racing the work."""
    import threading

    worker = server.app.state.worker
    started, release = threading.Event(), threading.Event()

    def block(_rec):
        started.set()
        release.wait(120)

    thread = threading.Thread(target=lambda: asyncio.run(worker.run(block)), daemon=True)
    thread.start()
    assert started.wait(60)
    return release, thread


def test_a_full_queue_answers_503_while_health_answers(server, pins_dir):
    """Behind a busy inference thread the queue (6 images) takes one request of 4 images and refuses the next
    with 503 + Retry-After, while health still answers; the first is answered once the thread is free."""
    release, thread = hold_worker(server)
    four = uploads(photos(pins_dir, "pins_Bill Gates", 4))

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            first = asyncio.create_task(client.post("/v1/identify", files=four))
            for _ in range(3000):
                if (await client.get("/v1/health")).json()["pending_images"] >= 5:
                    break
                await asyncio.sleep(0.01)
            second = await client.post("/v1/identify", files=four)
            health = await client.get("/v1/health")
            release.set()
            return await first, second, health

    try:
        first, second, health = asyncio.run(scenario())
    finally:
        release.set()
        thread.join(60)
    assert second.status_code == 503 and second.json()["code"] == "busy" and int(second.headers["Retry-After"]) >= 1
    assert health.status_code == 200 and health.json()["pending_images"] == 5
    assert first.status_code == 200 and len(first.json()["results"]) == 4
    metrics = httpx.get(f"{server.url}/metrics", headers=KEY).text
    assert 'pinsface_errors_total{code="busy"}' in metrics and 'route="/v1/identify",status="503"' in metrics


def test_two_concurrent_enrolments_are_both_known_named_and_forgotten(server, pins_dir):
    """Two enrolments at once, while photos are being named: afterwards both people are known and named
    (enrolment imprints the head: the same photos give the same result every time), then forgotten."""
    people = {"Ben Affleck": "pins_Ben Affleck", "Avril Lavigne": "pins_Avril Lavigne"}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=300, headers=KEY) as client:
            enrolments = [
                client.post(f"/v1/identities/{name}/faces", files=uploads(photos(pins_dir, folder, 4, start=0)))
                for name, folder in people.items()
            ]
            naming = client.post("/v1/identify", files=uploads(photos(pins_dir, "pins_Bill Gates", 2)))
            return await asyncio.gather(*enrolments, naming)

    *enrolled, named_meanwhile = asyncio.run(scenario())
    assert named_meanwhile.status_code == 200
    for r, name in zip(enrolled, people):
        assert r.status_code == 200, r.text
        s = r.json()
        assert s["identity"] == name and s["new_identity"] and s["faces_used"] >= 3 and s["warnings"] == []
        cluster = s["cluster"]
        assert sum(f["new"] for f in cluster["faces"]) == s["faces_used"] and cluster["neighbours"]
    known = {p["name"]: p for p in httpx.get(f"{server.url}/v1/identities", headers=KEY).json()["identities"]}
    assert len(known) == 8 and known["Ben Affleck"]["enrolled"] and known["Avril Lavigne"]["enrolled"]
    assert not known["Bill Gates"]["enrolled"] and known["Bill Gates"]["faces"] > 10
    unseen = photos(pins_dir, "pins_Ben Affleck", 3, start=40) + photos(pins_dir, "pins_Avril Lavigne", 3, start=40)
    results = httpx.post(f"{server.url}/v1/identify", files=uploads(unseen[:4]), headers=KEY, timeout=120)
    results = results.json()["results"]
    more = httpx.post(f"{server.url}/v1/identify", files=uploads(unseen[4:]), headers=KEY, timeout=120)
    results += more.json()["results"]
    named = [r["faces"][0]["identity"] if r["faces"] else None for r in results]
    assert sum(n == "Ben Affleck" for n in named[:3]) >= 2 and sum(n == "Avril Lavigne" for n in named[3:]) >= 2
    metrics = httpx.get(f"{server.url}/metrics", headers=KEY).text
    assert 'pinsface_faces_total{result="named"}' in metrics and "pinsface_batch_images_count" in metrics
    for name in people:
        r = httpx.delete(f"{server.url}/v1/identities/{name.lower().replace(' ', '_')}", headers=KEY, timeout=300)
        assert r.status_code == 200 and r.json()["identity"] == name
    health = httpx.get(f"{server.url}/v1/health", headers=KEY).json()
    assert health["identities"] == 6 and health["pending_images"] == 0


def test_a_killed_server_keeps_an_acknowledged_enrolment(small_run, pins_dir, tmp_path):
    run = copy_run(small_run[0], tmp_path / "run")
    key_file = tmp_path / "secrets" / "api_key"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(run, port, "--auth", "all", "--api-key-file", str(key_file), log=tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 180
        while not key_file.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        key = {"X-API-Key": key_file.read_text().strip()}
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key["X-API-Key"]) >= 32
        wait_healthy(url, process, headers=key)
        r = httpx.get(f"{url}/v1/identities")  # --auth all: reads need the key too
        assert (r.status_code, r.json()["code"]) == (401, "missing_api_key")
        r = httpx.post(
            f"{url}/v1/identities/Ben Affleck/faces",
            headers=key,
            timeout=300,
            files=uploads(photos(pins_dir, "pins_Ben Affleck", 5, start=0)),
        )
        assert r.status_code == 200, r.text
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        process = start_process(run, port, "--auth", "all", "--api-key-file", str(key_file), log=tmp_path / "serve.log")
        wait_healthy(url, process, headers=key)
        people = {p["name"]: p for p in httpx.get(f"{url}/v1/identities", headers=key).json()["identities"]}
        assert people["Ben Affleck"]["enrolled"] and people["Ben Affleck"]["faces"] >= 4
        results = httpx.post(
            f"{url}/v1/identify",
            headers=key,
            timeout=120,
            files=uploads(photos(pins_dir, "pins_Ben Affleck", 3, start=40)),
        ).json()["results"]
        assert sum(r["faces"][0]["identity"] == "Ben Affleck" for r in results if r["faces"]) >= 2
    finally:
        process.kill()
        process.wait(30)


def test_trained_labels_are_saved_and_default_to_every_label(small_run, tmp_path):
    import json

    from pinsface.gallery import Gallery

    gallery = Gallery.load(small_run[0] / "gallery.npz")
    assert gallery.trained_labels == gallery.labels and len(gallery.labels) == 6
    with np.load(small_run[0] / "gallery.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    del meta["trained_labels"]  # a gallery saved before the field existed
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "old.npz", **arrays)
    assert Gallery.load(tmp_path / "old.npz").trained_labels == gallery.labels


def test_enrolment_decodes_phone_photos_at_reduced_scale(server, pins_dir, monkeypatch):
    """Enrolment uploads are checked and used as `predict` decodes them: a 12-megapixel photo at reduced scale,
    never in full."""
    from pinsface.testing.photos import phone_photo, record_decodes

    decoded = record_decodes(monkeypatch)
    sources = photos(pins_dir, "pins_Alvaro Morte", 2, start=10)
    files = [(f"phone{k}.jpg", phone_photo(p, "Alvaro Morte", seed=k)[0]) for k, p in enumerate(sources)]
    url = f"{server.url}/v1/identities/Alvaro Morte"
    r = httpx.post(f"{url}/faces", files=uploads(files), headers=KEY, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["faces_used"] == 2
    assert len(decoded) >= 2 and all(h * w <= 2000 * 1500 for h, w in decoded)
    assert httpx.delete(url, headers=KEY, timeout=120).status_code == 200
