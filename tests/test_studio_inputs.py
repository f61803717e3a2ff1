"""The studio's files under bad input, and its door: presets of the wrong size or shape, dataset folders naming files
outside themselves, job states of the wrong shape, links in the workspace, and the login's flags (fast, no model)."""

from __future__ import annotations

import json
import os
import time

import pytest

from ether_diffusion.studio import AdapterStore, ControlSpec, JobManager, StudioError, TrainSpec, Workspace
from ether_diffusion.studio.access import accounts, check_exposure, is_loopback
from ether_diffusion.studio.control import check_dataset_folder, first_row
from ether_diffusion.studio.presets import MAX_PRESET_BYTES, PresetStore

SUBJECT = "orange_checkered_star"
DEEP = "[" * 30_000 + "]" * 30_000  # under the size cap, deeper than json's parser goes


def train_spec(**changes) -> TrainSpec:
    fields = dict(instance_prompt="a sks star", subject=SUBJECT, class_prompt="a star", max_train_steps=4)
    return TrainSpec("star", **{**fields, **changes})


def preset_file(settings: dict, kind: str = "dreambooth", **top) -> str:
    return json.dumps({"format": 1, "kind": kind, "settings": settings, **top})


# --- presets ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [DEEP, "[" * 100_000 + "]" * 100_000])
def test_a_deeply_nested_preset_never_blocks_saving_deleting_listing_or_loading_the_others(tmp_path, bad):
    presets = PresetStore(Workspace(tmp_path))
    presets.save("fast", train_spec())
    (presets.folder / "deep.json").write_text(bad)
    assert presets.names("dreambooth") == ["deep", "fast"]  # listed, so that it can be deleted
    assert presets.save("other", train_spec(max_train_steps=8))[0].settings["max_train_steps"] == 8
    assert presets.load("fast").settings["max_train_steps"] == 4
    presets.delete("other")
    listing = presets.listing("dreambooth")
    assert listing.names == ["deep", "fast"] and len(listing.problems) == 1
    why = "nested deeper than any preset" if len(bad) < MAX_PRESET_BYTES else f"it is {len(bad):,} bytes"
    assert listing.problems[0].startswith("deep.json: ") and why in listing.problems[0]
    assert "skipped 1 bad preset(s): deep.json" in listing.note()
    with pytest.raises(StudioError, match=f"preset 'deep' cannot be loaded: .*{why}.*delete it or save it again"):
        presets.load("deep")
    presets.delete("deep")
    assert presets.listing().problems == [] and presets.names() == ["fast"]


SETTINGS = dict(instance_prompt="a sks star", subject=SUBJECT, class_prompt="a star")


@pytest.mark.parametrize(
    "text, why",
    [
        ("[]", "not a preset: a preset file holds exactly 'format', 'kind' and 'settings'"),
        ("{}", "not a preset"),
        (preset_file(SETTINGS, extra=1), "not a preset"),
        (preset_file(SETTINGS, format=2), "its format is 2; this studio reads format 1"),
        (preset_file(SETTINGS, kind="inpainting"), "its kind is 'inpainting', not one of dreambooth, control"),
        (preset_file(SETTINGS, kind=["dreambooth"]), "its kind is \\['dreambooth'\\]"),
        (json.dumps({"format": 1, "kind": "dreambooth", "settings": [1]}), "its settings are a list"),
        (preset_file({**SETTINGS, "warp": 9}), "settings this studio does not know \\(warp\\)"),
        (preset_file({**SETTINGS, "seed": "abc"}), "its setting 'seed' is text, which that field does not take"),
        (preset_file({**SETTINGS, "n_blocks": True}), "its setting 'n_blocks' is true/false"),
        (preset_file({**SETTINGS, "preview_prompt": ["a", "b"]}), "its setting 'preview_prompt' is a list"),
        (preset_file({**SETTINGS, "class_prompt": {"a": [1]}}), "its setting 'class_prompt' is an object"),
        (preset_file({**SETTINGS, "learning_rate": None}), "its setting 'learning_rate' is null"),
        (preset_file({**SETTINGS, "data_dir": "x"}), "does not know \\(data_dir\\)"),  # a control field
        (" " * (MAX_PRESET_BYTES + 1), "it is 65,537 bytes; a preset is a few hundred"),
        ("{ half", "it is not readable JSON"),
    ],
)
def test_a_preset_of_the_wrong_shape_is_named_with_why_and_skipped(tmp_path, text, why):
    presets = PresetStore(Workspace(tmp_path))
    presets.save("good", train_spec())
    (presets.folder / "bad.json").write_text(text)
    with pytest.raises(StudioError, match=f"preset 'bad' cannot be loaded: .*{why}"):
        presets.load("bad")
    listing = presets.listing("dreambooth")
    assert listing.names == ["bad", "good"] and [p.split(":")[0] for p in listing.problems] == ["bad.json"]
    assert presets.load("good").settings["subject"] == SUBJECT


