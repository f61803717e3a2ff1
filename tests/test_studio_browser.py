"""The studio in a real browser: Debian's Chromium, headless, driven by Playwright, against the studio as users start it
(``ether-diffusion studio``, ``python -m ether_diffusion.studio.ui``).

DreamBooth: a bad upload refused beside the button (no pop-up); Stop pressed while class images are drawn (their
progress on the page) and while the step-0 baseline is sampled, each acting within seconds and never flipping the
label back; a preset saved and loaded; an estimate before Start; a job with live loss curve, ETA from training steps
only, previews and its TensorBoard folder; a reload that shows the job's settings; sampling with the new adapter;
the Adapters tab, where a broken import names the file and leaves the table as it was; a login (``--auth_file``)
refusing a wrong password and opening the studio with the right one. Control: a control adapter
trained on the tiny world's segmentation set, then sampled from an example map and from a map drawn on the
canvas, beside the same prompt without control. A screenshot of each tab is saved.

Chromium missing is a failure, not a skip (CI installs it): only ``ETHER_STUDIO_SKIP_BROWSER=1`` skips,
deliberately. ``STUDIO_SCREENSHOTS=docs/images`` also writes the screenshots there, ``STUDIO_TRAIN_STEPS`` and
``STUDIO_SAMPLING_STEPS`` train and sample longer (how the docs' pictures are made).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, stop_process
from PIL import Image
from safetensors.torch import load_file

from ether_diffusion.io import read_adapter_file

pytestmark = pytest.mark.slow  # end to end
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("ETHER_STUDIO_CHROMIUM", "/usr/bin/chromium")
STUDIO_MODULE = [sys.executable, "-m", "ether_diffusion.studio.ui"]  # the package's studio, as app/app.py runs it
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
CONTROL_STEPS = int(os.environ.get("STUDIO_CONTROL_STEPS", "4"))
STOP_SECONDS = 6.0  # Stop to "stopped" on the page: one denoising step plus the page's 1 s poll, on a shared machine
TOAST = '[data-testid="toast-body"]'  # a Gradio pop-up: the studio shows none

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
        stop_process(process)


@skip_on_request
def test_a_login_guards_the_studio_in_a_browser(browser, tmp_path):
    """``--auth_file``: the page is a login form and every route behind it answers 401; a wrong password is refused,
    the right one opens a studio that works (a preset saved, the bad preset in the folder named beside it), and the
    password appears nowhere in the log."""
    import urllib.error

    from playwright.sync_api import expect

    password = "correct horse 42"
    users = tmp_path / "users.txt"
    users.write_text(f"# the studio's one user\nalice:{password}\n")
    workspace = tmp_path / "ws"
    (workspace / "presets").mkdir(parents=True)
    (workspace / "presets" / "deep.json").write_text("[" * 30_000 + "]" * 30_000)  # deeper than json's parser goes
    log = tmp_path / "log.txt"
    process, url = start_studio([*STUDIO_MODULE, "--auth_file", str(users)], workspace, log)
    try:
        for route in ("config", "gradio_api/info"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + route, timeout=5)
            assert refused.value.code == 401, route
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        expect(page.locator("body")).to_contain_text("log in with an account the studio was started with")
        page.locator("input[type=text]").first.fill("alice")
        page.locator("input[type=password]").first.fill("wrong horse 42")
        page.get_by_role("button", name="Login").click()
        expect(page.locator("body")).to_contain_text(re.compile("incorrect credentials", re.I), timeout=15_000)
        expect(page.locator("#train-status")).to_have_count(0)
        page.locator("input[type=text]").first.fill("alice")  # the form clears the name after a refusal
        page.locator("input[type=password]").first.fill(password)
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#train-status")).to_contain_text("No training job yet", timeout=30_000)
        page.locator("#presets").get_by_text("Presets").click()
        fill(page, "preset-name", "behind-the-door")
        page.locator("#preset-save").click()
        note = page.locator("#note")
        expect(note).to_contain_text("preset 'behind-the-door' saved", timeout=15_000)
        expect(note).to_contain_text("skipped 1 bad preset(s): deep.json: its JSON is nested deeper than any preset")
        assert (workspace / "presets" / "behind-the-door.json").is_file()
    finally:
        stop_process(process)
    assert password not in log.read_text() and "horse" not in log.read_text()


def fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(str(value))


def phase_of(status_text: str) -> str:
    """The phase line of the job status: the line after the title (``name · kind · method · job id``). Gradio may put
    its own progress text above the markdown while an update is in flight, so the title is found, not assumed first."""
    lines = [line.strip() for line in status_text.splitlines() if line.strip()]
    titles = [i for i, line in enumerate(lines) if " · job " in line]
    return lines[titles[0] + 1] if titles and titles[0] + 1 < len(lines) else ""


def stop_and_watch(page, prefix: str = "") -> tuple[float, list[str]]:
    """Press Stop; return the seconds until the page says "stopped" and the phases it showed once the stop reached it
    (the phase shown when Stop was pressed stays on screen until the next update; that leading run is left out, so a
    phase that comes back after the stop showed is still caught)."""
    status = page.locator(f"#{prefix or 'train-'}status")
    before = phase_of(status.inner_text())
    seen = []
    started = time.monotonic()
    page.locator(f"#{prefix}stop").click()
    while time.monotonic() - started < 60:
        phase = phase_of(status.inner_text())
        if phase and (seen or phase != before):
            seen.append(phase)
        if phase == "stopped":
            return time.monotonic() - started, seen
        page.wait_for_timeout(50)
    raise AssertionError(f"the page did not show 'stopped' within 60 s; phases seen: {seen}")


def eta_seconds(status_text: str) -> int | None:
    found = re.search(r"ETA (\d+):(\d\d)", status_text)
    return int(found[1]) * 60 + int(found[2]) if found else None


def curve_points(page, elem_id: str) -> list[int]:
    """How many points each visible line of a Gradio line plot draws (its SVG paths, with a stroke colour)."""
    paths = page.locator(f"#{elem_id} g.mark-line path")
    visible = [paths.nth(i) for i in range(paths.count()) if paths.nth(i).evaluate("e => getComputedStyle(e).stroke")
               not in ("none", "")]  # fmt: skip
    return sorted(len(re.findall(r"[ML]", path.get_attribute("d") or "")) for path in visible)


def save_shots(shots: Path) -> None:
    for shot in shots.iterdir():
        assert shot.stat().st_size > 10_000, shot
    if os.environ.get("STUDIO_SCREENSHOTS"):
        target = ROOT / os.environ["STUDIO_SCREENSHOTS"]
        target.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copyfile(shot, target / shot.name)


@skip_on_request
def test_train_preview_sample_in_a_browser(browser, tmp_path):  # noqa: C901  (one user's session, in order)
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    workspace = tmp_path / "ws"
    process, url = start_studio(STUDIO_MODULE, workspace, tmp_path / "log.txt")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        status, note = page.locator("#train-status"), page.locator("#note")
        expect(status).to_contain_text("No training job yet", timeout=30_000)
        assert "a sks star" in page.locator("#instance-prompt textarea, #instance-prompt input").input_value()

        # a bad upload is refused beside the button with the file's name, and nothing starts; no pop-up
        pictures = []
        for i in range(2):
            pictures.append(tmp_path / f"photo{i}.png")
            Image.new("RGB", (48, 48), (200, 40 * i, 0)).save(pictures[-1])
        (tmp_path / "fake.png").write_text("not pixels")
        gallery = page.locator("#instance-images img")
        expect(gallery).to_have_count(5, timeout=15_000)  # the shipped subject's images
        page.get_by_text("My images").click()
        expect(gallery).to_have_count(0, timeout=15_000)  # not the shipped subject's any more: nothing uploaded yet
        page.locator("#uploads input[type=file]").set_input_files(list(map(str, pictures)))
        expect(gallery).to_have_count(2, timeout=15_000)  # the uploads
        page.locator("#uploads input[type=file]").set_input_files([*map(str, pictures), str(tmp_path / "fake.png")])
        expect(page.locator("#uploads")).to_contain_text("fake", timeout=15_000)
        page.locator("#start").click()
        expect(note).to_contain_text("fake.png: not an image", timeout=15_000)
        expect(status).to_contain_text("No training job yet")
        assert page.locator(TOAST).count() == 0
        page.get_by_text("Shipped subject").first.click()
        expect(gallery).to_have_count(5, timeout=15_000)

        # Blocks that do not divide the model's widths: said beside the field, before Start
        fill(page, "n-blocks", 7)
        page.locator("#n-blocks input").press("Enter")
        blocks_note = page.locator("#blocks-note")
        expect(blocks_note).to_contain_text("Blocks = 7 does not fit this model", timeout=30_000)
        expect(blocks_note).to_contain_text("n_blocks values that divide")
        fill(page, "n-blocks", 1)
        page.locator("#n-blocks input").press("Enter")
        expect(blocks_note).not_to_contain_text("does not fit", timeout=15_000)
        page.locator("#preview-settings").get_by_text("Previews").click()

        # Stop while class images are drawn (their progress shows): it acts within seconds, never flips back
        fill(page, "adapter-name", "stopped-early")
        fill(page, "class-images", 40)
        fill(page, "preview-steps", 200)  # a batch of class images alone takes minutes
        page.locator("#start").click()
        expect(status).to_contain_text("drawing 40 class images (0/40)", timeout=120_000)
        page.wait_for_timeout(1500)
        seconds, seen = stop_and_watch(page)
        assert seconds < STOP_SECONDS, (seconds, seen)
        assert not {"preparing", "training"} & set(seen), seen
        expect(status).to_contain_text("stopped before training began")

        # Stop while the step-0 baseline is sampled: the same
        fill(page, "adapter-name", "stopped-baseline")
        page.get_by_text("Prior preservation").click()  # off: straight to the baseline
        page.locator("#start").click()
        expect(status).to_contain_text("sampling the step-0 baseline", timeout=120_000)
        page.wait_for_timeout(1500)
        seconds, seen = stop_and_watch(page)
        assert seconds < STOP_SECONDS, (seconds, seen)
        assert not {"preparing", "training"} & set(seen), seen
        page.get_by_text("Prior preservation").click()  # on again

        # a preset: save the form by name, change it, load it back
        fill(page, "adapter-name", "browser-star")
        fill(page, "train-steps", TRAIN_STEPS)
        fill(page, "class-images", 2)
        fill(page, "preview-every", max(TRAIN_STEPS // 2, 1))
        fill(page, "preview-steps", 25)  # the baseline takes longer than the first steps: the ETA must not count it
        page.locator("#presets").get_by_text("Presets").click()
        fill(page, "preset-name", "quick-star")
        page.locator("#preset-save").click()
        expect(note).to_contain_text("preset 'quick-star' saved", timeout=15_000)
        saved = json.loads((workspace / "presets" / "quick-star.json").read_text())
        assert saved["settings"]["max_train_steps"] == TRAIN_STEPS and "adapter_name" not in saved["settings"]
        fill(page, "train-steps", 999)
        fill(page, "preset-name", "../escape")
        page.locator("#preset-save").click()
        expect(note).to_contain_text("is not allowed", timeout=15_000)  # preset names follow adapter names
        page.locator("#preset-list input").click()
        page.get_by_role("option", name="quick-star").click()
        page.locator("#preset-load").click()
        expect(note).to_contain_text("loaded preset 'quick-star'", timeout=15_000)
        expect(page.locator("#train-steps input")).to_have_value(str(TRAIN_STEPS))
        assert page.locator(TOAST).count() == 0

        # the estimate before Start: measured on the loaded model, and says on what it is based
        page.locator("#estimate").click()
        estimate = page.locator("#estimate-text")
        expect(estimate).to_contain_text("Estimate: about", timeout=240_000)
        expect(estimate).to_contain_text("4 real training steps")
        expect(estimate).to_contain_text("MB of CPU memory")
        expect(estimate).to_contain_text("Accuracy")

        page.locator("#start").click()
        expect(status).to_contain_text("browser-star", timeout=30_000)  # the job started and the page knows
        etas = []  # (ETA shown, when)
        deadline = time.monotonic() + 300
        while "done" != phase_of(status.inner_text()) and time.monotonic() < deadline:
            text = status.inner_text()
            assert phase_of(text) != "failed", text
            if phase_of(text) == "training" and eta_seconds(text) is not None:
                etas.append((eta_seconds(text), time.monotonic()))
            page.wait_for_timeout(100)
        finished = time.monotonic()
        expect(status).to_contain_text(f"step {TRAIN_STEPS} / {TRAIN_STEPS}")
        assert etas, "no ETA was shown while training"
        # from training steps only: never more than the time that was really left (a step-0 baseline counted in
        # would make the first ETAs several times too long)
        assert all(eta <= finished - when + 2 for eta, when in etas), (etas, finished)
        expect(status).to_contain_text("TensorBoard: tensorboard --logdir")
        assert list((workspace / "jobs").glob("*-browser-star/output/logs/**/events.out.tfevents.*"))
        expect(page.locator("#train-previews")).to_contain_text("step 0 · base model (baseline)")
        page.wait_for_timeout(1500)  # the last poll draws the whole curve
        assert curve_points(page, "train-loss-curve") == [TRAIN_STEPS, TRAIN_STEPS]  # loss and its running mean
        page.screenshot(path=str(shots / "studio_train.png"), full_page=True)

        # a second start with the same name: the reason shows beside the button, no pop-up
        page.locator("#start").click()
        expect(note).to_contain_text("already exists", timeout=15_000)
        assert page.locator(TOAST).count() == 0
        expect(page.locator("#train-previews img").first).to_be_visible()  # nothing covers the previews

        # reloading the page shows the job as it is on the server, and the form shows its settings
        page.reload()
        expect(status).to_contain_text(f"step {TRAIN_STEPS} / {TRAIN_STEPS}", timeout=30_000)
        expect(page.locator("#adapter-name input, #adapter-name textarea")).to_have_value("browser-star")
        expect(page.locator("#train-steps input")).to_have_value(str(TRAIN_STEPS))  # not the default 400
        expect(page.locator("#class-images input")).to_have_value("2")  # not the default 50
        expect(page.locator("#train-previews img").first).to_be_visible(timeout=30_000)
        expect(page.locator("#train-loss-curve g.mark-line path")).to_have_count(2, timeout=30_000)

        page.get_by_role("tab", name="Sample", exact=True).click()
        page.locator("#adapter-slot-0 input").click()
        page.get_by_role("option", name="browser-star").click()
        page.locator("#seeds input, #seeds textarea").fill("0")
        page.locator("#sample-steps input[type=number]").fill("30")  # long enough to watch the progress bar
        page.locator("#generate").click()
        expect(page.locator("#samples").get_by_text(re.compile(r"denoising step \d+/60"))).to_be_visible(timeout=60_000)
        expect(page.locator("#sample-note")).to_contain_text("2 images in", timeout=120_000)
        expect(page.locator("#samples")).to_contain_text("seed 0 · browser-star×1")
        expect(page.locator("#samples")).to_contain_text("seed 0 · base model")
        expect(page.locator("#samples img")).to_have_count(2)
        page.screenshot(path=str(shots / "studio_sample.png"), full_page=True)

        page.get_by_role("tab", name="Adapters").click()
        table = page.locator("#adapter-table")
        expect(table).to_contain_text("browser-star", timeout=15_000)
        expect(table).to_contain_text("ETHER+")
        # a broken file: the reason names the file (not the upload folder); the table stays as it was
        broken = tmp_path / "upload" / "broken-adapter.safetensors"
        broken.parent.mkdir()
        broken.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(range(200)))
        page.locator("#import-file input[type=file]").set_input_files(str(broken))
        expect(page.locator("#import-file")).to_contain_text("broken-adapter", timeout=15_000)
        page.locator("#import").click()
        adapters_note = page.locator("#adapters-note")
        expect(adapters_note).to_contain_text("broken-adapter.safetensors was not imported", timeout=30_000)
        assert "/tmp" not in adapters_note.inner_text() and "gradio" not in adapters_note.inner_text()
        expect(table).to_contain_text("browser-star")
        assert "Error" not in table.inner_text() and page.locator(TOAST).count() == 0
        page.screenshot(path=str(shots / "studio_adapters.png"), full_page=True)
        with page.expect_download(timeout=15_000) as download:
            page.locator("#export").click()
        assert download.value.suggested_filename == "browser-star.safetensors"
        download.value.save_as(tmp_path / "exported.safetensors")
        assert read_adapter_file(tmp_path / "exported.safetensors").extra["steps"] == str(TRAIN_STEPS)
        # the same adapter as a kohya LoRA, for ComfyUI and A1111
        page.locator("#export-lora").click()
        expect(adapters_note).to_contain_text("kohya LoRA of 'browser-star' (fp32", timeout=60_000)
        with page.expect_download(timeout=15_000) as download:
            page.locator("#lora-file a").first.click()
        assert download.value.suggested_filename == "browser-star-kohya-lora.safetensors"
        download.value.save_as(tmp_path / "lora.safetensors")
        lora = load_file(str(tmp_path / "lora.safetensors"))
        assert lora and all(key.startswith("lora_unet_") for key in lora)
        assert errors == [], errors
    finally:
        stop_process(process)
    save_shots(shots)


def queue_rows(page) -> dict[str, list[str]]:
    """The queue table's rows by adapter name: ``[adapter, method, phase, step, loss, ETA, job]``."""
    rows = {}
    for row in page.locator("#queue-table [role=row][data-index]").all():  # the grid's rows (not its header)
        cells = [cell.strip() for cell in row.locator("[role=gridcell]").all_inner_texts()]
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


