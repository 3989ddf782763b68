"""Enrolment by imprinting against a real `pinsface serve` on 127.0.0.1: names, idempotence, look-alike
warnings, thresholds that do not move, saves that write the change alone, repeatable results and bounded
memory over many enrolments."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.serving import API_KEY, ThreadServer, copy_run, free_port, start_process, uploads, wait_healthy

KEY = {"X-API-Key": API_KEY}


def photos(pins_dir, folder: str, n: int, start: int = 0) -> list:
    return sorted((pins_dir / folder).glob("*.jpg"))[start : start + n]


@pytest.fixture(scope="module")
def served(small_run, tmp_path_factory):
    from pinsface.serve import ServeSettings, create_app

    run = copy_run(small_run[0], tmp_path_factory.mktemp("enrol") / "run")
    with ThreadServer(create_app(run, ServeSettings(), api_key=API_KEY)) as s:
        s.run = run
        yield s


def enrol(server, name: str, files, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/identities/{name}/faces", files=uploads(files), headers=KEY, timeout=120, **kw)


def test_one_name_rule_for_the_server_and_the_cli(served, pins_dir):
    one = photos(pins_dir, "pins_Ben Affleck", 1)
    for raw in ("%2E%2E", "%2E%2E%2E", "bad%FFname", "a%5Cb"):
        r = enrol(served, raw, one)
        assert (r.status_code, r.json()["code"]) == (422, "invalid_name"), raw
    from pinsface.dataset import name_problem

    assert name_problem("..") and name_problem("a\udcffb") and name_problem("x\ufffdy")
    # Underscores and spaces name the same person; the name is shown as first given.
    r = enrol(served, "Richard_Gere", photos(pins_dir, "pins_Ben Affleck", 3))
    assert r.status_code == 200 and r.json()["new_identity"], r.text
    r = enrol(served, "richard gere", photos(pins_dir, "pins_Ben Affleck", 2, start=3))
    assert r.status_code == 200 and not r.json()["new_identity"] and r.json()["identity"] == "Richard_Gere"
    people = httpx.get(f"{served.url}/v1/identities", headers=KEY).json()["identities"]
    assert [p["faces"] for p in people if p["name"] == "Richard_Gere"] == [5]
    assert httpx.delete(f"{served.url}/v1/identities/Richard Gere", headers=KEY).json()["identity"] == "Richard_Gere"


def test_enrolment_is_idempotent_by_content_and_warns_of_a_look_alike(served, pins_dir):
    files = photos(pins_dir, "pins_Avril Lavigne", 3)
    first = enrol(served, "Avril Lavigne", files)
    assert first.status_code == 200 and first.json()["faces_used"] == 3
    again = enrol(served, "Avril Lavigne", files).json()
    assert again["faces_used"] == 0 and len(again["duplicates"]) == 3 and again["faces"] == first.json()["faces"]
    # A new name for photos of someone known: enrolled, with a warning naming who they look like.
    twin = enrol(served, "Mr Gates", photos(pins_dir, "pins_Bill Gates", 3, start=70)).json()
    assert [w["identity"] for w in twin["warnings"] if w["code"] == "looks_like_known"] == ["Bill Gates"]
    # The same photos under another name add nothing, and say whom they were enrolled as.
    other = enrol(served, "Someone Else", files).json()
    assert other["faces_used"] == 0 and [w["identity"] for w in other["warnings"]] == ["Avril Lavigne"]
    for name in ("Avril Lavigne", "Mr Gates"):
        assert httpx.delete(f"{served.url}/v1/identities/{name}", headers=KEY).status_code == 200


def test_thresholds_and_trained_people_do_not_move_and_saves_write_the_change_alone(served, pins_dir):
    run = served.run
    health = httpx.get(f"{served.url}/v1/health", headers=KEY).json()
    bill = photos(pins_dir, "pins_Bill Gates", 4, start=60)
    before = httpx.post(f"{served.url}/v1/identify", files=uploads(bill), headers=KEY, timeout=120).json()
    big = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (run / "model.keras", run / "gallery.npz")}
    r = enrol(served, "Ben Affleck", photos(pins_dir, "pins_Ben Affleck", 4))
    assert r.status_code == 200
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["files"]["model"] == "model.keras" and manifest["files"]["gallery"] == "gallery.npz"
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in big} == big  # neither written again
    assert all((run / name).stat().st_size < 1_000_000 for name in manifest["deltas"])
    assert httpx.get(f"{served.url}/v1/health", headers=KEY).json()["thresholds"] == health["thresholds"]
    after = httpx.post(f"{served.url}/v1/identify", files=uploads(bill), headers=KEY, timeout=120).json()
    # A trained person's checked probability is the same as before anyone was enrolled.
    for a, b in zip(before["results"], after["results"]):
        assert [f["identity"] for f in a["faces"]] == [f["identity"] for f in b["faces"]]
        assert [f["probability"] for f in a["faces"]] == [f["probability"] for f in b["faces"]]
    assert httpx.delete(f"{served.url}/v1/identities/Ben Affleck", headers=KEY).status_code == 200


def test_imprinting_is_repeatable_bit_for_bit(small_run, pins_dir, tmp_path):
    from pinsface.predict import Recognizer

    rec = Recognizer.load(copy_run(small_run[0], tmp_path / "run"))
    files = [str(p) for p in photos(pins_dir, "pins_Ben Affleck", 4)]
    rec.enroll("Ben Affleck", files)
    first = rec.head.kernel[:, -1].copy()
    rec.forget("Ben Affleck")
    rec.enroll("Ben Affleck", files)
    assert np.array_equal(rec.head.kernel[:, -1], first)
    assert np.array_equal(Recognizer.load(rec.run_dir).head.kernel, rec.head.kernel)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def test_fifty_enrolments_grow_the_servers_peak_memory_little(small_run, pins_dir, tmp_path):
    """Each enrolment of 2 new photos is followed by forgetting that person; after a few to warm up, 50 more
    grow the server's peak RSS by at most 50 MB (imprinting builds no model, and the detector's networks run on
    batches of fixed sizes, so TensorFlow's per-shape caches stop growing)."""
    run = copy_run(small_run[0], tmp_path / "run")
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(run, port, "--api-key-file", str(key_file), log=tmp_path / "serve.log")
    folders = ["pins_Ben Affleck", "pins_Avril Lavigne", "pins_Alvaro Morte", "pins_Zendaya"]
    try:
        wait_healthy(url, process, headers=KEY)

        def cycle(k: int) -> None:
            files = photos(pins_dir, folders[k % 4], 2, start=2 * (k // 4))
            r = httpx.post(f"{url}/v1/identities/P{k}/faces", files=uploads(files), headers=KEY, timeout=120)
            assert r.status_code == 200, r.text
            assert httpx.delete(f"{url}/v1/identities/P{k}", headers=KEY, timeout=120).status_code == 200

        for k in range(5):
            cycle(k)
        start = peak_rss_mb(process.pid)
        for k in range(5, 55):
            cycle(k)
        grown = peak_rss_mb(process.pid) - start
        print(f"peak RSS grew {grown:.1f} MB over 50 enrolments and forgettings")
        assert grown <= 50
        assert len(json.loads((run / "manifest.json").read_text())["deltas"]) <= 64
    finally:
        process.kill()
        process.wait(30)


def test_pinsface_refit_trains_the_head_on_everyone_and_recalibrates(small_run, pins_dir, tmp_path, capsys):
    from pinsface.cli import main
    from pinsface.predict import Recognizer

    run = copy_run(small_run[0], tmp_path / "run")
    rec = Recognizer.load(run)
    rec.enroll("Ben Affleck", [str(p) for p in photos(pins_dir, "pins_Ben Affleck", 6)])
    imprinted = rec.head.kernel.copy()
    assert main(["refit", str(run)]) == 0
    assert "refitted the head on 7 identities" in capsys.readouterr().out
    refitted = Recognizer.load(run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["deltas"] == [] and manifest["files"]["model"] != "model.keras"  # a whole new generation
    assert refitted.labels == rec.labels and refitted.head.n_classes == 7
    assert not np.array_equal(refitted.head.kernel, imprinted)
    results = refitted.identify_many([str(p) for p in photos(pins_dir, "pins_Ben Affleck", 4, start=40)])
    assert sum(r.faces[0].identity == "Ben Affleck" for r in results if r.faces) >= 3
