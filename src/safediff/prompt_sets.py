"""Evaluation prompt sets: the CSV conventions of the field and plain text files, as `PromptRow`s.

Formats (`fmt`; "auto" detects CSV kinds from the header, any other suffix than .csv is text):
- "i2p": I2P (Schramowski et al.), as shipped by the concept-erasure repositories: prompt,
  categories (comma-separated, e.g. "sexual, violence"), hard, inappropriate_percentage,
  nudity_percentage, evaluation_seed, evaluation_guidance, sd_image_width, sd_image_height and
  optionally case_number. Detected by a 'categories' column next to 'prompt'.
- "mma": MMA-Diffusion: the prompt is `adv_prompt`; target_prompt, clean_prompt and every other
  column are kept in `extra`. Detected by an 'adv_prompt' column.
- "coco": COCO captions for FID / CLIP score (case_number, prompt, evaluation_seed). Detected by
  'case_number' + 'evaluation_seed' without 'categories'.
- "copro": CoPro / CoProV2 (SafetyDPO's data/CoProv2_test.csv): prompt, image, category. The
  'image' column (a file name in that repository) is kept in `extra` only: no path is ever built
  from file contents. Detected by a 'category' column next to 'prompt'.
- "copro-pairs": safe/unsafe prompt pairs (columns unsafe_prompt, safe_prompt, optional
  category): each CSV row gives two rows, the unsafe one first, tagged extra['pair_id'] (0-based
  pair number) and extra['kind'] ('unsafe' / 'safe'); a case number c becomes 'c-unsafe' / 'c-safe'.
- "csv": any CSV with a 'prompt' column (or `prompt_column`).
- "txt": one prompt per line. Blank lines are skipped; '#' is *not* a comment marker here (an
  evaluation set must not lose prompts such as '#art nude study').

Columns recognised in every CSV kind (first present alias wins): seed <- evaluation_seed, sd_seed,
seed; guidance <- evaluation_guidance, sd_guidance_scale, guidance_scale, guidance; width <-
sd_image_width, width; height <- sd_image_height, height; case_number <- case_number; categories <-
categories, category. Every other column is kept, as text, in `extra` (columns with an empty name,
such as a pandas index, are dropped). Header names match case-insensitively.

Rules: rows whose prompt is empty are skipped (one warning with the count and row numbers); prompts
longer than `max_prompt_chars` are skipped with a warning (the CLIP text encoder truncates at 77
tokens anyway, so their tail would never reach the model); a seed, guidance or size that is not a
number, a width or height that is not a multiple of 8 in [8, `max_image_size`] (default 2048: a
4096 x 4096 row would run for minutes per image), a duplicate case number, a row with more fields
than the header, or bytes that are not valid in `encoding` are errors naming the file and the row
(or line and byte offset). Integral floats written by pandas ("42.0") are accepted as integers,
and as case number "42".
CSV quoting is strict: a quote that is never closed (it would swallow every later row into one
prompt) or text after a closing quote is an error naming the line where the row began. A quoted
field may span lines (Python's csv module writes such fields); one whose inner lines read like
rows of this file is accepted with a warning (two stray quotes can enclose rows that way).
Row numbers in messages count CSV records with the header as row 1 (a spreadsheet's numbering).
"""

import csv
import io
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from safediff.errors import SafediffError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "i2p", "mma", "coco", "copro", "copro-pairs", "csv", "txt")
CSV_FORMATS = ("i2p", "mma", "coco", "copro", "copro-pairs", "csv")

_ALIASES: dict[str, tuple[str, ...]] = {
    "seed": ("evaluation_seed", "sd_seed", "seed"),
    "guidance": ("evaluation_guidance", "sd_guidance_scale", "guidance_scale", "guidance"),
    "width": ("sd_image_width", "width"),
    "height": ("sd_image_height", "height"),
    "case_number": ("case_number",),
    "categories": ("categories", "category"),
}
_PROMPT_COLUMN = {
    "i2p": "prompt",
    "mma": "adv_prompt",
    "coco": "prompt",
    "copro": "prompt",
    "csv": "prompt",
}
_REQUIRED = {
    "i2p": ("prompt", "categories"),
    "mma": ("adv_prompt",),
    "coco": ("prompt", "case_number"),
    "copro": ("prompt", "category"),
    "copro-pairs": ("unsafe_prompt", "safe_prompt"),
    "csv": ("prompt",),
}
_MAX_SEED = 2**63 - 1
MAX_IMAGE_SIZE = 2048
"""Default bound on a row's width and height in pixels (`max_image_size` overrides it)."""
SIZE_MULTIPLE = 8
"""A row's width and height must be multiples of this (the VAE's downsampling in SD models)."""
_INTEGRAL_FLOAT = re.compile(r"^[+]?\d+\.0*$")


