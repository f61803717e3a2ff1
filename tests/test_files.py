"""atomic_write: a good file is replaced whole or not at all."""

import pytest

from ether_diffusion.files import atomic_write


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


def test_io_still_exports_it():
    from ether_diffusion.io import atomic_write as from_io

    assert from_io is atomic_write