@skip_on_request
def test_queued_jobs_train_side_by_side_in_a_browser(browser, tmp_path):
    """Two jobs added to the queue with the form's settings (a third with a name already queued is refused beside
    the button), trained with Train queue: each row shows its own phase, step and loss while the run goes (and
    Start waits for it), both end done, and both adapters are in the Adapters tab."""
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    process, url = start_studio(STUDIO_MODULE, tmp_path / "ws", tmp_path / "log.txt")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        queue_status, queue_note = page.locator("#queue-status"), page.locator("#queue-note")
        expect(queue_status).to_contain_text("The queue is empty", timeout=30_000)
        page.get_by_text("Prior preservation").click()  # off: the queue's steps start at once
        page.locator("#preview-settings").get_by_text("Previews").click()
        fill(page, "preview-every", 10)
        fill(page, "preview-steps", 2)
        for name, steps in (("queue-star", 12), ("queue-star-2", 20)):
            fill(page, "adapter-name", name)
            fill(page, "train-steps", steps)
            page.locator("#queue-add").click()
            expect(queue_note).to_contain_text(f"queued '{name}'", timeout=30_000)
        expect(page.locator("#queue-table")).to_contain_text("queue-star-2", timeout=15_000)
        page.locator("#queue-add").click()  # the last name again
        expect(queue_note).to_contain_text("already trains an adapter named 'queue-star-2'", timeout=15_000)
        assert page.locator(TOAST).count() == 0
        expect(queue_status).to_contain_text("2 queued", timeout=15_000)

        page.locator("#queue-train").click()
        seen: dict[str, set] = {"queue-star": set(), "queue-star-2": set()}
        steps_seen: dict[str, set] = {"queue-star": set(), "queue-star-2": set()}
        start_disabled = False
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = queue_rows(page)
            for name in seen:
                if name in rows:
                    seen[name].add(rows[name][2])
                    steps_seen[name].add(rows[name][3])
            if "training" in queue_status.inner_text():
                start_disabled |= page.locator("#start").is_disabled()
            if all(rows.get(name, ["", "", ""])[2] == "done" for name in seen):
                break
            assert not any(row[2] == "failed" for row in rows.values()), rows
            page.wait_for_timeout(100)
        rows = queue_rows(page)
        assert [rows[name][2:4] for name in seen] == [["done", "12 / 12"], ["done", "20 / 20"]], rows
        assert all("training" in phases for phases in seen.values()), seen
        # each row moved on its own: steps in between were shown for both jobs
        assert all(len(steps - {"0 / 12", "0 / 20", "12 / 12", "20 / 20"}) >= 1 for steps in steps_seen.values())
        assert start_disabled, "Start stayed enabled while the queue trained"
        expect(page.locator("#start")).to_be_enabled(timeout=15_000)
        page.screenshot(path=str(shots / "studio_queue.png"), full_page=True)

        page.get_by_role("tab", name="Adapters").click()
        table = page.locator("#adapter-table")
        expect(table).to_contain_text("queue-star-2", timeout=15_000)
        assert "queue-star" in table.inner_text()
        assert errors == [], errors
    finally:
        stop_process(process)
    save_shots(shots)


