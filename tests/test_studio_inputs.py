"""The studio's files under bad input: links in the workspace (fast, no model)."""

from __future__ import annotations

import json

import pytest

from ether_diffusion.studio import AdapterStore, StudioError, TrainSpec, Workspace

SUBJECT = "orange_checkered_star"
DEEP = "[" * 30_000 + "]" * 30_000  # under the size cap, deeper than json's parser goes


def train_spec(**changes) -> TrainSpec:
    fields = dict(instance_prompt="a sks star", subject=SUBJECT, class_prompt="a star", max_train_steps=4)
    return TrainSpec("star", **{**fields, **changes})


def preset_file(settings: dict, kind: str = "dreambooth", **top) -> str:
    return json.dumps({"format": 1, "kind": kind, "settings": settings, **top})


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