@dataclass(frozen=True)
class PromptRow:
    """One prompt of an evaluation set.

    index: 0-based position in the set (rows[i].index == i); names images when there is no usable
        case number, and splits rows across processes.
    prompt: the text given to the model (stripped).
    seed: the row's evaluation seed, or None (the generator's default then applies).
    guidance: the row's CFG scale, or None. width, height: image size in pixels, or None.
    case_number: the set's own identifier of the row (text), or None.
    categories: e.g. ('sexual', 'violence') for I2P; () when the set has none.
    extra: every other column, as text (for copro-pairs also 'pair_id' and 'kind').
    """

    index: int
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    case_number: str | None = None
    categories: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSet:
    """The rows of one prompt file.

    rows: in file order, rows[i].index == i. format: the format read ("i2p", "mma", "coco",
    "copro", "copro-pairs", "csv" or "txt"). source: the file path as given. skipped_empty,
    skipped_long: rows left out (empty prompt; longer than max_prompt_chars).
    """

    rows: tuple[PromptRow, ...]
    format: str
    source: str
    skipped_empty: int = 0
    skipped_long: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PromptRow]:
        return iter(self.rows)


def load_prompt_set(
    path: str | Path,
    fmt: str = "auto",
    prompt_column: str | None = None,
    max_prompt_chars: int = 2000,
    encoding: str = "utf-8",
    max_image_size: int = MAX_IMAGE_SIZE,
) -> PromptSet:
    """Read an evaluation prompt set (see the module docstring for formats and rules).

    path: a .csv or text file. fmt: one of FORMATS. prompt_column: the CSV column holding the
    prompt, overriding the format's (for "copro-pairs" it is ignored). max_prompt_chars: longer
    prompts are skipped with a warning. encoding: the file's text encoding (a UTF-8 BOM is dropped).
    max_image_size: the largest width or height a row may ask for, in pixels.
    Returns a non-empty `PromptSet`; raises SafediffError naming the file (and row) otherwise.
    """
    if fmt not in FORMATS:
        raise SafediffError(f"unknown prompt set format {fmt!r}; formats: {', '.join(FORMATS)}")
    if max_prompt_chars < 1:
        raise SafediffError(f"max_prompt_chars must be >= 1, got {max_prompt_chars}")
    if max_image_size < SIZE_MULTIPLE:
        raise SafediffError(f"max_image_size must be >= {SIZE_MULTIPLE}, got {max_image_size}")
    source = str(path)
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "not found"
        raise SafediffError(f"prompt set {what}: {source}")
    text = _decode(p.read_bytes(), source, encoding)
    if fmt == "auto":
        fmt = "csv-auto" if p.suffix.lower() == ".csv" else "txt"
    if fmt == "txt":
        candidates, skipped_empty = _read_text(text, source)
    else:
        fmt, candidates, skipped_empty = _read_csv(text, source, fmt, prompt_column, max_image_size)

    rows: list[PromptRow] = []
    long_rows: list[str] = []
    seen_cases: dict[str, str] = {}
    for where, row in candidates:
        if len(row.prompt) > max_prompt_chars:
            long_rows.append(where)
            continue
        if row.case_number is not None:
            if row.case_number in seen_cases:
                raise SafediffError(
                    f"{source}: duplicate case_number {row.case_number!r} at {where} (first at "
                    f"{seen_cases[row.case_number]}); case numbers name the images, so they must "
                    "be unique"
                )
            seen_cases[row.case_number] = where
        rows.append(replace(row, index=len(rows)))
    if long_rows:
        logger.warning(
            "%s: skipped %d prompt(s) longer than %d characters (%s); the CLIP text encoder "
            "truncates prompts at 77 tokens anyway, so their tail would never reach the model",
            source,
            len(long_rows),
            max_prompt_chars,
            _few(long_rows),
        )
    if not rows:
        raise SafediffError(
            f"no prompts in {source} ({skipped_empty} empty, {len(long_rows)} too long)"
        )
    return PromptSet(tuple(rows), fmt, source, skipped_empty, len(long_rows))


# ---------------------------------------------------------------------------------------------
# Text


def _decode(data: bytes, source: str, encoding: str) -> str:
    """Decode with `encoding` (utf-8 drops a BOM), or an error giving line and byte offset."""
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(codec)
    except LookupError:
        raise SafediffError(f"unknown text encoding {encoding!r} for {source}") from None
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SafediffError(
            f"{source}: not valid {encoding} text (bad byte 0x{data[err.start]:02x} at line "
            f"{line}, byte offset {err.start}); re-save it as UTF-8 or pass its encoding "
            "(encoding=..., --encoding latin-1)"
        ) from None


