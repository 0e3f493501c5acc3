"""`safediff demo` on the sandbox: GRPO with the steering reward, then base vs post-trained.

1. Load the shipped base model (`sandbox`), the sandbox's judges (detector, reader, CLIP) and the
   steering reward of the `sandbox-demo` preset.
2. Generate the evaluation images of the base model: prompts of the "eval" split (explicit unsafe
   prompts per family, the held-out family included; implicit, synonym, keyword-minimal and
   negation prompts; benign prompts per utility task), one fixed seed per prompt.
3. GRPO on the "grpo_train" split (safe and unsafe captions mixed) with the steering reward.
4. The merge weight: the post-trained model is base + w * (trained - base), with w chosen on
   validation prompts of the "grpo_train" split (`safediff.sandbox.merge_select`: the smallest
   of MERGE_CANDIDATES that cuts the validation unsafe rate by MERGE_TARGET_CUT within
   MERGE_UTILITY_MARGIN of the base's utility), written to `train/merged/`. The quick mode,
   or a `run.merge_weight=W` override, uses a fixed weight instead (the quick mode: 1). The
   search samples in bfloat16 where the CPU computes it natively (it only ranks weights against
   the base sampled alike); the evaluation of step 5 in float32 unless told otherwise.
5. The evaluation prompts and seeds through the post-trained model; score both, print the table
   with 95% intervals and paired deltas, write `report.html` (tables, training curves, image
   grids) and `summary.json`.

Everything is written under `output_dir`; the training run (config.yaml, metrics.jsonl,
checkpoint, merged/) is its `train/` folder and resumes when the demo is run again on the same
folder (the validation images of step 4 are kept under `validation/` and reused).
"""

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from safediff.atomic import remove_orphans, write_text_atomic
from safediff.config import load_config, parse_override, to_dict
from safediff.errors import SafediffError
from safediff.sandbox.image_cache import cached_images, image_key
from safediff.sandbox.protocol import EVAL_SEED, EVAL_SIZES, PRESET

logger = logging.getLogger(__name__)

# Half the preset's epochs and K = 4 instead of 16 (the quick mode must finish within 3 minutes on
# 2 CPU cores): it shows the direction, not the full run's size or its robustness to the seed.
# No weight interpolation: the short run's smaller change would be diluted (docs/results/sandbox-demo.md, "The quick mode").
QUICK_OVERRIDES = [
    "run.epochs=4",
    "run.save_every=4",
    "grpo.group_size=4",
    "grpo.samples_per_process=32",
    "grpo.grad_accum=2",
    "run.merge_weight=1.0",
]
# The merge weight of the full demo, chosen on validation prompts (merge_select): the smallest
# candidate whose validation unsafe rate is down by MERGE_TARGET_CUT (relative) without costing
# more than MERGE_UTILITY_MARGIN of utility, else the largest within the margin. The prompts
# come from "grpo_train", never "eval": benign prompts per utility task, explicit prompts per
# trained family. The target sits above the demo's 70% target because the evaluation's prompts
# (eval-only phrases, other seeds) are not the validation's.
MERGE_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MERGE_TARGET_CUT = 0.8
MERGE_UTILITY_MARGIN = 0.03
VALIDATION_SIZES = {"n_safe_per_task": 48, "n_unsafe_per_family": 32}
VALIDATION_SEED = 4049


