"""Training prompts: loading a prompt list and drawing the prompts of each epoch's groups.

A prompt spec is one of
- 'builtin:NAME': a list shipped with safediff (src/safediff/data/prompts/NAME.txt);
- a path ending in .csv: the 'prompt' column (or 'adv_prompt', as in MMA-Diffusion, when there is
  no 'prompt' column); rows with an empty prompt are skipped and counted in a logged warning;
- any other path: a UTF-8 text file, one prompt per line; blank lines and lines whose first
  non-blank character is '#' are skipped.
Prompts are stripped of leading and trailing whitespace. Errors are `SafediffError`s that name the
file (and the line or row where there is one).
"""

import csv
import io
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from safediff.errors import SafediffError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
CSV_COLUMNS = ("prompt", "adv_prompt")
"""Prompt columns tried in order."""


def builtin_names() -> list[str]:
    """Names of the prompt lists shipped with safediff."""
    folder = resources.files("safediff.data") / "prompts"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_prompts(spec: str) -> list[str]:
    """Prompts from 'builtin:NAME', a .csv file or a text file (see the module docstring).

    Returns a non-empty list of stripped prompts, in file order (duplicates kept).
    """
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        names = builtin_names()
        if name not in names:
            raise SafediffError(
                f"unknown builtin prompt list {name!r}; builtins: {', '.join(names)}"
            )
        data = (resources.files("safediff.data") / "prompts" / f"{name}.txt").read_bytes()
        return _parse_text(_decode(data, spec), spec)

    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise SafediffError(
            f"prompt file {what}: {spec} (give a .txt/.csv file or builtin:NAME; "
            f"builtins: {', '.join(builtin_names())})"
        )
    text = _decode(path.read_bytes(), spec)
    if path.suffix.lower() == ".csv":
        return _parse_csv(text, spec)
    return _parse_text(text, spec)


def _decode(data: bytes, source: str) -> str:
    """UTF-8 (a leading BOM is dropped), or an error giving the line and byte offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SafediffError(
            f"{source}: not UTF-8 text (bad byte 0x{data[err.start]:02x} at line {line}, byte "
            f"offset {err.start}); re-save the file as UTF-8"
        ) from None


def _parse_text(text: str, source: str) -> list[str]:
    prompts = []
    for raw in text.split("\n"):  # not splitlines(): it also splits on \x0b, \x1c, U+2028, ...
        line = raw.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    if not prompts:
        raise SafediffError(f"no prompts in {source} (blank lines and '#' comments are skipped)")
    return prompts


def _parse_csv(text: str, source: str) -> list[str]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise SafediffError(f"no prompts in {source} (the CSV file is empty)")
        columns = [c.strip() for c in header]
        column = next((c for c in CSV_COLUMNS if c in columns), None)
        if column is None:
            raise SafediffError(
                f"{source}: no 'prompt' or 'adv_prompt' column; columns found: "
                f"{', '.join(repr(c) for c in columns) or '(none)'}"
            )
        index = columns.index(column)
        prompts: list[str] = []
        empty_rows: list[int] = []
        # Row numbers count records with the header as row 1 (a spreadsheet's numbering).
        for row_number, row in enumerate(reader, start=2):
            if not row:  # a blank line between records
                continue
            value = row[index].strip() if index < len(row) else ""
            if value:
                prompts.append(value)
            else:
                empty_rows.append(row_number)
    except csv.Error as err:
        raise SafediffError(f"{source}: malformed CSV near line {reader.line_num}: {err}") from None
    if empty_rows:
        shown = ", ".join(str(r) for r in empty_rows[:10]) + (
            ", ..." if len(empty_rows) > 10 else ""
        )
        logger.warning(
            "%s: skipped %d row(s) with an empty %r (rows %s)",
            source,
            len(empty_rows),
            column,
            shown,
        )
    if not prompts:
        raise SafediffError(f"no prompts in {source} (no row has a non-empty {column!r})")
    return prompts


def sample_prompts(prompts: Sequence[str], n: int, generator: torch.Generator) -> list[int]:
    """Indices of `n` prompts drawn uniformly with replacement (one per group of an epoch).

    generator: seeded by the caller (e.g. from derive_seed(seed, "prompts", epoch)) so every
        process draws the same prompts; draws happen on the generator's device.
    Returns n ints in [0, len(prompts)).
    """
    if not prompts:
        raise SafediffError("cannot sample from an empty prompt list")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    idx = torch.randint(
        0, len(prompts), (n,), generator=generator, device=generator.device, dtype=torch.int64
    )
    return [int(i) for i in idx.tolist()]
