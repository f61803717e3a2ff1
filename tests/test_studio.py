"""The studio's work, without a browser, on the shipped tiny model: jobs, uploads, names, adapters, sampling."""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import TinyMLP, png_header, randomize_adapters
from PIL import Image
from safetensors.torch import save_file

from ether_diffusion import EtherConfig, inject, save_adapter
from ether_diffusion.assets import default_model_path
from ether_diffusion.checkpoints import list_checkpoints
from ether_diffusion.studio import (
    AdapterStore,
    JobManager,
    Sampler,
    SampleRequest,
    StudioError,
    TrainSpec,
    Workspace,
    check_name,
    check_uploads,
)
from ether_diffusion.studio.sampling import parse_seeds
from ether_diffusion.studio.uploads import save_uploads

pytestmark = pytest.mark.slow  # training jobs and samplers on the shipped model: the end-to-end tier

MODEL = str(default_model_path())
SUBJECT = "orange_checkered_star"


def spec(name="star", **changes):
    fields = dict(
        adapter_name=name,
        instance_prompt="a sks star",
        subject=SUBJECT,
        class_prompt="a star",
        max_train_steps=4,
        num_class_images=2,
        preview_every=2,
        preview_images=1,
        preview_steps=2,
    )
    fields.update(changes)
    return TrainSpec(**fields)


def wait_for(manager, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = manager.status()
        if condition(state):
            return state
        if not manager.running():
            raise AssertionError(f"the job ended before the condition held: {state['phase']} {state.get('error')}")
        time.sleep(0.05)
    raise AssertionError(f"timed out; last state {manager.status()}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 4-step job (prior preservation, previews every 2 steps) in a fresh workspace."""
    workspace = Workspace(tmp_path_factory.mktemp("studio"))
    manager = JobManager(workspace, MODEL)
    manager.start(spec())
    state = manager.wait(120)
    assert state["phase"] == "done", state.get("traceback")
    return workspace, state


def test_job_reports_progress_previews_and_publishes_the_adapter(trained):
    workspace, state = trained
    assert (state["step"], state["total"], state["running"], state["resumable"]) == (4, 4, False, False)
    assert len(state["losses"]) == 4 and all(np.isfinite(state["losses"]))
    assert state["loss"] == pytest.approx(state["losses"][-1], abs=1e-6)
    assert state["lr"] == pytest.approx(6e-3)
    captions = [p["caption"] for p in state["previews"]]
    assert captions == ["step 0 · base model (baseline)", "step 2", "step 4", "step 4 · saved adapter, reloaded"]
    for preview in state["previews"]:
        with Image.open(preview["path"]) as image:
            assert image.width >= 64
    info = AdapterStore(workspace).info("star")
    assert (info.method, info.parameters, info.steps, info.error) == ("ETHER+", 11520, "4", None)  # default targets
    assert info.instance_prompt == "a sks star" and info.thumbnail is not None and info.thumbnail.is_file()

    # a page reload or a restarted studio reads the same job from disk
    again = JobManager(workspace, MODEL).status()
    assert {k: again[k] for k in ("id", "phase", "step", "previews", "adapter")} == {
        k: state[k] for k in ("id", "phase", "step", "previews", "adapter")
    }
    with pytest.raises(StudioError, match="finished all 4 steps"):
        JobManager(workspace, MODEL).resume()
    with pytest.raises(StudioError, match="already exists"):
        JobManager(workspace, MODEL).start(spec())


@pytest.mark.slow
def test_stop_keeps_the_adapter_resume_continues_and_one_job_at_a_time(tmp_path):
    workspace = Workspace(tmp_path)
    manager = JobManager(workspace, MODEL)
    manager.start(spec("long", max_train_steps=500, prior_preservation=False, preview_every=1000))
    with pytest.raises(StudioError, match="already running"):
        manager.start(spec("other"))
    with pytest.raises(StudioError, match="already running"):
        manager.resume()
    first = wait_for(manager, lambda s: s["step"] >= 2)
    assert first["phase"] == "training" and first["eta_seconds"] > 0
    manager.stop()
    stopped = manager.wait(60)
    at = stopped["step"]
    assert stopped["phase"] == "stopped" and 2 <= at < 500 and stopped["resumable"], stopped.get("traceback")
    assert AdapterStore(workspace).info("long").steps == str(at)
    output = workspace.jobs / stopped["id"] / "output"
    assert [c.name for c in list_checkpoints(output)] == [f"checkpoint-{at}"]
    with pytest.raises(StudioError, match="no training job is running"):
        manager.stop()

    manager.resume()
    resumed = wait_for(manager, lambda s: s["phase"] == "training" and s["step"] >= at + 2)
    assert resumed["start_step"] == at and len(resumed["losses"]) == resumed["step"]
    assert resumed["losses"][:at] == stopped["losses"]
    manager.stop()
    again = manager.wait(60)
    assert again["phase"] == "stopped" and again["step"] > at

    # the studio dies mid-job: on restart the job is "interrupted" and resumes from its last checkpoint
    state_file = workspace.jobs / again["id"] / "state.json"
    record = json.loads(state_file.read_text())
    record["phase"] = "training"
    state_file.write_text(json.dumps(record))
    restarted = JobManager(workspace, MODEL)
    interrupted = restarted.status()
    assert interrupted["phase"] == "interrupted" and interrupted["resumable"]
    assert f"step {again['step']}" in interrupted["message"]
    restarted.resume()
    wait_for(restarted, lambda s: s["phase"] == "training" and s["step"] > again["step"])
    restarted.stop()
    assert restarted.wait(60)["phase"] == "stopped"


def test_a_failing_job_shows_its_error(tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    manager = JobManager(Workspace(tmp_path / "ws"), not_a_model)
    manager.start(spec(prior_preservation=False))
    state = manager.wait(60)
    assert state["phase"] == "failed" and state["resumable"]
    assert "not a diffusers model folder" in state["error"] and "Traceback" in state["traceback"]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(adapter_name="../x"), "not allowed"),
        (dict(adapter_name="a/b"), "not allowed"),
        (dict(adapter_name="  "), "empty"),
        (dict(subject=None), "no images"),
        (dict(subject="nope"), "no shipped subject"),
        (dict(method="LoRA"), "ETHER or ETHER\\+"),
        (dict(class_prompt=""), "class prompt"),
        (dict(instance_prompt=""), "instance prompt is empty"),
        (dict(max_train_steps=0), "max train steps"),
        (dict(learning_rate=-1.0), "learning rate"),
    ],
)
def test_bad_training_input_is_refused_before_anything_runs(tmp_path, changes, message):
    workspace = Workspace(tmp_path)
    with pytest.raises(StudioError, match=message):
        JobManager(workspace, MODEL).start(spec(**changes))
    assert list(workspace.jobs.iterdir()) == []