def run_sandbox_demo(
    output_dir: str | Path,
    quick: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
    base_images_cache: str | Path | None = None,
    preset: str = PRESET,
    defenses: str | None = None,
    merge_weights: Sequence[float] | Literal["auto"] | None = "auto",
    eval_precision: str = "float32",
    search_precision: str = "auto",
) -> dict[str, Any]:
    """Run the demo; returns {"before", "after", "deltas", "table", "history", "report", ...}.

    base_images_cache: where the base model's evaluation images are kept (default
    `output_dir/base_images.safetensors`); reused when written for the same model, prompts and
    sampling settings, so a rerun, or a sweep sharing one cache file, samples the base once.
    preset: the training config (a preset name or a YAML path; default `sandbox-demo`).
    defenses: a defense stack applied to the post-trained model at evaluation, so the table
        compares the undefended base model with GRPO + the stack; bare kinds ("des,negprompt")
        are the sandbox's versions (`defense_eval.sandbox_defense_stack`, prepared under
        `output_dir/defenses/`), KIND:ARG items are used as given.
    merge_weights: the merge weights to choose from on validation prompts (step 4 of the module
        docstring); "auto": MERGE_CANDIDATES in the full mode, none in the quick mode or when
        `overrides` set run.merge_weight; None: none, the config's run.merge_weight is used.
    eval_precision: the UNet's precision when sampling the evaluation images, base and
        post-trained alike: 'float32' (default), 'bfloat16', or 'auto' (bfloat16 on a CPU with
        native bf16, float32 elsewhere; `safediff.sampling.precision`).
    search_precision: the same for the merge-weight search's validation images: 'auto' by
        default, since the search only ranks weights against the base sampled the same way (about
        2x faster on a CPU with native bf16). Training's rollouts are always float32.
    """
    from safediff.defenses.stack import apply_defenses
    from safediff.eval.html import json_default
    from safediff.eval.score import read_jsonl
    from safediff.models.loading import load_t2i_model
    from safediff.rewards.registry import build_reward
    from safediff.rl.trainer import train
    from safediff.sampling.precision import resolve_unet_dtype
    from safediff.sandbox.clip import load_sandbox_clip
    from safediff.sandbox.defense_eval import sandbox_defense_stack
    from safediff.sandbox.demo_eval import (
        compare,
        demo_eval_prompts,
        format_table,
        generate_images,
        reference_embeddings,
        score_images,
        summarize,
    )
    from safediff.sandbox.demo_report import write_report
    from safediff.sandbox.detector import load_detector
    from safediff.sandbox.reader import load_reader

    t_start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "validation"):
        remove_orphans(folder)  # `.NAME.tmp-PID` of a killed run's cached images or summary
    mode = "quick" if quick else "full"
    candidates = merge_candidates(merge_weights, quick, overrides or [])
    cfg = load_config(
        preset,
        [f"run.output_dir={out / 'train'}"]
        + (QUICK_OVERRIDES if quick else [])
        + list(overrides or [])
        # the trainer keeps the trained weights; the weight is chosen after training
        + (["run.merge_weight=1.0"] if candidates else []),
    )
    device = torch.device("cpu")
    unet_dtype = resolve_unet_dtype(eval_precision, device)
    search_dtype = resolve_unet_dtype(search_precision, device)
    stack = sandbox_defense_stack(defenses, out, device=device, progress=progress)
    reward = build_reward(cfg.reward, device=device)
    detector, reader = load_detector(device=device), load_reader(device=device)
    clip = load_sandbox_clip(None, device=device)
    examples = demo_eval_prompts(**EVAL_SIZES[mode], seed=EVAL_SEED)
    sampling = {
        "seed": EVAL_SEED,
        "num_steps": cfg.sampling.num_steps,
        "guidance_scale": cfg.sampling.guidance_scale,
        "eta": cfg.sampling.eta,
        "batch_size": max(cfg.sampling.rollout_batch_size, 64),
        "progress": progress,
        "unet_dtype": unet_dtype,
    }
    search_sampling = {**sampling, "unet_dtype": search_dtype}

    base = load_t2i_model(cfg.model, device=device)
    logger.info("evaluating the base model on %d prompts", len(examples))
    # keyed by the weights, not the path: a retrained file at the same path is a new model
    key = image_key(base, [e.caption for e in examples], sampling)
    images_before = cached_images(
        Path(base_images_cache or out / "base_images.safetensors"),
        key,
        lambda: generate_images(base, examples, **sampling),
    )

    summary = train(
        cfg, resume="auto", model=load_t2i_model(cfg.model, device=device), reward=reward
    )
    selection = None
    final_unet = summary["final_unet"]
    if candidates:
        final_unet, selection = select_merge_weight(
            base, summary, candidates, out, search_sampling, (detector, reader, clip)
        )
    trained = dataclasses.replace(base, unet=final_unet.eval())
    trained, defense_kwargs = apply_defenses(trained, stack, device=device)
    logger.info("evaluating the post-trained model%s", f" with {stack}" if stack else "")
    images_after = generate_images(trained, examples, rollout_kwargs=defense_kwargs, **sampling)

    scored_before = score_images(images_before, examples, detector, reader, clip)
    scored_after = score_images(images_after, examples, detector, reader, clip)
    ref = reference_embeddings(examples, clip, EVAL_SEED)
    before = summarize(scored_before, examples, clip, seed=EVAL_SEED, reference=ref)
    after = summarize(scored_after, examples, clip, seed=EVAL_SEED, reference=ref)
    deltas = compare(before, after, scored_before, scored_after, seed=EVAL_SEED, reference=ref)
    table = format_table(before, after, deltas)
    # every epoch of the run, resumed ones too: the trainer's metrics.jsonl, not this call's
    # history (which holds only the epochs trained since the last resume)
    metrics = Path(summary["run_dir"]) / "metrics.jsonl"
    history = read_jsonl(metrics) if metrics.is_file() else []
    elapsed = time.perf_counter() - t_start
    merge_weight = selection["merge_weight"] if selection else cfg.run.merge_weight
    title = (
        f"safediff sandbox demo ({mode}): GRPO + steering reward, {cfg.run.epochs} epochs x "
        f"{cfg.grpo.samples_per_process} samples, alpha {cfg.reward.params.get('alpha')}"
        + (f"; weights merged with the base at {merge_weight:g}" if merge_weight != 1.0 else "")
        + (" (chosen on validation prompts)" if selection else "")
        + (f"; after = GRPO + defenses {defenses}" if stack else "")
        + (f"; evaluation sampled with the UNet in {unet_dtype}" if unet_dtype != "float32" else "")
    )
    report = write_report(
        out / "report.html",
        before=before,
        after=after,
        deltas=deltas,
        images_before=images_before,
        images_after=images_after,
        examples=examples,
        history=history,
        config_text=yaml.safe_dump(to_dict(cfg), sort_keys=False),
        title=title,
        extra={
            "wall time (s)": round(elapsed, 1),
            "evaluation prompts": len(examples),
            "evaluation UNet precision": unet_dtype,
            **({"validation UNet precision": search_dtype} if selection else {}),
            **({"merge weight": describe_selection(selection)} if selection else {}),
        },
        records_before=scored_before.records,
        records_after=scored_after.records,
    )
    result = {
        "mode": mode,
        "defenses": stack,
        "before": before,
        "after": after,
        "deltas": deltas,
        "history": history,
        "wall_s": elapsed,
        "n_eval_prompts": len(examples),
        "eval_unet_dtype": unet_dtype,
        "search_unet_dtype": search_dtype if selection else None,
        "merge_weight": merge_weight,
        "merge_selection": selection,
    }
    # atomic: a summary.json on disk marks a finished run (recipes/sandbox_ablations.py skips it)
    write_text_atomic(out / "summary.json", json.dumps(result, indent=2, default=json_default))
    print()
    print(title)
    rewards = " ".join(f"{m['reward_mean/all']:.3f}" for m in history)
    print(f"training reward per epoch: {rewards or '(none)'}")
    if selection:
        print(selection["table"])
    print(table)
    print(f"report: {report}   summary: {out / 'summary.json'}   wall time {elapsed:.0f} s")
    return {**result, "table": table, "report": str(report)}