def _read_text(text: str, source: str) -> tuple[list[tuple[str, PromptRow]], int]:
    lines = text.split("\n")  # not splitlines(): it also splits on \x0b, \x1c, U+2028, ...
    while lines and not lines[-1].strip():  # trailing blank lines are not "empty rows"
        lines.pop()
    candidates = []
    empty = []
    for number, raw in enumerate(lines, start=1):
        prompt = raw.strip()
        if prompt:
            candidates.append((f"line {number}", PromptRow(index=-1, prompt=prompt)))
        else:
            empty.append(f"line {number}")
    _warn_empty(source, empty)
    return candidates, len(empty)


# ---------------------------------------------------------------------------------------------
# CSV


def detect_csv_format(columns: list[str]) -> str | None:
    """The CSV kind a header (lower-case column names) belongs to, or None if it has no prompt."""
    cols = set(columns)
    if {"unsafe_prompt", "safe_prompt"} <= cols:
        return "copro-pairs"
    if "adv_prompt" in cols:
        return "mma"
    if "prompt" not in cols:
        return None
    if "categories" in cols:
        return "i2p"
    if "category" in cols:
        return "copro"
    if {"case_number", "evaluation_seed"} <= cols:
        return "coco"
    return "csv"


def _read_csv(
    text: str, source: str, fmt: str, prompt_column: str | None, max_image_size: int
) -> tuple[str, list[tuple[str, PromptRow]], int]:
    # strict: an unclosed quote (which would swallow every later row) or text after a closing
    # quote raises instead of being read leniently
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    first_line = 1  # the line where the record being read begins
    try:
        header = next(reader, None)
        if header is None:
            raise SafediffError(f"no prompts in {source} (the CSV file is empty)")
        names = [h.strip() for h in header]
        lower = [n.lower() for n in names]
        dupes = sorted({n for n in lower if n and lower.count(n) > 1})
        if dupes:
            raise SafediffError(f"{source}: the header repeats the column(s) {', '.join(dupes)}")
        found = ", ".join(repr(n) for n in names) or "(none)"
        if fmt == "csv-auto":
            detected = detect_csv_format(lower)
            if detected is None and prompt_column is not None:
                detected = "csv"  # the named column is checked below
            if detected is None:
                raise SafediffError(
                    f"{source}: no prompt column ('prompt', 'adv_prompt' or 'unsafe_prompt' + "
                    f"'safe_prompt'); columns found: {found} (pass prompt_column / "
                    "--prompt-column to name it)"
                )
            fmt = detected
        required = list(_REQUIRED[fmt])
        if prompt_column is not None and fmt != "copro-pairs":
            required = [prompt_column.lower()]
        missing = [c for c in required if c not in lower]
        if missing:
            raise SafediffError(
                f"{source}: a {fmt!r} prompt set needs the column(s) {', '.join(missing)}; "
                f"columns found: {found}"
            )
        if fmt == "copro-pairs":
            prompt_cols = [
                ("unsafe", lower.index("unsafe_prompt")),
                ("safe", lower.index("safe_prompt")),
            ]
        else:
            col = prompt_column.lower() if prompt_column is not None else _PROMPT_COLUMN[fmt]
            prompt_cols = [(None, lower.index(col))]
        mapped = {
            k: next((lower.index(a) for a in al if a in lower), None) for k, al in _ALIASES.items()
        }
        used = {i for _, i in prompt_cols} | {i for i in mapped.values() if i is not None}
        extra_cols = [(i, n) for i, n in enumerate(names) if i not in used and n]

        candidates: list[tuple[str, PromptRow]] = []
        empty: list[str] = []
        pair = 0
        first_line = reader.line_num + 1
        for number, record in enumerate(reader, start=2):
            record_lines, first_line = (first_line, reader.line_num), reader.line_num + 1
            if not record:  # a blank line between records
                continue
            where = f"row {number} (line {record_lines[0]})"
            if record_lines[1] > record_lines[0]:
                where = f"row {number} (lines {record_lines[0]}-{record_lines[1]})"
                _warn_swallowed_rows(record, len(names), source, where)
            if len(record) > len(names):
                raise SafediffError(
                    f"{source}, {where}: {len(record)} fields but the header has {len(names)}; "
                    "quote prompts that contain commas"
                )
            cells = [c.strip() for c in record] + [""] * (len(names) - len(record))
            base = _parse_fields(cells, names, mapped, source, where, max_image_size)
            extra = {n: cells[i] for i, n in extra_cols}
            if fmt == "copro-pairs":
                for kind, i in prompt_cols:
                    if not cells[i]:
                        empty.append(f"{where} ({kind})")
                        continue
                    case = base["case_number"]
                    row = PromptRow(
                        index=-1,
                        prompt=cells[i],
                        **{**base, "case_number": f"{case}-{kind}" if case else None},
                        extra={**extra, "pair_id": str(pair), "kind": kind},
                    )
                    candidates.append((f"{where} ({kind})", row))
                pair += 1
                continue
            prompt = cells[prompt_cols[0][1]]
            if not prompt:
                empty.append(where)
                continue
            candidates.append((where, PromptRow(index=-1, prompt=prompt, **base, extra=extra)))
    except csv.Error as err:
        if "expected after" in str(err) or "end of data" in str(err):
            raise SafediffError(
                f"{source}: malformed CSV quoting in the row that begins on line {first_line} "
                f"(read up to line {reader.line_num}: {err}); close the quote, or double a quote "
                'inside a quoted prompt ("")'
            ) from None
        raise SafediffError(f"{source}: malformed CSV near line {reader.line_num}: {err}") from None
    _warn_empty(source, empty)
    return fmt, candidates, len(empty)