def image_files(folder, count, size=(40, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"photo{i}.jpg")
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(paths[-1])
    return paths


def test_uploads_are_checked_and_saved_as_png(tmp_path):
    good = image_files(tmp_path / "good", 3)
    with pytest.raises(StudioError, match="no images"):
        check_uploads([])
    with pytest.raises(StudioError, match="2 images uploaded; DreamBooth needs 3-10"):
        check_uploads(good[:2])
    with pytest.raises(StudioError, match="11 images"):
        check_uploads(image_files(tmp_path / "many", 11))
    fake = tmp_path / "fake.png"
    fake.write_text("not pixels")
    with pytest.raises(StudioError, match="fake.png: not an image"):
        check_uploads([*good, fake])
    huge = tmp_path / "huge.png"
    Image.new("L", (10000, 7000), 255).save(huge)  # 70 Mpx: a small file, refused from its header
    with pytest.raises(StudioError, match="huge.png: 10000×7000 pixels is too large"):
        check_uploads([*good, huge])
    written = save_uploads(good, tmp_path / "instance")
    assert [p.name for p in written] == ["00.png", "01.png", "02.png"]
    assert Image.open(written[0]).mode == "RGB" and Image.open(written[0]).size == (40, 32)

    workspace = Workspace(tmp_path / "ws")
    with pytest.raises(StudioError, match="fake.png: not an image"):
        JobManager(workspace, MODEL).start(spec(subject=None, uploads=[*map(str, good), str(fake)]))
    assert list(workspace.jobs.iterdir()) == []  # nothing left behind


def test_uploads_get_the_image_checks_of_training_folders(tmp_path):
    """A 20000² header, a folder or a FIFO named like an image: each refused with the message the instance folder gives,
    naming the file, and none read (opening a FIFO would wait for a writer)."""
    good = image_files(tmp_path / "good", 3)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))
    folder = tmp_path / "folder.png"
    folder.mkdir()
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    writer = threading.Timer(2.0, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))  # unblocks a reader
    writer.start()
    try:
        with pytest.raises(StudioError) as err:
            check_uploads([*good, bomb, folder, fifo])
    finally:
        writer.cancel()
    message = str(err.value)
    assert "bomb.png: 400,000,000 pixels is too large (at most 67,108,864 pixels" in message
    assert "folder.png: a folder, not an image file" in message
    assert "pipe.png: not a regular file" in message


