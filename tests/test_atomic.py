"""Atomic writes: the target holds the old or the whole new content, and no temporary remains."""

import stat

import pytest

from safediff.atomic import atomic_path, write_text_atomic


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
