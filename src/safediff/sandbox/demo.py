"""`safediff demo` on the sandbox: GRPO with the steering reward, then base vs post-trained.

1. Load the shipped base model (`sandbox`), the sandbox's judges (detector, reader, CLIP) and the
   steering reward of the `sandbox-demo` preset.
2. Generate the evaluation images of the base model: prompts of the "eval" split (explicit unsafe
   prompts per family, the held-out family included; implicit, synonym, keyword-minimal and
   negation prompts; benign prompts per utility task), one fixed seed per prompt.
3. GRPO on the "grpo_train" split (safe and unsafe captions mixed) with the steering reward.
4. The same prompts and seeds through the post-trained model; score both, print the table with
   95% intervals and paired deltas, write `report.html` (tables, training curves, image grids) and
   `summary.json`.

Everything is written under `output_dir`; the training run (config.yaml, metrics.jsonl,
checkpoint) is its `train/` folder and resumes when the demo is run again on the same folder.
"""

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from safediff.atomic import atomic_path, write_text_atomic
from safediff.config import load_config, to_dict

logger = logging.getLogger(__name__)

PRESET = "sandbox-demo"
EVAL_SEED = 2024

EVAL_SIZES = {
    # prompts per utility task, explicit prompts per family, prompts per other kind
    "full": {"n_safe_per_task": 40, "n_unsafe_per_family": 50, "n_other_per_kind": 40},
    "quick": {"n_safe_per_task": 8, "n_unsafe_per_family": 16, "n_other_per_kind": 8},
}
# Half the preset's epochs and K = 4 instead of 16 (the quick mode must finish within 3 minutes on
# 2 CPU cores): it shows the direction, not the full run's size or its robustness to the seed.
# No weight interpolation: the short run's smaller change would be diluted (README, quick mode).
QUICK_OVERRIDES = [
    "run.epochs=4",
    "run.save_every=4",
    "grpo.group_size=4",
    "grpo.samples_per_process=32",
    "grpo.grad_accum=2",
    "run.merge_weight=1.0",
]


def cached_images(
    path: Path, key: dict[str, Any], make: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Images [N, 3, 32, 32] from `path` when it was written for the same `key`, else `make()`
    (then saved there, atomically). The key (model source, prompts, sampling) is stored as JSON in
    the safetensors metadata."""
    from safetensors.torch import load_file, safe_open, save_file

    text = json.dumps(key, sort_keys=True)
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") == text:
                return load_file(str(path))["images"]
    images = make()
    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous()}, str(tmp), metadata={"key": text})
    return images


def run_sandbox_demo(
    output_dir: str | Path,
    quick: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
    base_images_cache: str | Path | None = None,
    preset: str = PRESET,
    defenses: str | None = None,
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
    """
    from safediff.defenses.stack import apply_defenses
    from safediff.models.digest import module_digest
    from safediff.models.loading import load_t2i_model
    from safediff.rewards.registry import build_reward
    from safediff.rl.trainer import train
    from safediff.sandbox.clip import load_sandbox_clip
    from safediff.sandbox.defense_eval import sandbox_defense_stack
    from safediff.sandbox.demo_eval import (
        compare,
        demo_eval_prompts,
        format_table,
        generate_images,
        json_default,
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
    mode = "quick" if quick else "full"
    cfg = load_config(
        preset,
        [f"run.output_dir={out / 'train'}"]
        + (QUICK_OVERRIDES if quick else [])
        + list(overrides or []),
    )
    device = torch.device("cpu")
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
    }

    base = load_t2i_model(cfg.model, device=device)
    logger.info("evaluating the base model on %d prompts", len(examples))
    key = {
        "model": base.source,
        "unet": module_digest(base.unet),  # a retrained file at the same path is a new model
        "captions": [e.caption for e in examples],
        **{k: v for k, v in sampling.items() if k != "progress"},
    }
    images_before = cached_images(
        Path(base_images_cache or out / "base_images.safetensors"),
        key,
        lambda: generate_images(base, examples, **sampling),
    )

    summary = train(
        cfg, resume="auto", model=load_t2i_model(cfg.model, device=device), reward=reward
    )
    trained = dataclasses.replace(base, unet=summary["final_unet"].eval())
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
    history = summary["history"]
    elapsed = time.perf_counter() - t_start
    title = (
        f"safediff sandbox demo ({mode}): GRPO + steering reward, {cfg.run.epochs} epochs x "
        f"{cfg.grpo.samples_per_process} samples, alpha {cfg.reward.params.get('alpha')}"
        + (
            f"; weights merged with the base at {cfg.run.merge_weight:g}"
            if cfg.run.merge_weight != 1.0
            else ""
        )
        + (f"; after = GRPO + defenses {defenses}" if stack else "")
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
        extra={"wall time (s)": round(elapsed, 1), "evaluation prompts": len(examples)},
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
    }
    # atomic: a summary.json on disk marks a finished run (scripts/sandbox_ablations.py skips it)
    write_text_atomic(out / "summary.json", json.dumps(result, indent=2, default=json_default))
    print()
    print(title)
    rewards = " ".join(f"{m['reward_mean/all']:.3f}" for m in history)
    print(
        f"training reward per epoch: {rewards or '(none: the run in train/ was already complete)'}"
    )
    print(table)
    print(f"report: {report}   summary: {out / 'summary.json'}   wall time {elapsed:.0f} s")
    return {**result, "table": table, "report": str(report)}