def test_uploaded_images_train(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    manager = JobManager(workspace, MODEL)
    uploads = [str(p) for p in image_files(tmp_path / "mine", 3, size=(80, 64))]
    manager.start(spec("mine", subject=None, uploads=uploads, max_train_steps=2, prior_preservation=False))
    state = manager.wait(60)
    assert state["phase"] == "done" and state["step"] == 2, state.get("traceback")
    assert sorted(p.name for p in (workspace.jobs / state["id"] / "instance").iterdir()) == [
        "00.png",
        "01.png",
        "02.png",
    ]


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", ".hidden", "x" * 65, "", "ünï", "a b", "..", "/etc/passwd"])
def test_names_cannot_escape_the_adapters_folder(tmp_path, bad):
    with pytest.raises(StudioError):
        check_name(bad)
    workspace = Workspace(tmp_path / "ws")
    store = AdapterStore(workspace)
    outside = tmp_path / "x.safetensors"
    outside.write_bytes(b"keep me")
    (workspace.adapters / "good.safetensors").write_bytes(b"keep me too")
    for action in (
        lambda: store.path(bad),
        lambda: store.rename("good", bad),
        lambda: store.rename(bad, "new"),
        lambda: store.delete(bad),
        lambda: store.export(bad),
    ):
        with pytest.raises(StudioError):
            action()
    assert outside.read_bytes() == b"keep me" and store.names() == ["good"]


def test_a_link_out_of_the_adapters_folder_is_refused(tmp_path):
    store = AdapterStore(Workspace(tmp_path / "ws"))
    (tmp_path / "secret.safetensors").write_bytes(b"secret")
    (store.folder / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(StudioError, match="links to a file outside the folder"):
        store.export("link")
    store.delete("link")  # the link itself goes: deleting never reaches the file a link leads to
    assert (tmp_path / "secret.safetensors").read_bytes() == b"secret" and store.names() == []


def foreign_adapter(path):
    """A valid ETHER file made for another architecture (a small MLP)."""
    model = TinyMLP()
    inject(model, EtherConfig(method="ether", target_modules=["to_q"]), "mlp")
    randomize_adapters(model)
    return save_adapter(path, {"unet": model}, "mlp")


def test_import_export_rename_delete(trained, tmp_path):
    workspace, _ = trained
    store = AdapterStore(workspace)
    sampler = Sampler(MODEL, workspace, store)
    before = store.names()

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(range(200)))
    with pytest.raises(StudioError, match="corrupt.safetensors was not imported: .*not a readable safetensors file"):
        store.import_file(corrupt, check_fits=sampler.check_fits)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(StudioError, match="not an ether-diffusion adapter"):
        store.import_file(plain)
    foreign = foreign_adapter(tmp_path / "foreign.safetensors")
    with pytest.raises(StudioError, match="does not fit"):
        store.import_file(foreign, check_fits=sampler.check_fits)
    with pytest.raises(StudioError, match="no file"):
        store.import_file(None)
    with pytest.raises(StudioError, match="not allowed"):
        store.import_file(store.export("star"), "../escape")
    assert store.names() == before  # nothing was added by a rejected import

    exported = store.export("star")
    assert exported.parent == store.folder and exported.name == "star.safetensors"
    assert store.import_file(exported, "copy", check_fits=sampler.check_fits) == "copy"
    assert store.import_file(exported, check_fits=sampler.check_fits) == "star-2"  # name from the file, made free
    with pytest.raises(StudioError, match="already exists"):
        store.import_file(exported, "copy")
    assert store.info("copy").parameters == store.info("star").parameters
    assert store.rename("copy", "copy2") == "copy2"
    with pytest.raises(StudioError, match="already exists"):
        store.rename("copy2", "star")
    store.delete("copy2")
    store.delete("star-2")
    with pytest.raises(StudioError, match="no adapter named 'copy2'"):
        store.delete("copy2")
    assert store.names() == before

    # a broken file dropped into the folder is listed with its problem (so it can be deleted), not a crash
    (store.folder / "broken.safetensors").write_bytes(b"nope")
    broken = {i.name: i for i in store.list()}["broken"]
    assert broken.method == "unreadable" and "not a readable safetensors file" in broken.error
    store.delete("broken")


@pytest.mark.slow
def test_sampling_side_by_side_and_many_clients_at_once(trained):
    workspace, _ = trained
    sampler = Sampler(MODEL, workspace)
    request = SampleRequest("a sks star on a blue background", [("star", 1.0)], seeds=[3, 4], steps=2)
    result = sampler.sample(request)
    assert result.captions == ["seed 3 · star×1", "seed 3 · base model", "seed 4 · star×1", "seed 4 · base model"]
    assert all(p.is_file() for p in result.paths) and len(result.paths) == 4
    base_only = sampler.sample(SampleRequest(request.prompt, seeds=[3], steps=2), save=False)
    assert base_only.captions == ["seed 3 · base model"]
    pixels = [np.asarray(i, dtype=np.int16) for i in result.images]
    assert np.array_equal(pixels[1], np.asarray(base_only.images[0], dtype=np.int16))  # same seed, same image
    assert np.abs(pixels[0] - pixels[1]).mean() > 0.5  # the adapter changes it

    def client(seed):
        return sampler.sample(SampleRequest(request.prompt, [("star", 1.0)], seeds=[seed], steps=2), save=False)

    seeds = [3, 4, 3, 4, 5, 6]
    barrier = threading.Barrier(len(seeds))

    def together(seed):
        barrier.wait()
        return client(seed)

    with ThreadPoolExecutor(len(seeds)) as pool:
        answers = list(pool.map(together, seeds, timeout=300))
    assert [len(a.images) for a in answers] == [2] * len(seeds)
    assert np.array_equal(np.asarray(answers[0].images[0]), np.asarray(result.images[0]))
    assert np.array_equal(np.asarray(answers[3].images[0]), np.asarray(result.images[2]))


def test_bad_sample_requests_have_messages(trained):
    workspace, _ = trained
    sampler = Sampler(MODEL, workspace)
    with pytest.raises(StudioError, match="no adapter named 'ghost'"):
        sampler.sample(SampleRequest("a star", [("ghost", 1.0)], steps=1))
    with pytest.raises(StudioError, match="not allowed"):
        sampler.sample(SampleRequest("a star", [("../star", 1.0)], steps=1))
    with pytest.raises(StudioError, match="prompt is empty"):
        sampler.sample(SampleRequest("  ", steps=1))
    with pytest.raises(StudioError, match="between 1 and 200"):
        sampler.sample(SampleRequest("a star", steps=0))
    with pytest.raises(StudioError, match="listed twice"):
        sampler.sample(SampleRequest("a star", [("star", 1.0), ("star", 0.5)], steps=1))
    assert parse_seeds("1, 2, 5-7") == [1, 2, 5, 6, 7] and parse_seeds("") == [0]
    with pytest.raises(StudioError, match="'x' is not a whole number"):
        parse_seeds("1, x")


def test_two_pages_pressing_start_at_once_get_one_job(tmp_path):
    manager = JobManager(Workspace(tmp_path), MODEL)
    barrier = threading.Barrier(2)

    def press(name):
        barrier.wait()
        try:
            return manager.start(spec(name, max_train_steps=2, prior_preservation=False))["id"]
        except StudioError as err:
            return str(err)

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(press, ["first", "second"]))
    refused = [o for o in outcomes if "already running" in o]
    assert len(refused) == 1, outcomes
    assert manager.wait(60)["phase"] == "done"


