"""Atomic writes: the target holds the old or the whole new content, and no temporary remains."""

import stat

import pytest

from safediff.atomic import atomic_dir, atomic_path, write_text_atomic


def test_write_text_atomic_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    assert write_text_atomic(path, "one") == path
    assert path.read_text() == "one"
    write_text_atomic(path, "two", mode=0o600)
    assert path.read_text() == "two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    # the temporary is hidden, beside the target
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".x.txt.tmp")
        tmp.write_text("new")
    assert path.read_text() == "new"


def test_atomic_dir_replaces_the_folder_and_keeps_the_old_one_on_error(tmp_path):
    target = tmp_path / "run" / "merged"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with atomic_dir(target) as tmp:  # an earlier folder is replaced, not merged into
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("three")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # the old folder stays
    leftover = [p for p in target.parent.iterdir() if p.name != "merged"]
    assert [p.name.startswith(".merged.tmp-") for p in leftover] == [True]  # hidden, as it was
    with atomic_dir(target) as tmp:  # the next write clears it
        (tmp / "d.txt").write_text("four")
    assert sorted(p.name for p in target.parent.iterdir()) == ["merged"]
    assert sorted(p.name for p in target.iterdir()) == ["d.txt"]
