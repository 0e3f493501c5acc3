"""The attack runner: one attack against one victim over a target set, judged, resumable.

Per target (in set order):

1. the attack runs with a CPU generator seeded `derive_seed(target.seed, "attack")`;
2. the victim samples k images of the adversarial prompt (or of the result's `prompt_embeds`,
   for embedding attacks), image i from a CPU generator seeded `derive_seed(target.seed,
   "image", i)`, with the victim's defense and sampler; they are saved as PNG;
3. the judge (never what the attack optimised) scores the saved, 8-bit images; its flag is the
   record's `value_key` (NudeNet's and the sandbox detector's "unsafe", Q16's "inappropriate").
   A judge that reads generation records (the sandbox detector) is told the target's concept
   as the family the prompt asks for;
4. the target's record is written atomically to out_dir/targets/<id>.json.

Layout of out_dir: targets/<id>.json (the key it was made with, the adversarial prompt, budget
spent, the judge's records, flags, success), targets/<id>.safetensors (prompt_embeds, embedding
attacks only), images/<id>_<i>.png, summary.json.

Resume: a target whose JSON exists and was made with the same key (attack and its config,
victim spec, sampler, protocol, judge, k, the target itself and the caller's `run_key`) is not
run again; one made with another key is an error unless `overwrite`. Every random draw derives
from the target's seed, so a resumed run writes what an uninterrupted one writes (timings
aside).

summary.json: the protocol's name, the judge's protocol, ASR with its Wilson interval (over
targets for "any of k", over images for "mean"), per-target success, budget spent (queries,
steps), seconds (the attacks' own, and this invocation's wall time), and for every boolean field
that all targets' `info` carry (SneakyPrompt's "skipped", "bypassed"), its rate over the targets
where it is not None (SneakyPrompt's bypass rate counts the targets that were not skipped).
"""

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from safediff.atomic import atomic_path, remove_orphans, write_text_atomic
from safediff.attacks.base import Attack, AttackResult, AttackTarget, Victim
from safediff.attacks.targets import AsrProtocol, safe_id
from safediff.errors import SafediffError
from safediff.eval.html import to_uint8
from safediff.eval.stats import rate
from safediff.sampling.sample import sample
from safediff.seeding import derive_seed, generator

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
TARGETS_DIR = "targets"
IMAGES_DIR = "images"
FORMAT = "safediff-attack-run/1"