@pytest.mark.slow  # a subprocess or a full-size model: the end-to-end tier
def test_the_studio_library_does_not_need_gradio():
    import subprocess
    import sys

    code = 'import sys; sys.modules["gradio"] = None; import ether_diffusion.studio; print("ok")'
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_step_0_preview_is_the_base_model_for_both_methods(trained, tmp_path):
    """A fresh ETHER reflection is not the identity; the step-0 baseline must still be the base model."""
    _, plus = trained
    manager = JobManager(Workspace(tmp_path), MODEL)
    manager.start(spec("reflection", method="ETHER", max_train_steps=1, prior_preservation=False))
    state = manager.wait(60)
    assert state["phase"] == "done", state.get("traceback")
    ether_step0, plus_step0 = state["previews"][0], plus["previews"][0]
    assert ether_step0["step"] == plus_step0["step"] == 0
    assert np.array_equal(np.asarray(Image.open(ether_step0["path"])), np.asarray(Image.open(plus_step0["path"])))


@pytest.mark.parametrize("prompt", ["--help", "-sks"])
def test_prompts_that_look_like_flags_are_just_prompts(tmp_path, prompt):
    """No user text reaches a command-line parser: a prompt such as '--help' trains like any other."""
    workspace = Workspace(tmp_path)
    manager = JobManager(workspace, MODEL)
    manager.start(spec("flaglike", instance_prompt=prompt, max_train_steps=1, prior_preservation=False))
    state = manager.wait(120)
    assert state["phase"] == "done", state.get("traceback")
    assert AdapterStore(workspace).info("flaglike").instance_prompt == prompt


def test_resume_republishes_the_jobs_own_file_not_a_name(tmp_path):
    workspace = Workspace(tmp_path)
    store = AdapterStore(workspace)
    manager = JobManager(workspace, MODEL, store)
    manager.start(spec("mine", max_train_steps=500, prior_preservation=False, preview_every=1000))
    wait_for(manager, lambda s: s["step"] >= 1)
    manager.stop()
    stopped = manager.wait(60)
    assert stopped["phase"] == "stopped" and stopped["adapter"] == "mine"
    # the user renames the job's adapter and imports a different file under the old name
    store.rename("mine", "renamed")
    other = foreign_adapter(tmp_path / "other.safetensors")
    store.publish(other, "mine")
    other_bytes = store.path("mine").read_bytes()
    manager.resume()
    wait_for(manager, lambda s: s["phase"] == "training" and s["step"] > stopped["step"])
    manager.stop()
    again = manager.wait(60)
    assert again["phase"] == "stopped" and again["adapter"] == "renamed"
    assert store.path("mine").read_bytes() == other_bytes  # the imported file is untouched
    assert store.info("renamed").steps == str(again["step"])  # the job's own file carries the new steps