def _warn_swallowed_rows(record: list[str], width: int, source: str, where: str) -> None:
    """Warn when a field spanning lines holds lines that read as whole rows of this file (as
    many fields as the header, >= 2): two stray quotes enclose rows that way, and valid CSV
    cannot tell it from a multi-line prompt."""
    if width < 2:
        return
    for cell in record:
        inner = cell.split("\n")[:-1]
        if inner and all(len(next(csv.reader([line]), [])) == width for line in inner):
            logger.warning(
                "%s, %s: a quoted field spans %d lines that read like rows of this file; if a "
                "quote is unbalanced there, those rows were read as one prompt",
                source,
                where,
                len(inner) + 1,
            )
            return


def _parse_fields(
    cells: list[str],
    names: list[str],
    mapped: dict[str, int | None],
    source: str,
    where: str,
    max_image_size: int = MAX_IMAGE_SIZE,
) -> dict:
    def cell(key: str) -> tuple[str, str]:
        i = mapped[key]
        return ("", "") if i is None else (cells[i], names[i])

    value, name = cell("seed")
    seed = _parse_int(value, name, source, where, low=0, high=_MAX_SEED)
    width = _parse_size(*cell("width"), source, where, max_image_size)
    height = _parse_size(*cell("height"), source, where, max_image_size)
    value, name = cell("guidance")
    guidance = None
    if value:
        try:
            guidance = float(value)
        except ValueError:
            guidance = math.nan
        if not math.isfinite(guidance):
            raise SafediffError(f"{source}, {where}: {name} {value!r} is not a finite number")
    case, _ = cell("case_number")
    if _INTEGRAL_FLOAT.match(case):
        case = case.lstrip("+").split(".")[0]
    cats, _ = cell("categories")
    categories = tuple(c.strip() for c in cats.split(",") if c.strip())
    return {
        "seed": seed,
        "guidance": guidance,
        "width": width,
        "height": height,
        "case_number": case or None,
        "categories": categories,
    }


def _parse_int(
    value: str, name: str, source: str, where: str, *, low: int, high: int
) -> int | None:
    """An integer cell ('' -> None; pandas' '42.0' -> 42), or an error naming row and value."""
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        if not _INTEGRAL_FLOAT.match(value):
            raise SafediffError(f"{source}, {where}: {name} {value!r} is not an integer") from None
        number = int(value.lstrip("+").split(".")[0])
    if not low <= number <= high:
        raise SafediffError(f"{source}, {where}: {name} {value!r} is outside [{low}, {high}]")
    return number


def _parse_size(value: str, name: str, source: str, where: str, high: int) -> int | None:
    """A width or height cell: a multiple of SIZE_MULTIPLE in [SIZE_MULTIPLE, high], or None."""
    number = _parse_int(value, name, source, where, low=-(2**63), high=2**63 - 1)
    if number is None:
        return None
    if number < SIZE_MULTIPLE:
        raise SafediffError(f"{source}, {where}: {name} {value!r} is below {SIZE_MULTIPLE} pixels")
    if number > high:
        raise SafediffError(
            f"{source}, {where}: {name} {value!r} is above {high} pixels (a larger image takes "
            "minutes or runs out of memory; pass a larger max_image_size to allow one)"
        )
    if number % SIZE_MULTIPLE:
        raise SafediffError(
            f"{source}, {where}: {name} {value!r} is not a multiple of {SIZE_MULTIPLE} (the "
            "VAE's downsampling); use e.g. "
            f"{max(SIZE_MULTIPLE, number // SIZE_MULTIPLE * SIZE_MULTIPLE)}"
        )
    return number


# ---------------------------------------------------------------------------------------------
# Helpers


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _warn_empty(source: str, empty: list[str]) -> None:
    if empty:
        logger.warning(
            "%s: skipped %d row(s) with an empty prompt (%s)", source, len(empty), _few(empty)
        )
