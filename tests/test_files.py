"""atomic_write and atomic_folder: a good file or folder is replaced whole or not at all."""

import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from safetensors import SafetensorError

from ether_diffusion import files
from ether_diffusion.files import atomic_folder, atomic_write

#: what the writers raise when the disk fills: Python's own writes, and safetensors' (its Rust error, relayed)
DISK_FULL = [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
]


def test_replaces_in_one_rename_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("good")
    with atomic_write(target) as tmp:
        # in a private folder beside the target (same file system: one rename), holding whatever the writer makes
        assert tmp.parent.parent == tmp_path and tmp != target
        tmp.write_text("better")
        assert target.read_text() == "good"  # nothing visible until the block ends
    assert target.read_text() == "better"

    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "better"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_write(tmp_path / "no" / "file.txt"):
            pass


def test_a_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as staging:
        assert staging.parent == tmp_path and staging != target and not target.exists()
        (staging / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    # replaced whole: the old folder's files are gone, nothing is left beside it
    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("two")
        assert (target / "a.txt").is_file()  # the old one stays readable until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # a failure leaves the old folder as it was, and no staging folder
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_folder(target) as staging:
            (staging / "c.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_made_meanwhile_by_another_process_is_kept_when_asked(tmp_path):
    target = tmp_path / "set"
    with atomic_folder(target, replace=False) as staging:
        (staging / "mine.txt").write_text("mine")
        target.mkdir()  # another process finished the same folder first
        (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_a_new_folder_gets_the_mode_mkdir_would_give(tmp_path):
    saved = os.umask(0o027)
    try:
        with atomic_folder(tmp_path / "out"):
            pass
    finally:
        os.umask(saved)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    with atomic_write(tmp_path / "atomic.txt") as tmp:
        tmp.write_text("x")
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~mask


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "adapter.safetensors"
    target.write_text("old")
    for mode in (0o640, 0o604, 0o600):
        os.chmod(target, mode)
        with atomic_write(target) as tmp:
            tmp.write_text("new")
        assert stat.S_IMODE(target.stat().st_mode) == mode and target.read_text() == "new"


@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "SafetensorError"])
@pytest.mark.parametrize("existed", [True, False], ids=["replacing", "new"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_folder(tmp_path, error, existed):
    target = tmp_path / "model.safetensors"
    if existed:
        target.write_text("good")
    with pytest.raises(OSError) as raised:
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise error
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC and "\n" not in message
    kept = "the file that was there is unchanged" if existed else "nothing was written"
    assert message == (
        f"could not write '{target}': the disk is full (No space left on device in '{tmp_path}'); {kept}. Free "
        "some space or write elsewhere, then run again"
    )
    assert [p.name for p in tmp_path.iterdir()] == (["model.safetensors"] if existed else [])
    assert not existed or target.read_text() == "good"


@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "SafetensorError"])
def test_a_full_disk_while_filling_a_folder_keeps_the_old_one(tmp_path, error):
    target = tmp_path / "fused"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    message = rf"^could not write the model to '{target}': the disk is full .*the folder that was there is unchanged"
    with pytest.raises(OSError, match=message):
        with atomic_folder(target, what="the model") as staging:
            (staging / "model_index.json").write_text("half")
            raise error
    assert [p.name for p in tmp_path.iterdir()] == ["fused"] and os.listdir(target) == ["model_index.json"]


KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
with files.atomic_write(sys.argv[2]) as tmp:
    tmp.write_bytes(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_nothing_the_next_run_keeps(tmp_path, monkeypatch):
    """A process killed while writing leaves its temporaries beside the target; the next write of that target (in
    a process started after) removes them, and nothing else."""
    target = tmp_path / "ether_adapter.safetensors"
    target.write_text("good")
    others = [".other.safetensors.0123456789ab.tmp", ".tmpAbC123", "notes.tmp", ".ether_adapter.safetensors.old"]
    for name in others:
        (tmp_path / name).write_text("not ours")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, files.__file__, str(target)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(set(os.listdir(tmp_path)) - {target.name, *others})
    assert len(left) == 1 and left[0].startswith(".ether_adapter.safetensors.")  # the killed writer's
    assert target.read_text() == "good"

    monkeypatch.setattr(files, "_STARTED", time.time(), raising=False)  # as in a process started after the kill
    with atomic_write(target) as tmp:
        tmp.write_text("better")
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, *others]) and target.read_text() == "better"


def test_temporaries_in_use_or_younger_than_the_process_are_kept(tmp_path, monkeypatch):
    """A writer of the same target in another process holds its folder locked; one younger than this process may
    be a writer that has not locked it yet. Neither is touched."""
    target = tmp_path / "model.safetensors"
    with atomic_write(target) as first:
        monkeypatch.setattr(files, "_STARTED", time.time(), raising=False)
        young = tmp_path / ".model.safetensors.0123456789ab.tmp"
        young.mkdir()
        future = time.time() + 60
        os.utime(young, (future, future))
        with atomic_write(target) as second:
            second.write_text("second")
        assert first.parent.is_dir() and young.is_dir()
        first.write_text("first")
    assert target.read_text() == "first" and sorted(os.listdir(tmp_path)) == [young.name, target.name]