def test_class_images_are_drawn_once_for_jobs_that_share_them(tmp_path):
    workspace = Workspace(tmp_path)
    manager = JobManager(workspace, MODEL)
    manager.start(spec("first", max_train_steps=1, num_class_images=2))
    first = manager.wait(120)
    assert first["phase"] == "done", first.get("traceback")
    folders = list(workspace.class_images.iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 2
    drawn = {p: p.stat().st_mtime_ns for p in folders[0].iterdir()}
    manager.start(spec("second", max_train_steps=1, num_class_images=2))
    assert manager.wait(120)["phase"] == "done"
    assert {p: p.stat().st_mtime_ns for p in folders[0].iterdir()} == drawn  # reused, not redrawn


STOP_SECONDS = 5.0  # a stop ends within one denoising or training step: well under a second on an idle machine,
# a few seconds when the 2 cores are shared by several jobs; the sampling it interrupts would take minutes


def stop_and_time(manager):
    """Press Stop; return (seconds until the job's thread ended, the final state, phases seen meanwhile)."""
    seen = []
    started = time.monotonic()
    manager.stop()
    while manager.running() and time.monotonic() - started < 120:
        seen.append(manager.status()["phase"])
        time.sleep(0.02)
    return time.monotonic() - started, manager.wait(60), seen


def test_stop_acts_within_the_class_images_denoising(tmp_path):
    workspace = Workspace(tmp_path)
    manager = JobManager(workspace, MODEL)
    # 40 class images of 200 denoising steps: a batch of 4 alone takes a minute here
    manager.start(spec("early", num_class_images=40, preview_steps=200, max_train_steps=50))
    drawing = wait_for(manager, lambda s: "drawing 40 class images (0/40)" in s.get("message", ""))
    assert drawing["phase"] == "preparing"  # the page shows the progress
    time.sleep(1.0)  # inside the first batch's denoising
    seconds, state, seen = stop_and_time(manager)
    assert seconds < STOP_SECONDS, seconds
    assert not {"preparing", "training"} & set(seen), seen  # never back to the phase before Stop
    assert state["phase"] == "stopped" and "before training began" in state["message"] and state["resumable"]
    assert not AdapterStore(workspace).exists("early")
    assert list(workspace.class_images.glob("*/*.png")) == []  # the interrupted batch wrote nothing half-done


def test_stop_acts_within_the_step_0_baseline(tmp_path):
    workspace = Workspace(tmp_path)
    manager = JobManager(workspace, MODEL)
    manager.start(spec("base", prior_preservation=False, preview_steps=200, max_train_steps=50))
    wait_for(manager, lambda s: "step-0 baseline" in s.get("message", ""))
    time.sleep(1.0)
    seconds, state, seen = stop_and_time(manager)
    assert seconds < STOP_SECONDS, seconds
    assert not {"preparing", "training"} & set(seen), seen
    assert state["phase"] == "stopped" and "before training began" in state["message"] and state["resumable"]
    assert state["previews"] == [] and not AdapterStore(workspace).exists("base")


@pytest.mark.slow
def test_stop_acts_within_a_preview_and_keeps_a_checkpoint(tmp_path):
    workspace = Workspace(tmp_path)
    manager = JobManager(workspace, MODEL)
    # previews every 2 steps, 60 denoising steps each (checkpoints every 3: the stop must write its own)
    manager.start(spec("mid", prior_preservation=False, preview_steps=60, preview_every=2, max_train_steps=50,
                       checkpoint_every=3))  # fmt: skip
    # the baseline takes long too: stop only once the step-2 preview is being drawn
    wait_for(manager, lambda s: "step-2 preview" in s.get("message", ""), timeout=600)
    time.sleep(1.0)
    seconds, state, seen = stop_and_time(manager)
    assert seconds < STOP_SECONDS, seconds
    assert not {"preparing", "training"} & set(seen), seen
    assert state["phase"] == "stopped" and state["step"] == 2 and state["resumable"], state.get("traceback")
    assert AdapterStore(workspace).info("mid").steps == "2"  # the adapter so far, published
    output = workspace.jobs / state["id"] / "output"
    assert [c.name for c in list_checkpoints(output)] == ["checkpoint-2"]  # Resume continues from here
    assert not (output / "samples.png").exists()  # a stopped run skips the reload check


def test_the_label_never_flips_back_from_stopping(tmp_path):
    """Stop pressed while the loop reports a phase: whatever the order, the page never shows the old phase again,
    and a job that ended as Stop was pressed keeps its end."""
    manager = JobManager(Workspace(tmp_path), MODEL)
    manager._state = {"id": "x", "phase": "training", "spec": {}}
    (manager.workspace.jobs / "x").mkdir()
    manager._stop.set()
    manager._update(phase="training", message="training")  # the loop, a moment after Stop
    assert manager._state["phase"] == "stopping"
    manager._update(phase="preparing")
    assert manager._state["phase"] == "stopping"
    manager._update(phase="done", message="finished")
    manager._update(phase="stopping", message="stopping now")  # Stop's own update, arriving after the end
    assert (manager._state["phase"], manager._state["message"]) == ("done", "finished")


def test_eta_counts_training_steps_only(tmp_path, monkeypatch):
    """A slow step-0 baseline (60 s) before steps of 0.5 s: the ETA after step 1 is 0.5 s × the steps left."""
    from ether_diffusion.studio import jobs
    from ether_diffusion.training.callbacks import Preparation, ValidationEvent

    now = [1000.0]
    monkeypatch.setattr(jobs.time, "monotonic", lambda: now[0])
    manager = JobManager(Workspace(tmp_path), MODEL)
    manager._state = {"id": "x", "phase": "preparing", "spec": {"preview_every": 100}, "previews": [], "losses": [],
                      "total": 400, "kind": "dreambooth"}  # fmt: skip
    (manager.workspace.jobs / "x").mkdir()
    callback = jobs._JobCallback(manager)
    callback.on_prepare(Preparation("sampling the step-0 baseline (the base model)"))
    now[0] += 60.0
    image = Image.new("RGB", (8, 8))
    image.save(tmp_path / "p.png")
    callback.on_validation(ValidationEvent(0, "baseline", [image], [tmp_path / "p.png"]))
    callback.on_train_start(400, 0)
    now[0] += 0.5
    callback.on_step(1, {"loss": 0.1, "lr": 1e-3})
    assert manager._state["eta_seconds"] == pytest.approx(0.5 * 399)
    now[0] += 1.5  # two more steps
    callback.on_step(3, {"loss": 0.1, "lr": 1e-3})
    assert manager._state["eta_seconds"] == pytest.approx(2.0 / 3 * 397)


def test_a_reload_gets_the_jobs_settings_and_its_tensorboard_folder(trained):
    workspace, state = trained
    again = JobManager(workspace, MODEL)  # what a reloaded page (or a restarted studio) asks
    assert again.spec() == spec().validated()  # the form shows these, not the defaults
    events = list((workspace.jobs / state["id"] / "output" / "logs").rglob("events.out.tfevents.*"))
    assert state["logs"] == str(workspace.jobs / state["id"] / "output" / "logs") and events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(events[0].parent)).Reload()
    losses = [e.value for e in logged.Scalars("loss")]
    assert losses == pytest.approx(state["losses"], abs=1e-5)  # the curve on the page is the one in TensorBoard


