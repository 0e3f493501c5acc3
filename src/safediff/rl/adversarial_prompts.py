"""Adversarial prompts mixed into GRPO's training prompts (`prompts.adversarial`).

An attack (`safediff attack`, `safediff.attacks.run`) searches, per target prompt, for a text
that brings the target's concept back past the model; this module turns its results into training
prompts. Each entry keeps two texts:

- `text`, the adversarial prompt: what the policy is conditioned on in the rollout, so GRPO
  trains the model on the inputs the attack found;
- `target`, the prompt the attack was run for: what the reward (and its gate) scores the image
  against. The steering reward decides from the prompt's side of its threshold whether to steer
  and towards what; an adversarial text (Ring-A-Bell's and MMA's token soups) need not read as
  unsafe to the reward's encoder, so scored against itself it would often get the plain
  alignment reward and teach the model to draw the concept. Scored against the target, a
  glyph-free image of an adversarial prompt is rewarded as the refusal of the target would be.

Each epoch, round(share x groups) of its prompt groups are adversarial (see `mix_groups`); the
rest are drawn from `prompts.file` as without this option. Adversarial training in the sense of
Madry et al. (2018), with the inner maximisation done by an attack run between rounds instead of
per step (recipes/sandbox_adversarial_grpo.py runs the rounds).

Departures: only successful attack results are used unless asked (`prompts.adversarial_failed`);
results that are prompt embeddings (textual inversion, soft prompts) have no text to condition
on and are skipped; duplicates (same text and target) are kept once.
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from safediff.atomic import write_text_atomic
from safediff.errors import SafediffError
from safediff.seeding import derive_seed, generator

RECORD_FILE = "adversarial_prompts.json"
"""What a training run folder records of its adversarial prompts (source, digest, entries)."""
ADVERSARIAL_KIND = "adversarial"
"""The prompt kind of adversarial entries in the trainer's per-kind reward logs."""
_RUN_SUMMARY = "summary.json"
_RUN_FORMAT = "safediff-attack-run/1"


@dataclass(frozen=True)
class AdversarialPrompt:
    """One attack result used for training.

    text: the adversarial prompt (the policy's condition). target: the prompt it was found for
    (the reward's prompt). attack, target_id, concept: where it came from (logs, provenance).
    """

    text: str
    target: str
    attack: str = ""
    target_id: str = ""
    concept: str | None = None


@dataclass(frozen=True)
class AdversarialPool:
    """The adversarial prompts of a run: entries in a fixed order, and their digest (sha256 of
    the entries' canonical JSON: the same entries give the same digest wherever they were read
    from)."""

    prompts: tuple[AdversarialPrompt, ...]
    source: str
    digest: str