def parse_merge_weights(text: str) -> list[float] | Literal["auto"] | None:
    """The command line's --merge-weights: "auto", "none" or comma-separated weights."""
    if text.strip() in ("auto", "none"):
        return None if text.strip() == "none" else "auto"
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise SafediffError(
            f"--merge-weights: 'auto', 'none' or comma-separated numbers, got {text!r}"
        ) from None


def merge_candidates(
    merge_weights: Sequence[float] | Literal["auto"] | None, quick: bool, overrides: Sequence[str]
) -> tuple[float, ...]:
    """The merge weights the demo chooses from (empty: none, the config's weight is used)."""
    if merge_weights is None:
        return ()
    if isinstance(merge_weights, str):
        if merge_weights != "auto":
            raise SafediffError(f"merge_weights: 'auto', None or weights, got {merge_weights!r}")
        fixed = quick or any(parse_override(o)[0] == ["run", "merge_weight"] for o in overrides)
        return () if fixed else MERGE_CANDIDATES
    return tuple(float(w) for w in merge_weights)


def select_merge_weight(
    base,
    summary: dict[str, Any],
    candidates: Sequence[float],
    out: Path,
    sampling: dict[str, Any],
    judges: tuple[Any, Any, Any],
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(final UNet, selection record): the merge weight of the trained UNet in `summary` (what
    `train` returned, trained with run.merge_weight 1) chosen on validation prompts by
    `merge_select.choose_merge_weight`; the merged model is written to `train/merged/` with the
    search in its merge.json. Validation images are cached under `out/validation/`."""
    from safediff.models.interpolate import interpolated_copy
    from safediff.rl.trainer import save_merged
    from safediff.sandbox.demo_eval import (
        demo_validation_prompts,
        generate_images,
        score_images,
    )
    from safediff.sandbox.merge_select import (
        choose_merge_weight,
        format_trials,
        validation_scores,
    )

    detector, reader, clip = judges
    examples = demo_validation_prompts(**VALIDATION_SIZES, seed=VALIDATION_SEED)
    val_sampling = {**sampling, "seed": VALIDATION_SEED}
    folder = out / "validation"

    def scores_of(unet: torch.nn.Module, name: str) -> tuple[float, float]:
        model = dataclasses.replace(base, unet=unet)
        images = cached_images(
            folder / f"{name}.safetensors",
            image_key(model, [e.caption for e in examples], val_sampling),
            lambda: generate_images(model, examples, **val_sampling),
        )
        return validation_scores(score_images(images, examples, detector, reader, clip).records)

    logger.info("choosing the merge weight on %d validation prompts", len(examples))
    base_scores = scores_of(base.unet, "base")
    trained = summary["trainer"].plain_trained_unet()
    base_state = base.unet.state_dict()

    def score(w: float) -> tuple[float, float]:
        return scores_of(interpolated_copy(base_state, trained, w), f"merge-{w:g}")

    chosen, trials = choose_merge_weight(
        candidates, score, base_scores, MERGE_TARGET_CUT, MERGE_UTILITY_MARGIN
    )
    record = {
        "merge_weight": chosen,
        "candidates": list(candidates),
        "target_cut": MERGE_TARGET_CUT,
        "utility_margin": MERGE_UTILITY_MARGIN,
        "n_validation_prompts": len(examples),
        "validation_seed": VALIDATION_SEED,
        "validation_unet_dtype": val_sampling.get("unet_dtype") or "float32",
        "base": {"unsafe_rate": base_scores[0], "utility": base_scores[1]},
        "trials": [t.as_dict() for t in trials],
    }
    final = interpolated_copy(base_state, trained, chosen)  # not kept per trial: one UNet each
    run_dir = Path(summary["run_dir"])
    save_merged(
        run_dir, final, chosen, summary["end_epoch"],
        info={"chosen_on": "validation prompts (grpo_train split)", **record},
    )  # fmt: skip
    logger.info("merge weight %g chosen; saved the merged model to %s", chosen, run_dir / "merged")
    return final, {**record, "table": format_trials(trials, chosen, base_scores)}


def describe_selection(selection: dict[str, Any]) -> str:
    """One line for the report: the chosen weight and every weight tried."""
    tried = ", ".join(
        f"{t['weight']:g} (unsafe {100 * t['unsafe_rate']:.0f}%, utility "
        f"{100 * t['utility_delta']:+.1f})"
        for t in selection["trials"]
    )
    return (
        f"{selection['merge_weight']:g}, chosen on {selection['n_validation_prompts']} "
        f"validation prompts (base: unsafe {100 * selection['base']['unsafe_rate']:.0f}%); "
        f"tried {tried}"
    )
