"""The studio's queue (``studio/queue.py``) without a browser, on the shipped tiny model: jobs added one by one,
trained side by side in packed runs, each with its own progress and adapter; stop, resume, restart, remove."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from ether_diffusion.assets import default_model_path
from ether_diffusion.io import read_adapter_file
from ether_diffusion.studio import ControlSpec, JobManager, StudioError, TrainSpec, Workspace
from ether_diffusion.studio.queue import JobQueue

pytestmark = pytest.mark.slow  # training on the shipped model: the end-to-end tier

MODEL = str(default_model_path())


def spec(name, subject="orange_checkered_star", **changes):
    fields = dict(adapter_name=name, instance_prompt="a sks thing", subject=subject, class_prompt="a thing",
                  max_train_steps=4, num_class_images=2, preview_every=2, preview_images=1,
                  preview_steps=2)  # fmt: skip
    return TrainSpec(**{**fields, **changes})


def open_queue(folder, pack=2):
    manager = JobManager(Workspace(folder), MODEL)
    return manager, JobQueue(manager, pack=pack)


def by_name(queue) -> dict:
    return {s["spec"]["adapter_name"]: s for s in queue.jobs()}


def wait_until(queue, condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition(by_name(queue)):
            return
        assert queue.running(), by_name(queue)
        time.sleep(0.02)
    raise AssertionError(f"timed out: {by_name(queue)}")


def test_queued_jobs_train_side_by_side_each_to_its_own_adapter(tmp_path):
    """Three jobs (two subjects, ETHER+ and ETHER, own lengths and seeds) queued, then trained: every job ends
    done with its adapter in the store (its name, its steps, its samples as thumbnail); the one trained alone with
    Start gives the same adapter as in the queue (to the pack's rounding, tests/test_pack.py)."""
    manager, queue = open_queue(tmp_path / "ws")
    queue.add(spec("star", max_train_steps=4))
    queue.add(spec("square", "green_dotted_square", max_train_steps=6, seed=3, prior_preservation=False))
    queue.add(spec("star-ether", method="ether", max_train_steps=3))
    assert [row[2] for row in queue.rows()] == ["queued"] * 3
    assert "Train queue** trains 3" in queue.summary()
    seen = set()
    queue.start()
    while queue.running():
        seen |= {(n, s["phase"]) for n, s in by_name(queue).items()}
        time.sleep(0.01)
    jobs = by_name(queue)
    assert {n: s["phase"] for n, s in jobs.items()} == dict.fromkeys(["star", "square", "star-ether"], "done"), jobs
    assert ("star", "training") in seen and ("square", "training") in seen
    assert [row[3] for row in queue.rows()] == ["4 / 4", "6 / 6", "3 / 3"]
    store = manager.store
    for name, steps in (("star", 4), ("square", 6), ("star-ether", 3)):
        recorded = read_adapter_file(store.path(name))
        assert recorded.adapter_name == name and recorded.extra["steps"] == str(steps)
        assert store.info(name).thumbnail is not None
    assert read_adapter_file(store.path("star-ether")).configs["unet"].method == "ether"
    (run,) = (tmp_path / "ws" / "queue" / "runs").iterdir()
    assert (run / "finished").is_file()  # ETHER+ and ETHER jobs: two packs of the run, one after the other
    assert sorted(p.name for p in (run / "pack-state" / "process-0-of-1").iterdir()) == ["pack-0", "pack-1"]

    alone, _ = open_queue(tmp_path / "alone")
    alone.start(spec("star", max_train_steps=4))
    assert alone.wait(120)["phase"] == "done"
    solo, packed = load_file(alone.store.path("star")), load_file(store.path("star"))
    scale = max(float(v.abs().max()) for v in solo.values())
    assert max(float((solo[k] - packed[k]).abs().max()) for k in solo) / scale < 5e-5


def test_stop_resume_restart_and_remove(tmp_path):
    """Stop queue keeps every job where it stood; Train queue resumes the run bit for bit (the uninterrupted queue's
    adapters) and then trains a job added since in a run of its own. A studio restarted during a run finds its jobs
    interrupted; removing a job of an unfinished run sends the others back to the queue."""
    runs = [("a", dict(max_train_steps=8, prior_preservation=False)), ("b", dict(max_train_steps=6, seed=2))]
    whole_manager, whole = open_queue(tmp_path / "whole")
    for name, changes in runs:
        whole.add(spec(name, **changes))
    whole.start()
    whole.wait(180)

    manager, queue = open_queue(tmp_path / "ws")
    for name, changes in runs:
        queue.add(spec(name, **changes))
    queue.start()
    wait_until(queue, lambda jobs: jobs["a"]["step"] >= 3)
    queue.stop()
    queue.wait(60)
    jobs = by_name(queue)
    assert {n: s["phase"] for n, s in jobs.items()} == {"a": "stopped", "b": "stopped"}, jobs
    assert 3 <= jobs["a"]["step"] < 8 and "Train queue resumes it" in jobs["a"]["message"]
    with pytest.raises(StudioError, match="already trains an adapter named 'a'"):
        queue.add(spec("a"))
    queue.add(spec("c", max_train_steps=2, prior_preservation=False))

    # a restart finds the queue as it was; a job recorded as training is interrupted
    state_file = tmp_path / "ws" / "queue" / jobs["b"]["id"] / "state.json"
    record = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**record, "phase": "training"}))
    (tmp_path / "ws" / "queue" / "junk").mkdir()
    (tmp_path / "ws" / "queue" / "junk" / "state.json").write_text('{"id": "junk", "phase": "training"')
    manager, queue = open_queue(tmp_path / "ws")
    assert {n: s["phase"] for n, s in by_name(queue).items()} == {"a": "stopped", "b": "interrupted", "c": "queued"}
    assert len(queue.skipped) == 1 and "junk" in queue.skipped[0] and "not readable JSON" in queue.skipped[0]

    queue.start()
    queue.wait(180)
    assert {n: s["phase"] for n, s in by_name(queue).items()} == dict.fromkeys("abc", "done")
    for name in "ab":
        expected, got = load_file(whole_manager.store.path(name)), load_file(manager.store.path(name))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    runs_made = sorted(p.name for p in (tmp_path / "ws" / "queue" / "runs").iterdir())
    assert len(runs_made) == 2  # the resumed run, then c's own

    # removing a job of an unfinished run ends the run: its other job starts again from step 0
    queue.add(spec("d", max_train_steps=6, prior_preservation=False))
    queue.add(spec("e", max_train_steps=6, prior_preservation=False, seed=5))
    queue.start()
    wait_until(queue, lambda jobs: jobs["d"]["step"] >= 2)
    with pytest.raises(StudioError, match="Stop queue first"):
        queue.remove(by_name(queue)["d"]["id"])
    queue.stop()
    queue.wait(60)
    said = queue.remove(by_name(queue)["d"]["id"])
    assert "e start again from step 0" in said
    jobs = by_name(queue)
    assert "d" not in jobs and (jobs["e"]["phase"], jobs["e"]["step"], jobs["e"]["run"]) == ("queued", 0, None)
    assert not (tmp_path / "ws" / "queue" / jobs["e"]["id"] / "output").exists()
    queue.remove(jobs["a"]["id"])  # a done job leaves the list; its adapter stays
    assert manager.store.exists("a") and "a" not in by_name(queue)