def test_saved_presets_of_both_forms_pass_the_schema_they_are_read_with(tmp_path):
    presets = PresetStore(Workspace(tmp_path))
    presets.save("train", train_spec(subject=None, uploads=["/tmp/x.png"], checkpoint_every=None, learning_rate=1))
    presets.save("control", ControlSpec("c", source="edges", guidance_scale=4))
    listing = presets.listing()
    assert listing.names == ["control", "train"] and listing.problems == []
    assert presets.names("control") == ["control"] and presets.load("control").spec().source == "edges"


def test_odd_files_in_the_presets_folder_are_reported_not_followed(tmp_path):
    presets = PresetStore(Workspace(tmp_path))
    presets.save("good", train_spec())
    outside = tmp_path / "outside.json"
    outside.write_text(preset_file(SETTINGS))
    (presets.folder / "link.json").symlink_to(outside)  # a link to a file outside the folder
    (presets.folder / "dir.json").mkdir()  # not a file
    (presets.folder / "two words.json").write_text(preset_file(SETTINGS))  # a name the studio cannot use
    os.mkfifo(presets.folder / "fifo.json")  # reading it would block the page forever
    listing = presets.listing("dreambooth")
    problems = dict(p.split(": ", 1) for p in listing.problems)
    assert set(problems) == {"link.json", "dir.json", "two words.json", "fifo.json"}
    assert "links to a file outside the folder" in problems["link.json"]
    assert "not a regular file" in problems["dir.json"] and "not a regular file" in problems["fifo.json"]
    assert "is not allowed" in problems["two words.json"]
    assert listing.names == ["dir", "fifo", "good", "link"]  # deletable from the page; "two words" cannot be typed
    with pytest.raises(StudioError, match="links to a file outside the folder"):
        presets.load("link")
    presets.delete("link")  # the link goes, not the file it leads to
    assert outside.is_file() and not (presets.folder / "link.json").is_symlink()
    for bad in ("../outside", "a/b", "..", "x\\y", "a\x00b"):
        with pytest.raises(StudioError):
            presets.delete(bad)
        with pytest.raises(StudioError):
            presets.save(bad, train_spec())
    assert outside.is_file()


def test_a_huge_presets_folder_lists_its_first_files_and_says_so(tmp_path, monkeypatch):
    import ether_diffusion.studio.presets as module

    monkeypatch.setattr(module, "MAX_PRESETS", 5)
    presets = PresetStore(Workspace(tmp_path))
    presets.save("p0", train_spec())
    for n in range(1, 8):
        (presets.folder / f"p{n}.json").write_text((presets.folder / "p0.json").read_text())
    listing = presets.listing()
    assert listing.names == ["p0", "p1", "p2", "p3", "p4"]
    assert listing.problems == ["the presets folder holds 8 files: only the first 5 are listed"]
    assert presets.load("p7").name == "p7"  # every preset still loads by name


