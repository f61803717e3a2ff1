"""atomic_write and atomic_folder: a good file or folder is replaced whole or not at all."""

import os
import stat

import pytest

from ether_diffusion.files import atomic_folder, atomic_write


def test_replaces_in_one_rename_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("good")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
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
