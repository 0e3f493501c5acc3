"""Adversarial GRPO on the sandbox: attack the model on training targets, train on what worked.

    python recipes/sandbox_adversarial_grpo.py --out runs/adv-grpo [--start-run DEMO/train]
        [--smoke] [--rounds R] [--epochs-per-round E] [--threads N] [--device cpu]

Round r (recipes/sandbox_adversarial_grpo.yaml holds the settings):

1. the current model (round r-1's run; round 0: --start-run's final model, else the shipped
   base model) is attacked with each attack of the recipe (`safediff.attacks.run.run_attack`)
   on the r-th slice of the training targets: explicit prompts of the sandbox's GRPO train split
   that are not evaluation targets, per_family of each family, judged by the sandbox detector;
2. GRPO continues from the previous round's newest checkpoint (round 0: --start-run's, else a
   fresh run of the `sandbox-demo` preset) for epochs_per_round epochs, the start run's config
   otherwise unchanged, with the adversarial prompts of rounds 0..r mixed in
   (`prompts.adversarial`; each sample's reward scored against its target prompt) and the start
   run's merge weight (its merged/merge.json, else its run.merge_weight).

Resumable: attack runs skip finished targets, a round's GRPO run resumes from its own newest
checkpoint and a finished round is not trained again. Writes OUT/round-<r>/attacks/<attack>/,
OUT/round-<r>/train/ (the round's GRPO run; the last one is the adversarially trained model, for
`recipes/sandbox_robustness.py --run grpo-adv=DIR`) and OUT/rounds.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from safediff.errors import SafediffError

RECIPE = Path(__file__).with_suffix(".yaml")
TRAIN_SPLIT = "sandbox:grpo_train"
TRAIN_ATTACK_SEED = 4243  # not the evaluation targets' ATTACK_SEED: other searches, other images


def load_recipe(path: str | Path = RECIPE) -> dict[str, Any]:
    """The recipe file: {"attacks": {...}, "full": {...}, "smoke": {...}}."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    missing = [k for k in ("attacks", "full", "smoke") if k not in data]
    if missing:
        raise SafediffError(f"{path}: missing top-level key(s) {missing}")
    for mode in ("full", "smoke"):
        need = {"rounds", "epochs_per_round", "share", "per_family", "images_per_target"}
        lacking = sorted(need - set(data[mode] or {}))
        if lacking:
            raise SafediffError(f"{path}: {mode} lacks {lacking}")
    return data


def training_targets(per_family: int, round_index: int) -> list[Any]:
    """Round `round_index`'s attack targets: of each family, the explicit prompts of the GRPO
    train split (split order, duplicates once) that no evaluation target has, slice
    [r * per_family, (r + 1) * per_family); banned words as in the evaluation set."""
    from safediff.attacks.base import AttackTarget
    from safediff.attacks.targets import load_targets
    from safediff.prompts import load_prompt_labels
    from safediff.sandbox.attack_targets import banned_words
    from safediff.seeding import derive_seed

    evaluation = {t.prompt for t in load_targets("sandbox").targets}
    prompts, kinds, families = load_prompt_labels(TRAIN_SPLIT)
    by_family: dict[str, list[str]] = {}
    for prompt, kind, family in zip(prompts, kinds, families, strict=True):
        if kind == "explicit" and family and prompt not in evaluation:
            chosen = by_family.setdefault(family, [])
            if prompt not in chosen:
                chosen.append(prompt)
    targets = []
    lo, hi = round_index * per_family, (round_index + 1) * per_family
    for family, chosen in by_family.items():
        for prompt in chosen[lo:hi]:
            tid = f"train-{family}-" + prompt.replace(" ", "_").replace("'", "")
            seed = derive_seed(TRAIN_ATTACK_SEED, tid)
            targets.append(AttackTarget(tid, prompt, family, banned_words(family), seed))
    if not targets:
        raise SafediffError(f"no training targets left for round {round_index}; use fewer rounds")
    return targets


def merge_weight_of(run_dir: Path | None, cfg: Any) -> float:
    """The start run's chosen merge weight (merged/merge.json), else its config's."""
    if run_dir is not None and (run_dir / "merged" / "merge.json").is_file():
        info = json.loads((run_dir / "merged" / "merge.json").read_text(encoding="utf-8"))
        return float(info["merge_weight"])
    return float(cfg.run.merge_weight)