# --- dataset folders --------------------------------------------------------------------------------------------


def dataset(tmp_path, rows: list[dict]):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


GOOD_ROW = {"image": "a.png", "conditioning_image": "a.png", "text": "a star"}


@pytest.mark.parametrize(
    "row_number, column, name",
    [
        (1, "conditioning_image", "../../../../../../etc/passwd"),
        (1, "image", "../../../../../../etc/passwd"),
        (1, "conditioning_image", "/etc/passwd"),
        (3, "conditioning_image", "../outside.png"),
        (2, "image", "sub/../../outside.png"),
        (1, "conditioning_image", "link.png"),  # a link inside the folder to a file outside it
        (2, "image", "."),
    ],
)
def test_a_dataset_naming_files_outside_its_folder_is_refused_naming_row_and_path(tmp_path, monkeypatch, row_number,
                                                                                  column, name):  # fmt: skip
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    rows = [dict(GOOD_ROW) for _ in range(3)]
    rows[row_number - 1][column] = name
    folder = dataset(tmp_path, rows)
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    opened = []
    real_open = open

    def watch(path, *args, **kwargs):  # every file the check opens
        opened.append(os.path.realpath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watch)
    what = "control image" if column == "conditioning_image" else "target image"
    where = f"metadata.jsonl', line {row_number}: the {what} '.*' is outside the dataset"
    with pytest.raises(StudioError, match=where):
        check_dataset_folder(folder)
    assert all(path.startswith(str(folder.resolve())) for path in opened), opened
    if row_number == 1:
        with pytest.raises(StudioError, match="line 1: .* is outside the dataset folder"):
            first_row(folder)
        with pytest.raises(StudioError, match="is outside the dataset folder"):
            ControlSpec("c", source="folder", data_dir=str(folder)).validated()


def test_a_dataset_inside_its_folder_is_accepted_and_bad_rows_are_named(tmp_path):
    folder = dataset(tmp_path, [GOOD_ROW, {**GOOD_ROW, "image": "./sub/../a.png"}])
    assert check_dataset_folder(folder) == folder.resolve()
    (folder / "metadata.jsonl").write_text(json.dumps(GOOD_ROW) + "\n\n[1, 2]\n")
    with pytest.raises(StudioError, match="line 3 is not a JSON object"):
        check_dataset_folder(folder)
    (folder / "metadata.jsonl").write_text(json.dumps(GOOD_ROW) + "\n" + DEEP + "\n")
    with pytest.raises(StudioError, match="line 2 is not a JSON object"):
        check_dataset_folder(folder)
    (folder / "metadata.jsonl").write_text(json.dumps({**GOOD_ROW, "image": "a\x00b"}) + "\n")
    with pytest.raises(StudioError, match="line 1: the target image .* is not a path"):
        check_dataset_folder(folder)


def test_resuming_a_control_job_checks_its_dataset_again(tmp_path):
    folder = dataset(tmp_path, [GOOD_ROW])
    workspace = Workspace(tmp_path / "ws")
    spec = ControlSpec("c", source="folder", data_dir=str(folder)).validated()
    job = workspace.jobs / "20260101-000000-c"
    job.mkdir()
    state = {"id": job.name, "kind": "control", "created": 1.0, "phase": "stopped", "spec": vars(spec).copy(),
             "step": 1, "total": 300, "data_dir": str(folder), "preview_image": str(folder / "a.png")}  # fmt: skip
    (job / "state.json").write_text(json.dumps(state))
    (folder / "metadata.jsonl").write_text(json.dumps({**GOOD_ROW, "conditioning_image": "/etc/passwd"}) + "\n")
    manager = JobManager(workspace, "no-model")
    assert manager.status()["resumable"]
    with pytest.raises(StudioError, match="line 1: the control image '/etc/passwd' is outside the dataset folder"):
        manager.resume()
    assert not manager.running() and manager.status()["phase"] == "stopped"