@skip_on_request
def test_control_train_and_sample_with_a_drawn_map_in_a_browser(browser, tmp_path):
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    workspace = tmp_path / "ws"
    process, url = start_studio(STUDIO_MODULE, workspace, tmp_path / "log.txt")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        expect(page.locator("#train-status")).to_contain_text("No training job yet", timeout=30_000)
        page.get_by_role("tab", name="Control").click()
        status = page.locator("#control-status")
        fill(page, "control-name", "shapes")
        fill(page, "control-scenes", 16)
        fill(page, "control-steps", CONTROL_STEPS)
        fill(page, "control-batch", 2)
        page.locator("#control-preview-settings").get_by_text("Previews").click()
        fill(page, "control-preview-every", max(CONTROL_STEPS // 2, 1))
        fill(page, "control-preview-steps", SAMPLING_STEPS)
        # a preset of this form (wired as the Train tab's): save, change a field, load it back
        control_note = page.locator("#control-note")
        page.locator("#control-presets").get_by_text("Presets").click()
        fill(page, "control-preset-name", "quick-shapes")
        page.locator("#control-preset-save").click()
        expect(control_note).to_contain_text("preset 'quick-shapes' saved", timeout=15_000)
        fill(page, "control-steps", 999)
        page.locator("#control-preset-list input").click()
        page.get_by_role("option", name="quick-shapes").click()
        page.locator("#control-preset-load").click()
        expect(control_note).to_contain_text("loaded preset 'quick-shapes'", timeout=15_000)
        expect(page.locator("#control-steps input")).to_have_value(str(CONTROL_STEPS))
        page.locator("#control-start").click()
        expect(status).to_contain_text("shapes · control", timeout=30_000)
        expect(status).to_contain_text("done", timeout=300_000)
        expect(page.locator("#control-previews")).to_contain_text("step 0 · untrained · control map | samples")
        expect(page.locator("#control-loss-curve g.mark-line path")).to_have_count(2, timeout=30_000)
        assert (workspace / "control_data" / "segmentation-16" / "metadata.jsonl").is_file()  # rendered on demand
        page.screenshot(path=str(shots / "studio_control_train.png"), full_page=True)

        page.get_by_role("tab", name="Sample with a control map").click()
        page.locator("#control-adapter input").click()
        page.get_by_role("option", name="shapes").click()
        page.locator("#example-seg").click()  # a held-out world scene's map, and its caption as the prompt
        expect(page.locator("#control-prompt textarea")).not_to_have_value("", timeout=30_000)
        page.locator("#control-sample-steps input[type=number]").fill(str(SAMPLING_STEPS))
        fill(page, "control-seeds", "0")
        page.locator("#control-generate").click()
        samples, sample_note = page.locator("#control-samples"), page.locator("#control-sample-note")
        expect(sample_note).to_contain_text("2 images in", timeout=120_000)
        expect(samples).to_contain_text("seed 0 · with control (shapes)")
        expect(samples).to_contain_text("seed 0 · without control (base model)")
        expect(samples.locator("img")).to_have_count(3)  # the map, with control, without

        # a map drawn on a blank canvas with the brush (the first class colour)
        page.get_by_role("button", name="Blank canvas").click()
        page.wait_for_timeout(2000)  # the editor redraws its layers: strokes before that are lost on a busy machine
        canvas = page.locator("#control-canvas canvas").first
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.35)
        page.mouse.down()
        for k in range(15):
            page.mouse.move(box["x"] + box["width"] * (0.35 + 0.02 * k), box["y"] + box["height"] * (0.35 + 0.015 * k),
                            steps=2)  # fmt: skip
        page.mouse.up()
        page.wait_for_timeout(1500)  # the stroke reaches the composite the click sends
        page.locator("#control-generate").click()
        deadline = time.monotonic() + 120
        while len(maps := sorted((workspace / "samples").glob("*/02_seed0_base.png"))) < 2:
            assert time.monotonic() < deadline, f"no second sample; the page says: {sample_note.inner_text()}"
            page.wait_for_timeout(200)
        expect(sample_note).to_contain_text(maps[-1].parent.name, timeout=30_000)  # the page shows the new ones
        expect(sample_note).to_contain_text("resized from 256×256 to 64×64")
        maps = [m.parent / "00_control-map.png" for m in maps]
        with Image.open(maps[-1]) as drawn:
            colours = {tuple(c) for c in np.asarray(drawn.convert("RGB")).reshape(-1, 3)}
        assert colours == {(0, 0, 0), (230, 25, 75)}, colours  # black, and the stroke in the exact class colour
        page.screenshot(path=str(shots / "studio_control.png"), full_page=True)
        assert errors == [], errors
    finally:
        stop_process(process)
    save_shots(shots)
