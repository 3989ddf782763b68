"""The web page in a real headless Chromium (Debian's package, driven by Playwright; nothing downloads a browser):
name a known face, enrol a person, see them named in a new photo, forget them. Screenshots go to tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.serving import API_KEY, ThreadServer, copy_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def photos(pins_dir, folder: str, n: int, start: int = 60) -> list[str]:
    return [str(p) for p in sorted((pins_dir / folder).glob("*.jpg"))[start : start + n]]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError("Debian's chromium is missing: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_name_enrol_name_forget_in_the_browser(small_run, pins_dir, browser, tmp_path):
    from playwright.sync_api import expect

    from pinsface.serve import create_app

    run = copy_run(small_run[0], tmp_path / "run")
    shots = tmp_path / "screens"
    shots.mkdir()
    with ThreadServer(create_app(run, api_key=API_KEY)) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)

        # 1. The page loads, asks once for the key (every endpoint needs it by default) and lists the people.
        page.goto(server.url)
        expect(page.get_by_role("heading", name="Name the faces in photos")).to_be_visible()
        expect(page.locator("#key-dialog")).to_be_visible()
        page.screenshot(path=shots / "0-key.png")
        page.locator("#key-input").fill(API_KEY)
        page.locator("#key-input").press("Enter")
        expect(page.locator("#people-count")).to_have_text("6 of 6 people")
        expect(page.locator("#health")).to_contain_text("6 people known")

        # 2. A shared Pins photo of a known person: the right name is drawn over the face.
        page.get_by_label("Choose one or more photos, or drop them here").set_input_files(
            photos(pins_dir, "pins_Bill Gates", 1, start=70) + photos(pins_dir, "pins_Zendaya", 3, start=70)
        )
        bill = page.locator('.face.known[data-identity="Bill Gates"]')
        expect(bill).to_have_count(1, timeout=120_000)
        expect(page.locator(".face")).to_have_count(4)
        # Zendaya is a stranger. The run rejects strangers at a calibrated rate (most, not all; it is trained
        # afresh for each session): most of her three photos are shown as unknown. (Not Ben Affleck, enrolled
        # below: the 6-person run takes about half his photos for Chris Evans, within its thresholds.)
        assert page.locator(".face.unknown").count() >= 2
        bill.focus()
        expect(bill.locator(".tip")).to_be_visible()
        expect(bill.locator(".tip")).to_contain_text("probability")
        page.screenshot(path=shots / "1-named.png", full_page=True)

        # 3. Enrol a person from photos (the key is not asked again); a progress bar shows while it runs.
        page.get_by_label("Name", exact=True).fill("Ben Affleck")
        page.get_by_label("Photos of that person").set_input_files(photos(pins_dir, "pins_Ben Affleck", 6, start=0))
        page.get_by_role("button", name="Enrol", exact=True).click()
        expect(page.locator("#enrol-result h3")).to_have_text("Enrolled Ben Affleck", timeout=300_000)
        expect(page.locator("#enrol-progress")).to_be_hidden()
        expect(page.locator("#enrol-result .warning")).to_have_count(0)
        expect(page.locator("#enrol-result svg.cluster circle.new")).to_have_count(6)
        expect(page.locator("#people-count")).to_have_text("7 of 7 people")
        page.locator("#enrol-result").scroll_into_view_if_needed()
        page.screenshot(path=shots / "3-enrolled.png", full_page=True)

        # 3b. Photos of someone known, under a new name: enrolled, with a warning on the page.
        page.get_by_label("Name", exact=True).fill("Mr Gates")
        page.get_by_label("Photos of that person").set_input_files(photos(pins_dir, "pins_Bill Gates", 3, start=80))
        page.get_by_role("button", name="Enrol", exact=True).click()
        expect(page.locator("#enrol-result h3")).to_have_text("Enrolled Mr Gates", timeout=300_000)
        expect(page.locator("#enrol-result .warning")).to_contain_text("Bill Gates")
        page.screenshot(path=shots / "3b-warning.png", full_page=True)
        assert httpx.delete(f"{server.url}/v1/identities/Mr Gates", headers={"X-API-Key": API_KEY}).status_code == 200

        # 4. The new person is named in a new photo.
        page.get_by_label("Choose one or more photos, or drop them here").set_input_files(
            photos(pins_dir, "pins_Ben Affleck", 1, start=70)
        )
        ben = page.locator('.face.known[data-identity="Ben Affleck"]')
        expect(ben).to_have_count(1, timeout=120_000)
        ben.hover()
        page.screenshot(path=shots / "4-named-after-enrolment.png", full_page=True)

        # 5. Search, forget after a confirmation (the key is not asked again).
        page.get_by_label("Search people").fill("affl")
        expect(page.locator("#people-list li")).to_have_count(1)
        page.get_by_role("button", name="Forget Ben Affleck").click()
        expect(page.locator("#confirm-dialog")).to_be_visible()
        expect(page.locator("#confirm-title")).to_have_text("Forget Ben Affleck?")
        page.screenshot(path=shots / "5-confirm.png")
        page.get_by_role("button", name="Forget", exact=True).click()
        expect(page.locator("#status")).to_contain_text("Forgot Ben Affleck", timeout=120_000)
        expect(page.locator("#people-list li")).to_have_count(0)
        # The photo on show is named again: nobody is called Ben Affleck any more.
        expect(page.locator('.face[data-identity="Ben Affleck"]')).to_have_count(0, timeout=120_000)
        expect(page.locator(".face")).to_have_count(1)
        page.get_by_label("Search people").fill("")
        expect(page.locator("#people-count")).to_have_text("6 of 6 people")
        page.screenshot(path=shots / "6-forgotten.png", full_page=True)
        assert not page.locator("#key-dialog").is_visible()

        # A phone-width screen: nothing wider than the viewport.
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(server.url)
        phone.locator("#key-input").fill(API_KEY)
        phone.locator("#key-input").press("Enter")
        expect(phone.locator("#people-count")).to_have_text("6 of 6 people")
        phone.get_by_label("Choose one or more photos, or drop them here").set_input_files(
            photos(pins_dir, "pins_Bill Gates", 1, start=71)
        )
        expect(phone.locator(".face")).to_have_count(1, timeout=120_000)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        phone.screenshot(path=shots / "7-phone.png", full_page=True)

        people = httpx.get(f"{server.url}/v1/identities", headers={"X-API-Key": API_KEY}).json()["identities"]
        assert "Ben Affleck" not in [p["name"] for p in people]
        # The only refused requests are the two sent at load, before the key was known.
        assert [e for e in errors if "401" not in e] == [] and sum("401" in e for e in errors) <= 2, errors
    print(f"screenshots: {shots}")