# --- job states -------------------------------------------------------------------------------------------------


def write_state(workspace, name: str, text: str, created: float = 1.0):
    job = workspace.jobs / name
    job.mkdir()
    (job / "state.json").write_text(text)
    os.utime(job / "state.json", (created, created))


def good_state(name: str, created: float) -> dict:
    return {"id": name, "kind": "dreambooth", "created": created, "phase": "done", "step": 4, "total": 4,
            "spec": vars(train_spec().validated()), "losses": [0.1, 0.2], "previews": [], "message": ""}  # fmt: skip


@pytest.mark.parametrize(
    "state, why",
    [
        ("[]", "it is not a JSON object"),
        ("{}", "its id None is not its folder's name"),
        (DEEP, "its JSON is nested deeper"),
        ("{", "it is not readable JSON"),
        ({"id": "../../elsewhere"}, "its id '../../elsewhere' is not its folder's name"),
        ({"phase": "dancing"}, "its phase 'dancing' is not one of"),
        ({"kind": "inpainting"}, "its kind 'inpainting' is not one of"),
        ({"created": "yesterday"}, "its created is of the wrong type"),
        ({"losses": "many", "step": "4"}, "its losses, step are of the wrong type"),
        ({"previews": [{"path": 1}]}, "its previews is of the wrong type"),
        ({"spec": {"adapter_name": "x"}}, "its settings are not a dreambooth form's"),
        ({"spec": {"instance_prompt": "x", "adapter_name": "../x"}}, "is not allowed"),
        ({"spec": {"instance_prompt": "x", "adapter_name": "x", "method": "lora"}}, "method 'lora' is not one of"),
        ({"spec": {"instance_prompt": "x", "adapter_name": "x", "preview_every": 0}}, "preview every must be"),
        ({"spec": []}, "it has no settings"),
    ],
)
def test_a_job_state_of_the_wrong_shape_is_skipped_and_the_studio_still_starts(tmp_path, state, why):
    workspace = Workspace(tmp_path)
    write_state(workspace, "1-good", json.dumps(good_state("1-good", 1.0)))
    text = state if isinstance(state, str) else json.dumps({**good_state("2-bad", 2.0), **state})
    write_state(workspace, "2-bad", text)  # the newer one: the studio would show it
    manager = JobManager(workspace, "no-model")
    assert manager.status()["id"] == "1-good" and manager.spec().adapter_name == "star"
    assert len(manager.skipped) == 1 and "2-bad/state.json' is not a job's state (" in manager.skipped[0]
    assert why in manager.skipped[0] and "the job is not shown" in manager.skipped[0]


def test_a_huge_job_state_is_not_read(tmp_path, monkeypatch):
    import ether_diffusion.studio.jobs as jobs

    monkeypatch.setattr(jobs, "MAX_STATE_BYTES", 100)
    workspace = Workspace(tmp_path)
    write_state(workspace, "2-big", json.dumps(good_state("2-big", 2.0)))
    manager = JobManager(workspace, "no-model")
    assert manager.status() == {} and "a job's state is far smaller" in manager.skipped[0]


# --- links and names in the workspace ---------------------------------------------------------------------------


def test_deleting_an_adapter_that_is_a_link_removes_the_link_not_the_other_file(tmp_path):
    store = AdapterStore(Workspace(tmp_path))
    (store.folder / "real.safetensors").write_bytes(b"not really an adapter")
    (store.folder / "alias.safetensors").symlink_to("real.safetensors")  # named like another file of the folder
    store.delete("alias")
    assert (store.folder / "real.safetensors").is_file() and store.names() == ["real"]