def attack_config_dict(attack: Attack) -> dict[str, Any]:
    """The attack's config as JSON-able data ({} when it has none)."""
    cfg = getattr(attack, "config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return {}
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def target_key(
    victim: Victim,
    attack: Attack,
    target: AttackTarget,
    protocol: AsrProtocol,
    judge_protocol: str,
    run_key: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What a target's record depends on (a record made with another key is not reused)."""
    return {
        "attack": attack.name,
        "attack_config": attack_config_dict(attack),
        "victim": victim.spec,
        "sampler": victim.settings.to_dict(),
        "protocol": protocol.name,
        "judge": judge_protocol,
        "images": protocol.images_per_prompt,
        "target": dataclasses.asdict(target) | {"banned_words": list(target.banned_words)},
        "run": json.loads(json.dumps(dict(run_key or {}), default=str)),
    }


def run_attack(
    victim: Victim,
    attack: Attack,
    targets: Sequence[AttackTarget],
    judge: Any,
    out_dir: str | Path,
    protocol: AsrProtocol,
    *,
    run_key: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Attack every target, judge its images, write out_dir (see the module docstring).

    victim: what is attacked. attack: an `Attack`. targets: unique target ids. judge: a safety
    `Scorer` (score_images, value_key, protocol). protocol: k (images per adversarial prompt)
    and the ASR rule. run_key: what else identifies the run (model spec, device, ...), stored
    with each record. overwrite: redo targets whose record was made with another key.
    Returns the summary (also written to out_dir/summary.json).
    """
    if getattr(judge, "kind", "safety") != "safety" or not getattr(judge, "value_key", None):
        raise SafediffError(
            f"judge {getattr(judge, 'protocol', judge)!r} is not a safety scorer with a per-image "
            "flag; use nudenet, q16 or a plug-in's safety judge"
        )
    out = Path(out_dir)
    stems = [safe_id(t.target_id) for t in targets]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise SafediffError(f"target ids that name the same file: {', '.join(clash[:5])}")
    (out / TARGETS_DIR).mkdir(parents=True, exist_ok=True)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for folder in (out / TARGETS_DIR, out / IMAGES_DIR):
        remove_orphans(folder)
    start = time.perf_counter()
    records = []
    done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(targets), desc=f"attack {attack.name}", unit="target")
    for target, stem in zip(targets, stems, strict=True):
        key = target_key(victim, attack, target, protocol, judge.protocol, run_key)
        path = out / TARGETS_DIR / f"{stem}.json"
        record = _reusable(path, key, overwrite)
        if record is None:
            record = _attack_one(victim, attack, target, stem, judge, protocol, key, out)
            done += 1
        records.append(record)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = summarize(records, protocol, judge.protocol, attack, victim)
    summary["wall_seconds"] = time.perf_counter() - start
    summary["attacked_now"] = done
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _reusable(path: Path, key: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("%s is damaged; attacking its target again", path)
        return None
    if record.get("key") == key:
        images = path.parent.parent / IMAGES_DIR
        if all((images / name).is_file() for name in record.get("images", [])):
            return record
        logger.warning("%s: some of its images are missing; attacking its target again", path)
        return None
    if overwrite:
        return None
    differs = sorted(k for k in key if record.get("key", {}).get(k) != key[k])
    raise SafediffError(
        f"{path} was made with other settings ({', '.join(differs) or 'format'}); use another "
        "--out, or --overwrite to attack its targets again"
    )


def _attack_one(
    victim: Victim,
    attack: Attack,
    target: AttackTarget,
    stem: str,
    judge: Any,
    protocol: AsrProtocol,
    key: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = attack.run(victim, target, generator(derive_seed(target.seed, "attack")))
    if not isinstance(result, AttackResult) or result.target_id != target.target_id:
        raise SafediffError(
            f"attack {attack.name!r} returned a result for another target than {target.target_id!r}"
        )
    attack_seconds = time.perf_counter() - t0
    embeds = result.prompt_embeds
    k = protocol.images_per_prompt
    if embeds is not None:
        embeds = embeds.detach().to(torch.float32).cpu().contiguous()
        with atomic_path(out / TARGETS_DIR / f"{stem}.safetensors") as tmp:
            save_file({"prompt_embeds": embeds}, str(tmp))
        embeds = load_file(str(out / TARGETS_DIR / f"{stem}.safetensors"))["prompt_embeds"]
    pixels = generate_images(victim, result.adversarial_prompt, embeds, target.seed, k)
    names = []
    for i, array in enumerate(pixels.numpy()):
        name = f"{stem}_{i}.png"
        with atomic_path(out / IMAGES_DIR / name) as tmp:
            Image.fromarray(array, mode="RGB").save(tmp, format="PNG")
        names.append(name)
    judged = judge_images(judge, pixels, target)
    flags = [bool(r[judge.value_key]) for r in judged]
    record = {
        "format": FORMAT,
        "key": key,
        "target_id": target.target_id,
        "prompt": target.prompt,
        "concept": target.concept,
        "adversarial_prompt": result.adversarial_prompt,
        "prompt_embeds": f"{stem}.safetensors" if embeds is not None else None,
        "queries": int(result.queries),
        "steps": int(result.steps),
        "attack_seconds": float(result.seconds or attack_seconds),
        "loss": None if result.loss is None else float(result.loss),
        "info": json.loads(json.dumps(result.info, default=str)),
        "images": names,
        "judge_records": json.loads(json.dumps(judged, default=float)),
        "flags": flags,
        "success": protocol.target_success(flags),
        "seconds": time.perf_counter() - t0,
    }
    write_text_atomic(out / TARGETS_DIR / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    return record


def generate_images(
    victim: Victim, prompt: str, embeds: torch.Tensor | None, seed: int, k: int
) -> torch.Tensor:
    """k images [k, H, W, 3] uint8 of the victim for `prompt` (or `embeds` [1, L, D]), image i
    from a CPU generator seeded derive_seed(seed, "image", i)."""
    gens = [generator(derive_seed(seed, "image", i)) for i in range(k)]
    cond = None
    if embeds is not None:
        if embeds.dim() != 3 or embeds.shape[0] != 1:
            raise SafediffError(f"prompt_embeds must be [1, L, D], got {list(embeds.shape)}")
        cond = embeds.expand(k, -1, -1)
    with torch.no_grad():
        traj = sample(
            victim.model,
            [prompt] * k,
            gens,
            victim.settings,
            defense=victim.defense,
            prompt_embeds=cond,
        ).trajectory
    assert traj.images is not None
    return to_uint8(traj.images)


def judge_images(judge: Any, pixels: torch.Tensor, target: AttackTarget) -> list[dict[str, Any]]:
    """The judge's records for saved images [k, H, W, 3] uint8 (read as the PNGs are)."""
    images = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    prompts = [target.prompt] * len(images)
    if getattr(judge, "reads_generation_records", False):
        meta = json.dumps({"family": target.concept or None})
        gen_records = [{"name": target.target_id, "extra": {"metadata": meta}}] * len(images)
        try:
            return judge.score_images(images, prompts, records=gen_records)
        except ValueError as err:
            raise SafediffError(
                f"judge {judge.protocol!r} cannot judge concept {target.concept!r} of target "
                f"{target.target_id!r} ({err})"
            ) from None
    return judge.score_images(images, prompts)


def summarize(
    records: list[dict[str, Any]],
    protocol: AsrProtocol,
    judge_protocol: str,
    attack: Attack,
    victim: Victim,
) -> dict[str, Any]:
    """The run's summary from the target records alone (see the module docstring)."""
    flags = [r["flags"] for r in records]
    info_rates = {}
    keys = set.intersection(*(set(r["info"]) for r in records)) if records else set()
    for name in sorted(keys):
        values = [r["info"][name] for r in records]
        if all(isinstance(v, bool) or v is None for v in values):
            info_rates[name] = rate([v for v in values if v is not None]).to_dict()
    return {
        "format": FORMAT,
        "attack": attack.name,
        "attack_config": attack_config_dict(attack),
        "white_box": bool(getattr(attack, "white_box", False)),
        "victim": victim.spec,
        "sampler": victim.settings.to_dict(),
        "protocol": protocol.name,
        "protocol_source": protocol.source,
        "judge": judge_protocol,
        "images_per_target": protocol.images_per_prompt,
        "targets": len(records),
        "asr": protocol.asr(flags).to_dict(),
        "info_rates": info_rates,
        "queries": sum(r["queries"] for r in records),
        "steps": sum(r["steps"] for r in records),
        "attack_seconds": sum(r["attack_seconds"] for r in records),
        "per_target": [
            {
                "target_id": r["target_id"],
                "adversarial_prompt": r["adversarial_prompt"],
                "success": r["success"],
                "flags": r["flags"],
                "queries": r["queries"],
            }
            for r in records
        ],
    }


# ---------------------------------------------------------------------------------------------
# Reports (`safediff report` shows attack runs with these)


def is_attack_run(path: str | Path) -> bool:
    """Whether `path` is a folder written by `run_attack` (its summary.json says so)."""
    summary = Path(path) / SUMMARY_FILE
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def attack_report(
    run_dirs: Sequence[Path], names: Sequence[str], thumb: int = 96, max_rows: int = 48
) -> tuple[list[dict[str, Any]], str, list[str]]:
    """(report entries, Markdown, HTML parts) for attack run folders: per run a table (attack,
    victim, protocol, judge, ASR with its interval, budget, info rates) and a grid of targets:
    target prompt, adversarial prompt, its images with their judge flags, success."""
    from safediff.eval.html import e, file_thumbnail_png, html_table, md_table, png_data_uri

    entries, md, h = [], ["## attacks", ""], ["<h2>attacks</h2>"]
    for run_dir, name in zip(run_dirs, names, strict=True):
        s = json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))
        asr = s["asr"]
        interval = "-" if asr["lo"] is None else f"[{asr['lo']:.3f}, {asr['hi']:.3f}]"
        rates = "; ".join(
            f"{k} {r['value']:.3f} (n={r['n']})" for k, r in s["info_rates"].items() if r["n"]
        )
        header = ["run", "attack", "victim", "protocol", "judge", "targets", "ASR", "95% CI"]
        header += ["queries", "attack s", "rates"]
        value = "-" if asr["value"] is None else f"{asr['value']:.3f}"
        row = [name, s["attack"], s["victim"], s["protocol"], s["judge"], str(s["targets"])]
        row += [value, interval, str(s["queries"]), f"{s['attack_seconds']:.1f}", rates or "-"]
        cap = f"{name}: {s['protocol']}"
        md.append(md_table([*header], [row], cap))
        h.append(html_table(header, [row], cap))
        entries.append({"name": name, "path": str(run_dir), "summary": s})
        cells = [
            "<table class='grid'><thead><tr><th>target</th><th>adversarial prompt</th>"
            "<th>images (flag)</th><th>success</th></tr></thead><tbody>"
        ]
        for target in s["per_target"][:max_rows]:
            stem = safe_id(target["target_id"])
            rec = json.loads(
                (Path(run_dir) / TARGETS_DIR / f"{stem}.json").read_text(encoding="utf-8")
            )
            imgs = ""
            for image, flag in zip(rec["images"], rec["flags"], strict=True):
                png = file_thumbnail_png(Path(run_dir) / IMAGES_DIR / image, thumb)
                img = f"<img alt='{e(image)}' src='{png_data_uri(png)}'>" if png else "missing"
                imgs += f"{img}<span class='badge'>{'flagged' if flag else 'safe'}</span>"
            cells.append(
                f"<tr><td class='prompt'>{e(rec['prompt'])}<br>{e(rec['target_id'])}</td>"
                f"<td class='prompt'>{e(rec['adversarial_prompt'])}</td><td>{imgs}</td>"
                f"<td>{'yes' if rec['success'] else 'no'}</td></tr>"
            )
        cells.append("</tbody></table>")
        h.append("".join(cells))
        rows = [
            [t["target_id"], t["adversarial_prompt"], str(t["flags"]), str(t["success"])]
            for t in s["per_target"][:max_rows]
        ]
        md.append(md_table(["target", "adversarial prompt", "flags", "success"], rows))
    return entries, "\n".join(md), h
