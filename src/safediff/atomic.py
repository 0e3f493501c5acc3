"""Atomic file writes: write beside the target under a temporary name, then rename into place.

A reader (or a resumed run) sees either the old file or the complete new one, never a partial
write; a failed write leaves no temporary file behind.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its folder created); when the block ends without
    an error, the temporary file (chmod `mode` if given) replaces `path`; on an error it is
    removed and the error propagates. The temporary name is hidden and holds the process id, so
    concurrent writers of one folder do not collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`, named as `atomic_path` names its temporary
    files; when the block ends without an error, it replaces `path` (an earlier folder there is
    removed first). On an error the error propagates, `path` is untouched and the hidden
    temporary folder stays as it was (what an interrupted write got to), until the next write to
    `path` clears it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