def test_a_failed_import_names_the_file_not_the_upload_folder(tmp_path):
    store = AdapterStore(Workspace(tmp_path / "ws"))
    parked = tmp_path / "gradio" / "3f9a0c" / "my-adapter.safetensors"  # where a browser upload lands
    parked.parent.mkdir(parents=True)
    parked.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(range(200)))
    with pytest.raises(StudioError) as refused:
        store.import_file(parked)
    assert str(refused.value).startswith("my-adapter.safetensors was not imported: ")
    assert str(tmp_path) not in str(refused.value) and "3f9a0c" not in str(refused.value)
    assert store.names() == []


def test_presets_save_and_load_a_configuration_by_name(tmp_path):
    from ether_diffusion.studio.presets import PresetStore

    presets = PresetStore(Workspace(tmp_path))
    saved, replaced = presets.save("fast-star", spec("ignored", method="ETHER", n_blocks=4, max_train_steps=80))
    assert not replaced and presets.names() == ["fast-star"] and presets.names("control") == []
    loaded = presets.load("fast-star")
    assert loaded == saved and "adapter_name" not in loaded.settings and "uploads" not in loaded.settings
    assert loaded.spec("new-name") == spec("new-name", method="ether", n_blocks=4, max_train_steps=80)
    assert presets.save("fast-star", spec(max_train_steps=90))[1]  # the same name replaces it, and says so
    assert presets.load("fast-star").settings["max_train_steps"] == 90

    uploaded = presets.save("mine", spec(subject=None, uploads=["/tmp/gradio/x/a.png"]))[0]
    assert uploaded.settings["subject"] is None  # uploaded files are not kept; the page asks for images again
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(StudioError):
            presets.save(bad, spec())
    with pytest.raises(StudioError, match="max train steps"):
        presets.save("broken", spec(max_train_steps=0))
    assert presets.names() == ["fast-star", "mine"]  # nothing written for refused saves
    (presets.folder / "odd.json").write_text('{"format": 1, "kind": "dreambooth", "settings": {"warp": 9}}')
    with pytest.raises(StudioError, match="does not know \\(warp\\)"):
        presets.load("odd")
    (presets.folder / "cut.json").write_text('{"format": 1, "kind": "dream')
    with pytest.raises(StudioError, match="preset 'cut' cannot be loaded: it is not readable JSON"):
        presets.load("cut")
    (presets.folder / "range.json").write_text(
        json.dumps({"format": 1, "kind": "dreambooth", "settings": {
            "instance_prompt": "a sks star", "subject": SUBJECT, "class_prompt": "a star", "n_blocks": 0}})
    )  # fmt: skip
    with pytest.raises(StudioError, match="n blocks"):
        presets.load("range")
    with pytest.raises(StudioError, match="no preset named 'ghost'"):
        presets.load("ghost")