def test_one_training_at_a_time_and_bad_jobs_refused_when_added(tmp_path):
    manager, queue = open_queue(tmp_path / "ws")
    with pytest.raises(StudioError, match="nothing waits in the queue"):
        queue.start()
    with pytest.raises(StudioError, match="control jobs do not queue"):
        queue.add(ControlSpec(adapter_name="ctl"))
    with pytest.raises(StudioError, match="prior preservation needs a class prompt"):
        queue.add(spec("x", class_prompt=""))
    with pytest.raises(StudioError, match="no images"):
        queue.add(spec("x", subject=None))
    assert list((tmp_path / "ws" / "queue").iterdir()) == [tmp_path / "ws" / "queue" / "runs"]  # nothing left
    queue.add(spec("long", max_train_steps=200, prior_preservation=False))
    queue.start()
    wait_until(queue, lambda jobs: jobs["long"]["step"] >= 1)
    with pytest.raises(StudioError, match="the queue is training"):
        manager.start(spec("single"))
    with pytest.raises(StudioError, match="already training"):
        queue.start()
    queue.add(spec("next", max_train_steps=2, prior_preservation=False))  # adding while it trains: it waits
    queue.stop()
    queue.wait(60)
    assert by_name(queue)["next"]["phase"] == "queued"
    # a run whose record was damaged (a disk that filled up, a hand edit) is ended: its jobs wait again, from step 0
    (run,) = (tmp_path / "ws" / "queue" / "runs").iterdir()
    (run / "run.json").write_text('{"jobs": [')
    again = JobQueue(manager, pack=2)
    run_id, ids, resume = again._next_run()
    assert not resume and len(ids) == 2 and not run.exists()
    assert {n: (s["phase"], s["step"]) for n, s in by_name(again).items()} == {"long": ("queued", 0),
                                                                              "next": ("queued", 0)}  # fmt: skip
    queue = again
    manager.start(spec("single", max_train_steps=200, prior_preservation=False))
    try:
        with pytest.raises(StudioError, match="already running"):
            queue.start()
    finally:
        manager.stop()
        manager.wait(60)