def test_an_adapter_linking_outside_the_folder_is_listed_with_its_problem_and_never_read(tmp_path):
    store = AdapterStore(Workspace(tmp_path / "ws"))
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"elsewhere")
    (store.folder / "escape.safetensors").symlink_to(secret)
    (store.folder / "escape.png").symlink_to(tmp_path / "elsewhere.png")
    (store.folder / "dir.safetensors").mkdir()  # a folder where an adapter's file would go
    listing = store.list()  # the Adapters tab: one bad entry never breaks the table
    assert [(i.name, i.method) for i in listing] == [("escape", "unreadable")]
    assert "links to a file outside the folder" in listing[0].error and listing[0].thumbnail is None
    assert store.names_for("dreambooth") == [] and store.find("0" * 64) is None
    for action in (lambda: store.export("escape"), lambda: store.info("escape"), lambda: store.rename("escape", "x")):
        with pytest.raises(StudioError, match="links to a file outside the folder"):
            action()
    assert store.exists("dir") and store.free_name("dir") == "dir-2"  # the name is taken, by a folder
    store.delete("escape")
    assert secret.read_bytes() == b"elsewhere" and store.names() == []


# --- the door ---------------------------------------------------------------------------------------------------


def test_accounts_come_from_the_flags_and_the_file_and_bad_ones_are_named_without_their_password(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("# the studio's users\n\nbob:pass:with:colons\n  carol:two words  \n")
    assert accounts(["alice:s3cret"], str(users)) == [("alice", "s3cret"), ("bob", "pass:with:colons"),
                                                     ("carol", "two words")]  # fmt: skip
    refusals = [("alice", "--auth value 1 is not USER:PASSWORD"), (":pw", "--auth value 1"),
                ("alice:", "--auth value 1"), ("al ice:hunter2x", "the user name holds a space")]  # fmt: skip
    for value, message in refusals:
        with pytest.raises(StudioError, match=message) as refused:
            accounts([value], None)
        assert "hunter2x" not in str(refused.value)  # the password is never repeated
    users.write_text("dave:hunter2x\nerin hunter3y\n")
    with pytest.raises(StudioError, match=f"--auth_file '{users}', line 2 is not USER:PASSWORD") as refused:
        accounts([], str(users))
    assert "hunter" not in str(refused.value)
    users.write_text("# nobody\n")
    with pytest.raises(StudioError, match="holds no USER:PASSWORD line"):
        accounts([], str(users))
    with pytest.raises(StudioError, match="is not a file"):
        accounts([], str(tmp_path / "missing.txt"))
    with pytest.raises(StudioError, match="the user 'alice' is given twice"):
        accounts(["alice:a", "alice:b"], None)


def test_listing_beyond_the_loopback_needs_a_login_or_the_insecure_flag():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.5")
    assert check_exposure("127.0.0.1", 7860, [], False) is None
    for host in ("0.0.0.0", "::", "192.168.1.5"):
        with pytest.raises(StudioError) as refused:
            check_exposure(host, 7860, [], False)
        message = str(refused.value)
        assert f"--host {host} listens beyond this machine" in message and "anyone who can reach port 7860" in message
        assert "--auth USER:PASSWORD" in message and "--insecure_no_auth" in message
        assert check_exposure(host, 7860, [("a", "b")], False) is None
        assert check_exposure(host, 7860, [], True).startswith("warning: ")
    with pytest.raises(StudioError, match="contradict"):
        check_exposure("0.0.0.0", 7860, [("a", "b")], True)


def test_the_studio_command_refuses_the_network_without_a_login_before_it_starts(tmp_path, capsys, monkeypatch):
    from ether_diffusion.cli import main

    started = []
    import ether_diffusion.studio.ui as ui

    monkeypatch.setattr(ui, "build_app", lambda *args: started.append(args))
    begin = time.monotonic()
    assert main(["studio", "--host", "0.0.0.0", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 listens beyond this machine") and err.count("\n") == 1
    assert started == [] and time.monotonic() - begin < 30
    users = tmp_path / "users.txt"
    users.write_text("alice hunter2x\n")
    assert main(["studio", "--host", "0.0.0.0", "--auth_file", str(users), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "line 1 is not USER:PASSWORD" in err and "hunter2x" not in err and started == []