def test_the_estimate_adds_up_what_it_measured():
    from ether_diffusion.studio.estimate import Measurement, project

    measured = Measurement(load_seconds=2.0, setup_seconds=3.0, step_seconds=0.1, checkpoint_seconds=0.05,
                           sample_fixed_seconds=0.2, sample_step_seconds=0.04, preview_batch=2,
                           weights_bytes=50 * 2**20, trainable_parameters=1000, activation_bytes=30 * 2**20,
                           memory_method="measured", device="CPU", calibration_seconds=9.0)  # fmt: skip
    job = spec(max_train_steps=400, preview_every=100, preview_images=2, preview_steps=25).validated()
    estimate = project(job, measured, missing_class_images=10)
    preview = 0.2 + 0.04 * 25
    parts = dict(estimate.parts)
    assert parts == pytest.approx(
        {
            "setting up": 3.0,
            "class images": 10 * preview / 2,
            "5 previews": 5 * preview,
            "400 steps": 40.0,
            "checkpoints": 4 * 0.05,
            "final check": 2.0 + preview,
        }
    )
    assert estimate.seconds == pytest.approx(sum(parts.values()))
    assert dict(estimate.memory_parts) == {"weights": 50 * 2**20, "trainable state": 16_000,
                                           "activations": 30 * 2**20}  # fmt: skip
    text = estimate.markdown()
    assert "4 real training steps" in text and "Accuracy" in text and "10 class images" in text


@pytest.mark.slow
def test_the_estimate_is_measured_on_the_model_and_close_to_the_real_job(tmp_path):
    workspace = Workspace(tmp_path)
    manager = JobManager(workspace, MODEL)
    job = spec("timed", max_train_steps=30, num_class_images=4, preview_every=15, preview_images=1, preview_steps=4)
    estimate = manager.estimate(job)
    measured = estimate.measured
    assert measured.step_seconds > 0 and measured.sample_step_seconds > 0 and measured.trainable_parameters == 11520
    weights = sum(
        p.numel() * p.element_size()
        for folder in ("unet", "text_encoder", "vae")
        for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            next((default_model_path() / folder).glob("*.safetensors"))).values()
    )  # fmt: skip
    assert measured.weights_bytes == weights  # the loaded model's parameters, not a guess
    assert dict(estimate.parts)["class images"] > 0  # none drawn yet
    assert list(workspace.class_images.iterdir()) == [] and list(workspace.jobs.iterdir()) == []  # nothing kept
    started = time.monotonic()
    manager.start(job)
    state = manager.wait(600)
    actual = time.monotonic() - started
    assert state["phase"] == "done", state.get("traceback")
    print(f"estimate {estimate.seconds:.1f} s, actual {actual:.1f} s, {estimate.parts}")
    assert actual / 3 < estimate.seconds < actual * 3  # loose: the 2 cores are shared with other work


def test_control_inputs_and_maps_are_checked(tmp_path):
    from ether_diffusion.studio.control import ControlSpec, control_map

    workspace = Workspace(tmp_path / "ws")
    manager = JobManager(workspace, MODEL)
    for changes, message in [
        (dict(source="folder", data_dir=str(tmp_path / "nowhere")), "does not exist"),
        (dict(source="folder", data_dir=str(tmp_path)), "no metadata.jsonl"),
        (dict(source="folder", data_dir=""), "no dataset folder"),
        (dict(source="depth"), "choose one of segmentation, edges, folder"),
        (dict(scenes=2), "scenes must be a whole number from 8"),
        (dict(encoder_learning_rate=0), "encoder learning rate"),
        (dict(adapter_name="../x"), "not allowed"),
    ]:
        with pytest.raises(StudioError, match=message):
            manager.start(ControlSpec(**{"adapter_name": "ctl", **changes}))
    assert list(workspace.jobs.iterdir()) == []

    with pytest.raises(StudioError, match="all black"):
        control_map(Image.new("RGB", (64, 64)), 64)
    with pytest.raises(StudioError, match="no control map"):
        control_map(None, 64)
    drawn = Image.new("RGBA", (300, 256), (0, 0, 0, 0))  # a canvas: transparent, one red stroke
    drawn.paste((230, 25, 75, 255), (100, 100, 160, 140))
    made, note = control_map(drawn, 64)
    assert made.mode == "RGB" and made.size == (64, 64)
    assert note == "centre-cropped from 300×256; resized from 256×256 to 64×64 (nearest-neighbour)"
    colours = {tuple(c) for c in np.asarray(made).reshape(-1, 3)}
    assert colours == {(0, 0, 0), (230, 25, 75)}  # transparent is background; colours stay exact


