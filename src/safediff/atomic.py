"""Atomic file writes: write beside the target under a temporary name, then rename into place.

A reader (or a resumed run) sees either the old file or the complete new one, never a partial
write; a failed write leaves no temporary file behind. A killed process does leave its temporary
(`.NAME.tmp-PID`, a file or a folder); `remove_orphans` removes those whose process is gone, and
`atomic_dir` calls it on its folder before each write.
"""

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temporary_path(path: Path) -> Path:
    """The hidden temporary name beside `path` for this process: `.NAME.tmp-PID`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(folder: str | Path) -> list[Path]:
    """Remove the temporaries (`.NAME.tmp-PID` files and folders) in `folder` left by processes
    that no longer run; returns what was removed (each logged). This process's own temporaries
    and those of live processes are kept; so is anything when the folder does not exist.
    Process ids are this machine's: a folder shared with another machine that is writing into
    it at the same time is not supported (only one process writes a run's folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _TEMPORARY.match(entry.name)
        if m is None or int(m["pid"]) == os.getpid() or process_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        logger.info(
            "removed %s, left by an interrupted write (process %s is gone)", entry, m["pid"]
        )
        removed.append(entry)
    return removed


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its folder created); when the block ends without
    an error, the temporary file (chmod `mode` if given) replaces `path`; on an error it is
    removed and the error propagates. The temporary name is hidden and holds the process id, so
    concurrent writers of one folder do not collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
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
    `path` clears it. Temporaries of dead processes in the same folder are removed first
    (`remove_orphans`)."""
    path = Path(path)
    remove_orphans(path.parent)
    tmp = temporary_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