def attack_round(
    model_spec: str | None,
    recipe: dict[str, Any],
    mode: str,
    targets: list[Any],
    out: Path,
    settings: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every attack of the recipe against `model_spec` (None: the base model) on `targets`;
    {attack: summary}."""
    from safediff.attacks.base import Victim
    from safediff.attacks.cli import build_judge
    from safediff.attacks.registry import build_attack
    from safediff.attacks.run import run_attack
    from safediff.models.loading import load_t2i_model
    from safediff.sampling.sample import SamplerSettings
    from safediff.sandbox.attack_targets import PROTOCOL
    from safediff.sandbox.defense_eval import demo_sampling, resolve_model

    protocol = PROTOCOL.with_overrides(None, settings["images_per_target"])
    judge = build_judge(protocol.judge, protocol.threshold, args.device)
    s = demo_sampling()
    sampler = SamplerSettings(int(s["num_steps"]), float(s["eta"]), float(s["guidance_scale"]), "")
    model = load_t2i_model(resolve_model(model_spec), device=args.device)
    victim = Victim(model, {}, sampler, base=model, spec="none")
    summaries = {}
    for name, entry in recipe["attacks"].items():
        options = dict((entry or {}).get("options") or {})
        if mode == "smoke":
            options.update((entry or {}).get("smoke") or {})
        attack = build_attack(name, {k: str(v) for k, v in options.items()})
        summaries[name] = run_attack(
            victim, attack, targets, judge, out / name, protocol,
            run_key={"model": model_spec, "recipe": "adversarial-grpo"},
            progress=not args.no_progress,
        )  # fmt: skip
        print(
            f"{out.parent.name} {name}: ASR {summaries[name]['asr']['value']:.3f}", file=sys.stderr
        )
    return summaries


def train_round(
    preset: str, round_dir: Path, resume_from: Path | None, epochs: int, overrides: list[str]
) -> Path:
    """GRPO of one round into round_dir/train (config: `preset` <- `overrides`): resumes its own
    newest checkpoint, else starts from `resume_from` (None: a fresh run); a finished round is
    left as it is."""
    from safediff.config import load_config
    from safediff.rl import checkpoint as ckpt
    from safediff.rl.trainer import train

    run_dir = round_dir / "train"
    found = ckpt.list_checkpoints(run_dir)
    if found and int(found[-1].name.rsplit("-", 1)[1]) >= epochs and (run_dir / "merged").is_dir():
        return run_dir
    where = [f"run.output_dir={run_dir}", f"run.epochs={epochs}"]
    cfg = load_config(preset, [*overrides, *where])
    resume = "auto" if found else (str(resume_from) if resume_from is not None else None)
    train(cfg, resume=resume)
    return run_dir


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round (attack, then train); returns rounds.json's content."""
    from safediff.config import load_config
    from safediff.rl import checkpoint as ckpt

    recipe = load_recipe(args.recipe)
    mode = "smoke" if args.smoke else "full"
    settings = dict(recipe[mode])
    rounds = args.rounds or int(settings["rounds"])
    per_round = args.epochs_per_round or int(settings["epochs_per_round"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = Path(args.start_run).resolve() if args.start_run else None
    if start is not None:
        if not (start / "config.yaml").is_file() or not ckpt.list_checkpoints(start):
            raise SafediffError(f"--start-run {start} is not a GRPO run folder with a checkpoint")
        preset = str(start / "config.yaml")
        resume_from: Path | None = ckpt.list_checkpoints(start)[-1]
        start_epoch = int(resume_from.name.rsplit("-", 1)[1])
    else:
        preset = "sandbox-demo"
        resume_from, start_epoch = None, 0
    weight = merge_weight_of(start, load_config(preset))
    model_spec = str(start) if start is not None else None
    sources: list[str] = []
    record: dict[str, Any] = {"mode": mode, "start_run": model_spec, "merge_weight": weight}
    record["rounds"] = []
    for r in range(rounds):
        round_dir = out / f"round-{r}"
        t0 = time.perf_counter()
        targets = training_targets(int(settings["per_family"]), r)
        summaries = attack_round(
            model_spec, recipe, mode, targets, round_dir / "attacks", settings, args
        )
        sources += [str(round_dir / "attacks" / name) for name in summaries]
        overrides = [
            *(settings.get("overrides") or []),
            f"prompts.adversarial={','.join(sources)}",
            f"prompts.adversarial_share={settings['share']}",
            f"prompts.adversarial_failed={str(bool(settings.get('use_failed'))).lower()}",
            f"run.merge_weight={weight}",
            f"run.save_every={per_round}",
            "run.log_with=none",
        ]
        epochs = start_epoch + (r + 1) * per_round
        run_dir = train_round(preset, round_dir, resume_from, epochs, overrides)
        resume_from = ckpt.list_checkpoints(run_dir)[-1]
        model_spec = str(run_dir)
        adversarial = json.loads((run_dir / "adversarial_prompts.json").read_text("utf-8"))
        record["rounds"].append(
            {
                "round": r,
                "targets": [t.target_id for t in targets],
                "attack_asr": {n: s["asr"] for n, s in summaries.items()},
                "adversarial_prompts": len(adversarial["prompts"]),
                "epochs": [epochs - per_round, epochs],
                "run": str(run_dir),
                "seconds": time.perf_counter() - t0,
            }
        )
        (out / "rounds.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    record["final_run"] = model_spec
    (out / "rounds.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--start-run", help="a `safediff train` run folder to continue (the demo's)")
    p.add_argument("--smoke", action="store_true", help="the CI smoke run (tiny budgets)")
    p.add_argument("--rounds", type=int, help="rounds (default: the mode's)")
    p.add_argument("--epochs-per-round", type=int, help="GRPO epochs per round (default: mode's)")
    p.add_argument("--recipe", default=str(RECIPE), help="the recipe file (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = run(args)
    except SafediffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in data.items() if k != "rounds"}, indent=1))
    for entry in data["rounds"]:
        asr = ", ".join(f"{n} {a['value']:.2f}" for n, a in entry["attack_asr"].items())
        print(f"round {entry['round']}: ASR on training targets {asr}; "
              f"{entry['adversarial_prompts']} adversarial prompts; epochs {entry['epochs']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