@pytest.mark.slow
def test_a_control_job_trains_and_samples_with_and_without_the_map(tmp_path):
    from ether_diffusion.studio import ControlRequest
    from ether_diffusion.studio.control import ControlSpec, example_control

    workspace = Workspace(tmp_path)
    store = AdapterStore(workspace)
    manager = JobManager(workspace, MODEL, store)
    job = ControlSpec("shapes", scenes=8, max_train_steps=2, train_batch_size=2, preview_every=2, preview_images=1,
                      preview_steps=2)  # fmt: skip
    manager.start(job)
    state = manager.wait(300)
    assert state["phase"] == "done" and state["kind"] == "control", state.get("traceback")
    assert [p["caption"] for p in state["previews"]] == [
        "step 0 · untrained · control map | samples",
        "step 2 · control map | samples",
        "step 2 · saved adapter, reloaded · control map | samples",
    ]
    assert manager.spec() == job.validated()
    assert store.info("shapes").task == "control" and store.names_for("control") == ["shapes"]
    assert store.names_for("dreambooth") == []
    rendered = sorted(p.name for p in workspace.control_data.iterdir())
    assert rendered == ["segmentation-1-from-20000000", "segmentation-8"]  # training set and held-out preview
    assert len((workspace.control_data / "segmentation-8" / "metadata.jsonl").read_text().splitlines()) == 8

    sampler = Sampler(MODEL, workspace, store)
    with pytest.raises(StudioError, match="is a control adapter"):
        sampler.sample(SampleRequest("a red circle", [("shapes", 1.0)], steps=1))
    control, caption = example_control("segmentation")
    result = sampler.sample_control(ControlRequest("shapes", control, caption, seeds=[0, 1], steps=2))
    assert result.captions == ["control map", "seed 0 · with control (shapes)", "seed 0 · without control (base model)",
                               "seed 1 · with control (shapes)", "seed 1 · without control (base model)"]  # fmt: skip
    assert [p.name for p in result.paths][:3] == ["00_control-map.png", "01_seed0_control.png", "02_seed0_base.png"]
    base = sampler.sample(SampleRequest(caption, seeds=[0], steps=2, compare=False), save=False).images[0]
    assert np.array_equal(np.asarray(result.images[2]), np.asarray(base))  # without control: the base model
    assert np.abs(np.asarray(result.images[1], dtype=np.int16) - np.asarray(base, dtype=np.int16)).mean() > 0.1
    big = control.resize((256, 256), Image.NEAREST)
    again = sampler.sample_control(ControlRequest("shapes", big, caption, seeds=[0], steps=2, compare=False))
    assert again.note == "resized from 256×256 to 64×64 (nearest-neighbour)" and len(again.images) == 2
    assert np.array_equal(np.asarray(again.images[1]), np.asarray(result.images[1]))  # the same map, resized back


def test_the_jobs_eta_leaves_out_preview_sampling(tmp_path, monkeypatch):
    """The studio's ETA counts training steps only: the seconds a preview takes are not spread over the steps."""
    from ether_diffusion.studio import jobs
    from ether_diffusion.training.callbacks import ValidationEvent
    from ether_diffusion.training.task import SampleKind

    manager = jobs.JobManager(Workspace(tmp_path / "ws"), default_model_path())
    manager._state = {"id": "eta", "phase": "training", "spec": {"preview_every": 2}, "losses": [], "previews": [],
                      "total": 10, "kind": "dreambooth"}  # fmt: skip
    manager._job_dir().mkdir(parents=True)
    now = [1000.0]
    monkeypatch.setattr(jobs.time, "monotonic", lambda: now[0])
    callback = jobs._JobCallback(manager)
    callback.on_train_start(10, 0)
    for step in (1, 2):
        now[0] += 1.0
        callback.on_step(step, {"loss": 0.1, "lr": 1e-3})
    now[0] += 30.0  # the step-2 preview
    callback.on_validation(ValidationEvent(2, SampleKind.PREVIEW, [], [], []))
    now[0] += 1.0
    callback.on_step(3, {"loss": 0.1, "lr": 1e-3})
    assert manager._state["eta_seconds"] == pytest.approx(7.0)  # 1 s a step, 7 steps left


def test_start_refuses_blocks_that_do_not_divide_the_models_widths(tmp_path):
    """Blocks = 7 on the tiny model (its widths are powers of two): refused at Start with the widths' divisors, not
    a job that fails with a raw ValueError; nothing is left behind."""
    workspace = Workspace(tmp_path / "ws")
    sampler = Sampler(MODEL, workspace)
    manager = JobManager(workspace, MODEL, check_adapter=sampler.check_adapter_config)
    with pytest.raises(StudioError, match=r"Blocks = 7 does not fit this model: n_blocks=7 does not divide the input "
                                          r"width \d+ of '.*'; n_blocks values that divide \d+: 1, 2"):  # fmt: skip
        manager.start(spec("seven", n_blocks=7))
    assert not manager.running() and list(workspace.jobs.iterdir()) == []
    sampler.check_adapter_config(EtherConfig(method="ether_plus", n_blocks=4, target_modules="unet-attention"))


def test_sampling_reports_every_denoising_step(tmp_path):
    sampler = Sampler(MODEL, Workspace(tmp_path / "ws"))
    heard = []
    sampler.sample(SampleRequest("a sks star", seeds=[0, 1], steps=3), save=False,
                   on_step=lambda done, total: heard.append((done, total)))  # fmt: skip
    assert heard == [(i, 6) for i in range(1, 7)]  # two seeds × three steps, counted across the calls
