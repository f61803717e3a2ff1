"""The studio in a real browser: Debian's Chromium, headless, driven by Playwright, against the app as users start it.

It trains a few steps on a shipped subject, watches progress and previews, reloads the page, samples with the new
adapter, lists it, and saves a screenshot of each tab. Chromium missing is a failure, not a skip (CI installs it):
only ``ETHER_STUDIO_SKIP_BROWSER=1`` skips, deliberately. ``STUDIO_SCREENSHOTS=docs/images`` also writes the
screenshots there, ``STUDIO_TRAIN_STEPS`` and ``STUDIO_SAMPLING_STEPS`` train and sample longer (how the docs'
pictures are made).
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from PIL import Image

from ether_diffusion.io import read_adapter_file

pytestmark = pytest.mark.slow  # end to end
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("ETHER_STUDIO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRAIN_STEPS = int(os.environ.get("STUDIO_TRAIN_STEPS", "6"))
SAMPLING_STEPS = int(os.environ.get("STUDIO_SAMPLING_STEPS", "4"))

skip_on_request = pytest.mark.skipif(
    os.environ.get("ETHER_STUDIO_SKIP_BROWSER") == "1", reason="ETHER_STUDIO_SKIP_BROWSER=1 asked to skip"
)


def start_studio(command: list[str], workdir: Path, log: Path, timeout: float = 120.0):
    """Start the studio as a user would, on a free port; return (process, url) once it answers."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    handle = open(log, "w")
    process = subprocess.Popen(
        [*command, "--port", str(port), "--workdir", str(workdir)],
        cwd=ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the studio exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(f"the studio did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_studio(process) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (apt-get install chromium; .ci/run does) or set "
            "ETHER_STUDIO_CHROMIUM; set ETHER_STUDIO_SKIP_BROWSER=1 only to skip on purpose"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_cli_starts_the_studio_on_localhost(tmp_path):
    cli = Path(sys.executable).parent / "ether-diffusion"
    process, url = start_studio([str(cli), "studio"], tmp_path / "ws", tmp_path / "log.txt")
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            assert "ETHER Studio" in response.read().decode()
        assert f"Running on local URL:  {url.rstrip('/')}" in (tmp_path / "log.txt").read_text()
    finally:
        stop_studio(process)


@skip_on_request
def test_train_preview_sample_in_a_browser(browser, tmp_path):
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    process, url = start_studio([sys.executable, "app/app.py"], tmp_path / "ws", tmp_path / "log.txt")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        status = page.locator("#train-status")
        expect(status).to_contain_text("No training job yet", timeout=30_000)
        assert "a sks star" in page.locator("#instance-prompt textarea, #instance-prompt input").input_value()

        # a bad upload is refused on the page with the file's name, and nothing starts
        pictures = []
        for i in range(2):
            pictures.append(tmp_path / f"photo{i}.png")
            Image.new("RGB", (48, 48), (200, 40 * i, 0)).save(pictures[-1])
        (tmp_path / "fake.png").write_text("not pixels")
        page.get_by_text("My images").click()
        page.locator("#uploads input[type=file]").set_input_files([*map(str, pictures), str(tmp_path / "fake.png")])
        expect(page.locator("#uploads")).to_contain_text("fake", timeout=15_000)
        page.locator("#start").click()
        expect(page.get_by_text("fake.png: not an image").first).to_be_visible(timeout=15_000)
        expect(status).to_contain_text("No training job yet")
        page.get_by_text("Shipped subject").first.click()

        page.locator("#adapter-name input, #adapter-name textarea").fill("browser-star")
        page.locator("#train-steps input").fill(str(TRAIN_STEPS))
        page.locator("#class-images input").fill("2")
        page.locator("#preview-settings").get_by_text("Previews").click()
        page.locator("#preview-every input").fill(str(max(TRAIN_STEPS // 2, 1)))
        page.locator("#preview-steps input").fill(str(SAMPLING_STEPS))
        page.locator("#start").click()
        expect(status).to_contain_text("browser-star", timeout=30_000)  # the job started and the page knows
        expect(status).to_contain_text("loss", timeout=120_000)  # live step / loss / lr
        expect(page.locator("#previews img").first).to_be_visible(timeout=60_000)  # a preview, step 0 onwards
        expect(status).to_contain_text("done", timeout=300_000)
        expect(status).to_contain_text(f"step {TRAIN_STEPS} / {TRAIN_STEPS}")
        expect(page.locator("#previews")).to_contain_text("step 0 · base model (baseline)")
        page.screenshot(path=str(shots / "studio_train.png"), full_page=True)

        # a second start with the same name: the reason reaches the page
        page.locator("#start").click()
        expect(page.get_by_text("already exists").first).to_be_visible(timeout=15_000)

        # reloading the page shows the job as it is on the server
        page.reload()
        expect(status).to_contain_text(f"step {TRAIN_STEPS} / {TRAIN_STEPS}", timeout=30_000)
        expect(page.locator("#previews img").first).to_be_visible(timeout=30_000)

        page.get_by_role("tab", name="Sample").click()
        page.locator("#adapter-slot-0 input").click()
        page.get_by_role("option", name="browser-star").click()
        page.locator("#seeds input, #seeds textarea").fill("0")
        page.locator("#sample-steps input[type=number]").fill(str(SAMPLING_STEPS))
        page.locator("#generate").click()
        expect(page.locator("#sample-note")).to_contain_text("2 images in", timeout=120_000)
        expect(page.locator("#samples")).to_contain_text("seed 0 · browser-star×1")
        expect(page.locator("#samples")).to_contain_text("seed 0 · base model")
        expect(page.locator("#samples img")).to_have_count(2)
        page.screenshot(path=str(shots / "studio_sample.png"), full_page=True)

        page.get_by_role("tab", name="Adapters").click()
        table = page.locator("#adapter-table")
        expect(table).to_contain_text("browser-star", timeout=15_000)
        expect(table).to_contain_text("ETHER+")
        page.screenshot(path=str(shots / "studio_adapters.png"), full_page=True)
        with page.expect_download(timeout=15_000) as download:
            page.locator("#export").click()
        assert download.value.suggested_filename == "browser-star.safetensors"
        download.value.save_as(tmp_path / "exported.safetensors")
        assert read_adapter_file(tmp_path / "exported.safetensors").extra["steps"] == str(TRAIN_STEPS)
        assert errors == [], errors
    finally:
        stop_studio(process)

    for shot in shots.iterdir():
        assert shot.stat().st_size > 10_000, shot
    if os.environ.get("STUDIO_SCREENSHOTS"):
        target = ROOT / os.environ["STUDIO_SCREENSHOTS"]
        target.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copyfile(shot, target / shot.name)