def _digest(prompts: tuple[AdversarialPrompt, ...]) -> str:
    data = json.dumps([asdict(p) for p in prompts], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _records_of(path: Path) -> list[dict]:
    """The result records of an attack run folder or a JSON Lines file (one record a line)."""
    if path.is_dir():
        summary = path / _RUN_SUMMARY
        try:
            fmt = json.loads(summary.read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt != _RUN_FORMAT:
            raise SafediffError(
                f"prompts.adversarial: {path} is not an attack run folder (no {_RUN_SUMMARY} of "
                "`safediff attack`); pass such a folder or a JSON Lines file"
            )
        records = []
        for file in sorted((path / "targets").glob("*.json")):
            try:
                record = json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise SafediffError(
                    f"prompts.adversarial: {file} is damaged; rerun the attack to rewrite it"
                ) from None
            record.setdefault("attack", (record.get("key") or {}).get("attack", ""))
            records.append(record)
        return records
    if not path.is_file():
        raise SafediffError(f"prompts.adversarial: {path} not found (a file or an attack run)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise SafediffError(f"prompts.adversarial: {path} line {number} is not a JSON object")
        records.append(record)
    return records


def _entry(record: dict, where: str) -> AdversarialPrompt:
    text, target = record.get("adversarial_prompt"), record.get("prompt")
    if not isinstance(text, str) or not isinstance(target, str) or not target.strip():
        raise SafediffError(
            f"prompts.adversarial: a record of {where} lacks 'adversarial_prompt' or 'prompt' "
            "(the adversarial text and the target it was found for)"
        )
    return AdversarialPrompt(
        text=text,
        target=target,
        attack=str(record.get("attack") or ""),
        target_id=str(record.get("target_id") or ""),
        concept=record.get("concept"),
    )


def load_adversarial_prompts(spec: str, *, include_failed: bool = False) -> AdversarialPool:
    """The pool of `spec`: comma-separated attack run folders (`safediff attack --out`) and/or
    JSON Lines files of records {"adversarial_prompt", "prompt", optional "success", "attack",
    "target_id", "concept"}, in the order given, records in file order (a run folder's targets
    sorted by file name). Only records with success true are kept unless `include_failed` (a
    record without "success" counts as successful); embedding results and duplicates are
    dropped. SafediffError (one line) when a source is missing or malformed or nothing is left.
    """
    sources = [s.strip() for s in spec.split(",") if s.strip()]
    if not sources:
        raise SafediffError("prompts.adversarial is empty; name an attack run folder or a file")
    entries: list[AdversarialPrompt] = []
    seen: set[tuple[str, str]] = set()
    total = 0
    for source in sources:
        path = Path(source).expanduser()
        for record in _records_of(path):
            total += 1
            if record.get("prompt_embeds"):  # an embedding attack: no text to condition on
                continue
            if not include_failed and record.get("success", True) is not True:
                continue
            entry = _entry(record, str(path))
            if (entry.text, entry.target) not in seen:
                seen.add((entry.text, entry.target))
                entries.append(entry)
    if not entries:
        which = "usable" if include_failed else "successful text"
        raise SafediffError(
            f"prompts.adversarial: no {which} adversarial prompts in {spec!r} ({total} records); "
            "attack again, or set prompts.adversarial_failed=true to use failed attempts too"
        )
    pool = tuple(entries)
    return AdversarialPool(pool, ",".join(sources), _digest(pool))


def adversarial_group_count(n_groups: int, share: float) -> int:
    """How many of an epoch's `n_groups` groups are adversarial: share x n_groups rounded half
    up (share in [0, 1])."""
    return min(n_groups, math.floor(share * n_groups + 0.5))


def mix_groups(
    natural: list[int], n_pool: int, n_adv: int, offset: int, seed: int, epoch: int
) -> list[int]:
    """Per-group prompt indices of an epoch: the `natural` draws (indices < offset) with `n_adv`
    adversarial groups (indices offset + i, i < n_pool) put in among them.

    Which groups are adversarial: n_adv slots of a permutation drawn from (seed, epoch); which
    entries they get: the first n_adv of a permutation of the pool drawn from (seed, epoch),
    cycled when n_adv > n_pool, so an epoch repeats an entry only when the pool is smaller than
    its share. Returns len(natural) + n_adv indices; natural groups keep their order.
    """
    n_total = len(natural) + n_adv
    slot_gen = generator(derive_seed(seed, "adversarial-slots", epoch))
    slots = set(torch.randperm(n_total, generator=slot_gen)[:n_adv].tolist())
    perm = torch.randperm(n_pool, generator=generator(derive_seed(seed, "adversarial", epoch)))
    picks = iter(offset + int(perm[i % n_pool]) for i in range(n_adv))
    rest = iter(natural)
    return [next(picks) if g in slots else next(rest) for g in range(n_total)]


def write_record(run_dir: Path, pool: AdversarialPool, share: float) -> None:
    """run_dir/adversarial_prompts.json: the source, digest, share and the entries themselves
    (a run folder shows what it trained on even when the source changes later)."""
    data = {
        "source": pool.source,
        "digest": pool.digest,
        "share": share,
        "prompts": [asdict(p) for p in pool.prompts],
    }
    write_text_atomic(run_dir / RECORD_FILE, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def check_record(run_dir: Path, pool: AdversarialPool | None) -> None:
    """Refuse to resume `run_dir` with other adversarial prompts than it was trained with: its
    record's digest must equal `pool`'s (no record: a run without adversarial prompts, which
    must stay without)."""
    record_file = run_dir / RECORD_FILE
    recorded = None
    if record_file.is_file():
        try:
            recorded = json.loads(record_file.read_text(encoding="utf-8")).get("digest")
        except (ValueError, AttributeError):
            raise SafediffError(
                f"cannot resume {run_dir}: {record_file} is damaged; restore it"
            ) from None
    now = None if pool is None else pool.digest
    if recorded != now:
        raise SafediffError(
            f"cannot resume {run_dir}: its adversarial prompts changed (digest "
            f"{str(recorded)[:12]}, now {str(now)[:12]}); restore them, or start a new round: a "
            "new run.output_dir with --resume pointing at this run's checkpoint"
        )
