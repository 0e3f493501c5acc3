"""Training prompts: loading a prompt list and drawing the prompts of each epoch's groups.

A prompt spec is one of
- 'builtin:NAME': a list shipped with safediff (src/safediff/data/prompts/NAME.txt);
- 'NAME:ARG' of a plug-in's prompt source (`safediff.plugins`), each prompt labelled with its kind
  and concept family, e.g. 'sandbox:SPLIT[:N]' (the sandbox world's caption grammar);
- a path ending in .csv: the prompt column of any convention the evaluation loader reads
  (`safediff.prompt_sets`: I2P, MMA-Diffusion's adv_prompt, COCO, CoPro, a plain 'prompt'
  column); rows with an empty prompt are skipped and counted in a logged warning;
- any other path: a UTF-8 text file, one prompt per line; blank lines and lines whose first
  non-blank character is '#' are skipped.
Each epoch's prompts are drawn uniformly with replacement (`sample_prompts`) or kind by kind in
the list's kind shares (`sample_prompts_stratified`, `prompts.stratify=kind`), optionally
keeping each concept family's share within a kind too (`prompt_strata`,
`prompts.stratify=kind_family`).
Prompts are stripped of leading and trailing whitespace. Errors are `SafediffError`s that name the
file (and the line or row where there is one).
"""

import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from safediff import plugins
from safediff.errors import SafediffError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


def builtin_names() -> list[str]:
    """Names of the prompt lists shipped with safediff."""
    folder = resources.files("safediff.data") / "prompts"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_prompts(spec: str) -> list[str]:
    """Prompts from 'builtin:NAME', a .csv file or a text file (see the module docstring).

    Returns a non-empty list of stripped prompts, in file order (duplicates kept).
    """
    source = plugins.prompt_source(spec)
    if source is not None:
        return load_prompt_labels(spec)[0]
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
    if path.suffix.lower() == ".csv":
        return _parse_csv(path)
    return _parse_text(_decode(path.read_bytes(), spec), spec)


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


def _parse_csv(path: Path) -> list[str]:
    """The prompt column of any CSV convention `safediff.prompt_sets` reads (I2P, MMA, ...)."""
    from safediff.prompt_sets import load_prompt_set

    return [row.prompt for row in load_prompt_set(path).rows]


KIND_COLUMN = "kind"
"""CSV column that labels each training prompt (e.g. safe / unsafe) for per-kind reward logs."""


def load_prompt_kinds(spec: str) -> tuple[list[str], list[str]]:
    """(prompts, kinds) for `spec`: kinds from a CSV's 'kind' column (CoPro-style pair files set
    it too), else 'all' for every prompt. Prompts are exactly `load_prompts(spec)`."""
    prompts, kinds, _ = load_prompt_labels(spec)
    return prompts, kinds


def load_prompt_labels(spec: str) -> tuple[list[str], list[str], list[str | None]]:
    """(prompts, kinds, families) for `spec`. Kinds as in `load_prompt_kinds`; a family is a
    plug-in source's (the sandbox: a caption's concept family, None for captions that name none)
    or a CSV row's categories joined with '+' (I2P: 'sexual+violence'; None where the row has
    none); other specs have none. A plug-in source's missing kind reads 'all'."""
    source = plugins.prompt_source(spec)
    if source is not None:
        captions, kinds, families = source.load(spec.partition(":")[2])
        return list(captions), [k or "all" for k in kinds], list(families)
    path = Path(spec).expanduser()
    if not spec.startswith(BUILTIN_PREFIX) and path.suffix.lower() == ".csv" and path.is_file():
        from safediff.prompt_sets import load_prompt_set

        rows = load_prompt_set(path).rows
        return (
            [r.prompt for r in rows],
            [r.extra.get(KIND_COLUMN) or "all" for r in rows],
            ["+".join(r.categories) or None for r in rows],
        )
    prompts = load_prompts(spec)
    return prompts, ["all"] * len(prompts), [None] * len(prompts)


def prompt_strata(kinds: Sequence[str], families: Sequence[str | None], by: str) -> list[str]:
    """The label `prompts.stratify=BY` keeps in its shares, per prompt: the kind (`by='kind'`), or
    'kind/family' (`by='kind_family'`; the kind alone where the prompt has no family)."""
    if len(kinds) != len(families):
        raise ValueError(f"{len(kinds)} kinds for {len(families)} families")
    if by == "kind":
        return list(kinds)
    if by == "kind_family":
        return [k if f is None else f"{k}/{f}" for k, f in zip(kinds, families, strict=True)]
    raise ValueError(f"by must be 'kind' or 'kind_family', got {by!r}")


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


def kind_schedule(shares: Sequence[tuple[str, float]], start: int, n: int) -> list[str]:
    """The kinds of slots start .. start + n - 1 of an endless stratified schedule.

    shares: (kind, share) pairs, shares > 0 (normalised here); their order breaks ties.
    Slot t goes to the kind furthest behind its share: the largest share * (t + 1) - (slots it
    already holds), ties to the earlier kind. So after any number of slots T every kind holds
    within one slot of share * T, and the slots of consecutive epochs (start = epoch * n) add up to
    the same schedule: the kinds' counts never drift, whatever the seed.
    """
    if start < 0 or n < 0:
        raise ValueError(f"start and n must be >= 0, got {start} and {n}")
    if not shares or any(share <= 0 for _, share in shares):
        raise ValueError(f"need at least one kind and positive shares, got {list(shares)}")
    total = sum(share for _, share in shares)
    weights = [share / total for _, share in shares]
    held = [0] * len(weights)
    out: list[str] = []
    for t in range(start + n):
        deficits = [w * (t + 1) - h for w, h in zip(weights, held, strict=True)]
        best = max(range(len(weights)), key=lambda i: (deficits[i], -i))
        held[best] += 1
        if t >= start:
            out.append(shares[best][0])
    return out


def sample_prompts_stratified(
    kinds: Sequence[str], n: int, generator: torch.Generator, *, start: int = 0
) -> list[int]:
    """Indices of `n` prompts drawn kind by kind: slots start .. start + n - 1 of
    `kind_schedule` with each kind's share of `kinds` (kinds in first-seen order), then a prompt
    of the slot's kind drawn uniformly with replacement; the n draws are returned shuffled.

    kinds: one label per prompt. generator: seeded by the caller, as for `sample_prompts`.
    With uniform draws (`sample_prompts`) the number of prompts of a kind in an epoch is binomial;
    here it is the kind's share of the epoch within one prompt, over every stretch of epochs.
    """
    if not kinds:
        raise SafediffError("cannot sample from an empty prompt list")
    members: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        members.setdefault(kind, []).append(i)
    shares = [(kind, float(len(idx))) for kind, idx in members.items()]
    picks: list[int] = []
    for kind in kind_schedule(shares, start, n):
        pool = members[kind]
        j = torch.randint(0, len(pool), (1,), generator=generator, device=generator.device)
        picks.append(pool[int(j.item())])
    order = torch.randperm(n, generator=generator, device=generator.device).tolist()
    return [picks[i] for i in order]
