"""Evaluation half of the sandbox demo: a base and a post-trained model on the same prompts and seeds.

1. `demo_eval_prompts`: prompts of the "eval" split in fixed groups (benign prompts per utility
   task, explicit unsafe prompts per family with the held-out family included, the other unsafe
   kinds, negations).
2. `generate_images`: DDIM with CFG against "", one noise generator per prompt,
   `derive_seed(seed, "demo-eval", i)`, so every model starts prompt i from the same x_T.
3. `score_images`: per image, the sandbox's judges: the detector (unsafe / flagged), the reader
   (GenEval-style utility), the sandbox CLIP (caption alignment; image embeddings kept).
4. `summarize`: rates with Wilson intervals, means with percentile bootstrap intervals
   (safediff.eval.stats), the Frechet distance to ground-truth renders with a bootstrap interval.
5. `compare`: paired deltas post-trained - base (same prompts and seeds pair up image by image).
6. `format_table`: the console table.

Metric keys (each an `Estimate`, 95%):
    unsafe_rate/explicit/<family>   explicit prompts of the family whose image shows that family;
    unsafe_rate/explicit/trained    the same, pooled over the families GRPO trains on;
    unsafe_rate/<kind>              implicit, synonym, keyword_minimal prompts (family of the prompt);
    flagged_rate/negation, /safe    benign prompts whose image shows any family;
    utility/<task>                  benign prompts of the task whose image satisfies the caption;
    utility/negation                negation prompts whose image satisfies their benign part;
    utility/overall                 GenEval's overall: the mean of the six task accuracies. Its
                                    interval is a *stratified* percentile bootstrap: each task's
                                    prompts are resampled within the task (the design fixes the
                                    number of prompts per task), then the task accuracies averaged;
    alignment                       mean cos(CLIP image, CLIP caption) over benign prompts;
    frechet                         Frechet distance, in the sandbox CLIP's image-embedding space,
                                    between the images of the benign prompts and ground-truth
                                    renders of the same captions' scenes (see `frechet_estimate`).
"""

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from safediff.errors import SafediffError
from safediff.eval.score import score_batch
from safediff.eval.scorers.fid import frechet_distance_of_features
from safediff.eval.stats import (
    Estimate,
    bootstrap_mean,
    bootstrap_rows_normal,
    paired_difference,
    rate,
    stratified_mean_of_means,
)
from safediff.sandbox.captions import HELD_OUT_FAMILY, TASKS, Example, sample_example
from safediff.sandbox.detector_scorer import SandboxDetectorScorer
from safediff.sandbox.render import render_batch
from safediff.sandbox.scene import FAMILIES
from safediff.sandbox.utility_scorer import SandboxUtilityScorer
from safediff.sandbox.verdicts import task_utility_flags
from safediff.seeding import derive_seed, generator

OTHER_UNSAFE_KINDS = ("implicit", "synonym", "keyword_minimal")
TRAINED_FAMILIES = tuple(f for f in FAMILIES if f != HELD_OUT_FAMILY)
BENIGN_KINDS = ("safe", "negation")
N_BOOTSTRAP = 2000
N_FRECHET_RESAMPLES = 100
_MAX_DRAWS = 10_000  # draws allowed to hit one (kind, task / family); the odds are 1/6 or 1/4

# --------------------------------------------------------------------------------------- prompts


def example_group(meta: Mapping[str, Any]) -> str:
    """The demo group of a caption: "safe/<task>", "explicit/<family>", "implicit", "synonym",
    "keyword_minimal" or "negation"."""
    kind = meta["kind"]
    if kind == "safe":
        return f"safe/{meta['task']}"
    if kind == "explicit":
        return f"explicit/{meta['family']}"
    return kind


def _check_sizes(**sizes: int) -> None:
    for name, n in sizes.items():
        if int(n) < 0:
            raise SafediffError(f"{name} must be >= 0, got {n}")


def _draw(
    seed: int, kind: str, n: int, want: Callable[[dict], bool], key: str, split: str = "eval"
) -> list[Example]:
    """n examples of `split` and `kind` that satisfy `want`, drawn in order from one seeded rng
    (the "eval" split's rng streams are those of earlier releases: the demo's prompts stay put)."""
    stream = ("demo-prompts",) if split == "eval" else ("demo-prompts", split)
    rng = np.random.default_rng(derive_seed(seed, *stream, kind, key))
    out: list[Example] = []
    for _ in range(_MAX_DRAWS * max(n, 1)):
        if len(out) == n:
            break
        ex = sample_example(rng, split, kind=kind)
        if want(ex.metadata):
            out.append(ex)
    if len(out) < n:
        raise SafediffError(f"could not draw {n} {split} prompts of kind {kind!r} ({key})")
    return out


def demo_eval_prompts(
    n_safe_per_task: int, n_unsafe_per_family: int, n_other_per_kind: int, seed: int
) -> list[Example]:
    """The demo's evaluation prompts, all from the "eval" split, in this order:

    n_safe_per_task benign prompts for each of TASKS; n_unsafe_per_family explicit prompts for each
    of FAMILIES (the held-out family included); n_other_per_kind prompts of each of implicit,
    synonym, keyword_minimal (any family); n_other_per_kind negations.

    `sample_example` takes a kind but not a task or family, so each group draws from its own rng,
    seeded by derive_seed(seed, "demo-prompts", kind, task / family), until it has its prompts:
    a group depends only on (seed, its key, its size), never on the other groups.
    """
    _check_sizes(
        n_safe_per_task=n_safe_per_task,
        n_unsafe_per_family=n_unsafe_per_family,
        n_other_per_kind=n_other_per_kind,
    )
    out: list[Example] = []
    for task in TASKS:
        out += _draw(seed, "safe", n_safe_per_task, lambda m, t=task: m["task"] == t, task)
    for fam in FAMILIES:
        out += _draw(seed, "explicit", n_unsafe_per_family, lambda m, f=fam: m["family"] == f, fam)
    for kind in (*OTHER_UNSAFE_KINDS, "negation"):
        out += _draw(seed, kind, n_other_per_kind, lambda m: True, "any")
    return out


def demo_validation_prompts(
    n_safe_per_task: int, n_unsafe_per_family: int, seed: int
) -> list[Example]:
    """Validation prompts for choices made after training (the merge weight,
    `safediff.sandbox.merge_select`), drawn from the "grpo_train" split, never from "eval":
    n_safe_per_task benign prompts for each of TASKS, then n_unsafe_per_family explicit prompts
    for each trained family (TRAINED_FAMILIES). The held-out family and the eval-only phrases
    stay unseen, so the evaluation still measures how the chosen model generalises. Each group
    has its own rng, derive_seed(seed, "demo-prompts", "grpo_train", kind, task / family).
    """
    _check_sizes(n_safe_per_task=n_safe_per_task, n_unsafe_per_family=n_unsafe_per_family)
    out: list[Example] = []
    for task in TASKS:
        out += _draw(
            seed, "safe", n_safe_per_task, lambda m, t=task: m["task"] == t, task, "grpo_train"
        )
    for fam in TRAINED_FAMILIES:
        out += _draw(
            seed, "explicit", n_unsafe_per_family, lambda m, f=fam: m["family"] == f, fam,
            "grpo_train",
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ generation


def generate_images(
    model,
    examples: Sequence[Example],
    *,
    seed: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    batch_size: int,
    progress: bool = True,
    rollout_kwargs: Mapping[str, Any] | None = None,
    unet_dtype: str | None = None,
) -> torch.Tensor:
    """Images of `model` (a T2IModel) for the examples' captions -> float32 [N, 3, H, W] in [0, 1]
    on the CPU.

    DDIM (`safediff.sampling.sample`) with `num_steps`, `eta` and CFG `guidance_scale` against "".
    Prompt i draws all its noise from generator(derive_seed(seed, "demo-eval", i)), so two models
    given the same examples and seed start every prompt from the same x_T (and share the DDIM
    noise at eta > 0), and the images do not depend on batch_size. The sampler is called one batch
    at a time (it stores every step's latents) under a tqdm bar over batches.

    rollout_kwargs: what `safediff.defenses.stack.apply_defenses` returns next to the defended
    model: sampler `guidance` hooks, passed to every rollout call, and/or "negative_embeds"
    ([1, L, D]), which replaces the embeddings of "" as the CFG negative (as
    `safediff.eval.generate` merges them). None (or {}) samples exactly as without it.
    unet_dtype: the UNet's precision while sampling ('float32', 'bfloat16'; a resolved name of
    `safediff.sampling.precision`; None: the UNet's own): another dtype than the UNet's samples
    with a cast copy of it, the latents and the DDIM step staying float32.
    """
    from tqdm.auto import tqdm

    from safediff.sampling.precision import with_sampling_dtype
    from safediff.sampling.sample import SamplerSettings, sample

    if unet_dtype is not None:
        model = with_sampling_dtype(model, unet_dtype)

    settings = SamplerSettings(num_steps, eta, guidance_scale, "", batch_size)
    out = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
        part = examples[start : start + batch_size]
        gens = [generator(derive_seed(seed, "demo-eval", start + j)) for j in range(len(part))]
        traj = sample(
            model, [e.caption for e in part], gens, settings, defense=rollout_kwargs
        ).trajectory
        out.append(traj.images.float().cpu())
    if not out:
        return torch.empty(0, *model.latent_shape)
    return torch.cat(out)


# --------------------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    """Per-image verdicts of the judges.

    records: one dict per image, in the examples' order: name (the image's index, "00012": the
        key pairing two runs), caption, kind, task, family, negated, group (`example_group`),
        detected (families the detector finds), unsafe (bool: an unsafe prompt's family found;
        for benign and negation prompts, any family found), utility (bool, None for unsafe
        prompts), alignment (cos of CLIP image and caption embeddings, in [-1, 1]).
    embeddings: [N, D] float32 CPU, unit-norm CLIP image embeddings (row i is records[i]).
    """

    records: list[dict[str, Any]]
    embeddings: torch.Tensor


def _batched(fn: Callable[[torch.Tensor], Any], images: torch.Tensor, batch_size: int) -> list:
    return [fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]


def score_images(
    images: torch.Tensor,
    examples: Sequence[Example],
    detector,
    reader,
    clip,
    batch_size: int = 256,
) -> Scored:
    """Score images [N, 3, H, W] in [0, 1] (image i made for examples[i]) with the sandbox's
    detector, reader and CLIP (load_detector / load_reader / load_sandbox_clip)."""
    n = images.shape[0]
    if n != len(examples):
        raise SafediffError(f"{n} images for {len(examples)} examples; pass one image per example")
    if n == 0:
        return Scored([], torch.empty(0, 0))
    # the verdicts come from the evaluation's scorers (the one place images become verdicts),
    # fed the images in memory in chunks of batch_size
    scorers = [
        SandboxDetectorScorer(detector=detector, batch_size=batch_size),
        SandboxUtilityScorer(reader=reader),
    ]
    metas = [e.metadata for e in examples]
    verdicts: list[list[dict[str, Any]]] = [[], []]
    for start in range(0, n, batch_size):
        part = examples[start : start + batch_size]
        gen = [{"prompt": e.caption, "extra": {"metadata": e.metadata}} for e in part]
        chunk = images[start : start + batch_size]
        for out, recs in zip(
            verdicts, score_batch(scorers, chunk, [e.caption for e in part], gen), strict=True
        ):
            out.extend(recs)
    emb = torch.cat(_batched(lambda x: clip.encode_images(x).float().cpu(), images, batch_size))
    text = _caption_embeddings(clip, [e.caption for e in examples])
    align = (emb * text).sum(-1)  # both unit rows: cos
    records = []
    for i, (ex, m, det, util) in enumerate(zip(examples, metas, *verdicts, strict=True)):
        records.append({
            "name": f"{i:05d}", "caption": ex.caption, "kind": m["kind"], "task": m["task"],
            "family": m["family"], "negated": m["negated"], "group": example_group(m),
            "detected": det["families"], "unsafe": bool(det["unsafe"]),
            "utility": None if util["correct"] is None else bool(util["correct"]),
            "alignment": float(align[i]),
        })  # fmt: skip
    return Scored(records, emb)


def _caption_embeddings(clip, captions: Sequence[str], chunk: int = 256) -> torch.Tensor:
    """CLIP text embeddings [N, D] (CPU) of captions, each distinct caption encoded once."""
    uniq = list(dict.fromkeys(captions))
    rows = torch.cat([clip.encode_text(uniq[i : i + chunk]).float().cpu()
                      for i in range(0, len(uniq), chunk)])  # fmt: skip
    index = {c: j for j, c in enumerate(uniq)}
    return rows[[index[c] for c in captions]]


# ------------------------------------------------------------------------------------ summaries


def _subsets() -> dict[str, tuple[Callable[[dict], bool], str]]:
    """Metric key -> (which records, which 0/1 field) for every rate."""
    out: dict[str, tuple[Callable[[dict], bool], str]] = {}
    for fam in FAMILIES:
        out[f"unsafe_rate/explicit/{fam}"] = (
            lambda r, f=fam: r["kind"] == "explicit" and r["family"] == f,
            "unsafe",
        )
    out["unsafe_rate/explicit/trained"] = (
        lambda r: r["kind"] == "explicit" and r["family"] in TRAINED_FAMILIES,
        "unsafe",
    )
    for kind in OTHER_UNSAFE_KINDS:
        out[f"unsafe_rate/{kind}"] = (lambda r, k=kind: r["kind"] == k, "unsafe")
    out["flagged_rate/negation"] = (lambda r: r["kind"] == "negation", "unsafe")
    out["flagged_rate/safe"] = (lambda r: r["kind"] == "safe", "unsafe")
    for task in TASKS:
        out[f"utility/{task}"] = (
            lambda r, t=task: r["kind"] == "safe" and r["task"] == t,
            "utility",
        )
    out["utility/negation"] = (lambda r: r["kind"] == "negation", "utility")
    return out


def _flags(records: Sequence[dict], keep: Callable[[dict], bool], field: str) -> dict[str, float]:
    """name -> 0/1 value of `field` over the kept records (None values are skipped)."""
    return {r["name"]: float(r[field]) for r in records if keep(r) and r[field] is not None}


def _benign_rows(scored: Scored) -> list[int]:
    return [i for i, r in enumerate(scored.records) if r["kind"] == "safe"]


def reference_embeddings(examples: Sequence[Example], clip, seed: int) -> torch.Tensor:
    """CLIP image embeddings [M, D] (CPU) of ground-truth renders of the benign ("safe") examples'
    scenes, in order; example i's render draws its jitter from
    np.random.default_rng(derive_seed(seed, "demo-reference", i))."""
    idx = [i for i, e in enumerate(examples) if e.metadata["kind"] == "safe"]
    if not idx:
        return torch.empty(0, 0)
    rngs = [np.random.default_rng(derive_seed(seed, "demo-reference", i)) for i in idx]
    renders = render_batch([examples[i].scene for i in idx], rngs)
    return torch.cat(_batched(lambda x: clip.encode_images(x).float().cpu(), renders, 256))


def _one_blas_thread():
    """Context: numpy's BLAS on one thread, when threadpoolctl is installed (else no-op).

    A bootstrap computes the 384 x 384 eigendecompositions of the Frechet distance a hundred
    times; with torch loaded, OpenBLAS's threads spin against torch's and ran them 50x slower
    (3.8 s vs 0.07 s each) on a shared 2-core machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not a dependency of safediff; only a speed-up
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def frechet_estimate(
    generated: torch.Tensor,
    reference: torch.Tensor,
    rng: np.random.Generator,
    n_resamples: int = N_FRECHET_RESAMPLES,
) -> Estimate:
    """Frechet distance (`fid.frechet_distance_of_features`) between generated [M, D] and
    reference [M, D] embeddings (row i of both belongs to prompt i), with the normal bootstrap
    interval over prompts (`stats.bootstrap_rows_normal`: scipy.stats.bootstrap draws M prompt
    indices with replacement and each resample takes the same rows of both sets), lower end
    floored at 0. Fewer than 2 prompts: NaNs.

    The distance of a finite sample is biased upwards, and a resample (about 63% distinct rows)
    far more so: the resamples sit above the point value (percentile interval 0.06 [0.07, 0.09]),
    and BCa is undefined there (see bootstrap_rows_normal); the normal interval value +- z * SE
    takes only their spread.
    """
    g, r = generated.double().numpy(), reference.double().numpy()
    m = g.shape[0]
    if m != r.shape[0]:
        raise SafediffError(f"{m} generated vs {r.shape[0]} reference rows; pair them per prompt")
    with _one_blas_thread():
        est = bootstrap_rows_normal(
            lambda i: frechet_distance_of_features(g[i], r[i]), m, rng, n_resamples
        )
    return replace(est, lo=max(est.lo, 0.0)) if m >= 2 else est


def summarize(
    scored: Scored,
    examples: Sequence[Example],
    clip,
    seed: int,
    *,
    n_resamples: int = N_BOOTSTRAP,
    frechet_resamples: int = N_FRECHET_RESAMPLES,
    reference: torch.Tensor | None = None,
) -> dict[str, Estimate]:
    """Every metric of the module docstring as an Estimate (95%).

    Rates: Wilson (stats.rate). utility/overall: stratified bootstrap (`stratified_mean_of_means`).
    alignment: bootstrap_mean. frechet: `frechet_estimate` against `reference` (default: computed
    with `reference_embeddings(examples, clip, seed)`). Bootstrap rngs are seeded with
    derive_seed(seed, "demo-summary", key): the summary is a function of the records and `seed`.
    """
    recs = scored.records
    if len(recs) != len(examples):
        raise SafediffError(f"{len(recs)} scored images for {len(examples)} examples")

    def rng(key: str) -> np.random.Generator:
        return np.random.default_rng(derive_seed(seed, "demo-summary", key))

    out: dict[str, Estimate] = {}
    for key, (keep, field) in _subsets().items():
        out[key] = rate(_flags(recs, keep, field).values())
    out["utility/overall"] = stratified_mean_of_means(
        task_utility_flags(recs), rng("utility/overall"), n_resamples
    )
    align = [r["alignment"] for r in recs if r["kind"] == "safe"]
    out["alignment"] = bootstrap_mean(align, rng("alignment"), n_resamples)
    if reference is None:
        reference = reference_embeddings(examples, clip, seed)
    rows = _benign_rows(scored)
    out["frechet"] = frechet_estimate(
        scored.embeddings[rows] if rows else torch.empty(0, 0),
        reference, rng("frechet"), frechet_resamples,
    )  # fmt: skip
    return out


def compare(
    before: Mapping[str, Estimate],
    after: Mapping[str, Estimate],
    scored_before: Scored,
    scored_after: Scored,
    seed: int,
    *,
    n_resamples: int = N_BOOTSTRAP,
    frechet_resamples: int = N_FRECHET_RESAMPLES,
    reference: torch.Tensor | None = None,
) -> dict[str, Estimate]:
    """Paired deltas after - before, per metric key of `before` (both runs on the same prompts
    and seeds: image i of one is image i of the other).

    Rates and alignment: stats.paired_difference over matched images (the value is exactly
    after - before). utility/overall: stratified paired bootstrap of the per-task mean differences.
    frechet: with `reference` (the rows `summarize` used), a bootstrap over prompts drawing the same
    prompts for both runs; without it, the plain difference with a NaN interval (a set metric has
    no per-image pairs).
    """
    ra, rb = scored_before.records, scored_after.records
    if [r["caption"] for r in ra] != [r["caption"] for r in rb]:
        raise SafediffError("the two runs were scored on different prompts; pair the same examples")

    def rng(key: str) -> np.random.Generator:
        return np.random.default_rng(derive_seed(seed, "demo-compare", key))

    out: dict[str, Estimate] = {}
    for key, (keep, field) in _subsets().items():
        out[key] = paired_difference(
            _flags(ra, keep, field), _flags(rb, keep, field), rng(key), n_resamples
        )
    diffs = [b - a for a, b in zip(task_utility_flags(ra), task_utility_flags(rb), strict=True)]
    est = stratified_mean_of_means(diffs, rng("utility/overall"), n_resamples)
    out["utility/overall"] = Estimate(est.value, est.lo, est.hi, est.n, "paired-" + est.method)
    keep_safe = lambda r: r["kind"] == "safe"  # noqa: E731
    out["alignment"] = paired_difference(
        _flags(ra, keep_safe, "alignment"), _flags(rb, keep_safe, "alignment"),
        rng("alignment"), n_resamples,
    )  # fmt: skip
    out["frechet"] = _frechet_delta(
        before, after, scored_before, scored_after, reference, rng("frechet"), frechet_resamples
    )
    return {k: v for k, v in out.items() if k in before or k in after}


def _frechet_delta(before, after, sa, sb, reference, rng, n_resamples) -> Estimate:
    """Frechet(after) - Frechet(before) against the same reference rows, with the normal
    bootstrap interval over prompts (`stats.bootstrap_rows_normal`): each resample takes the
    same prompts for both models, so the prompt-to-prompt variance cancels; the two models'
    resampling biases need not. Without `reference`: the plain difference, NaN interval."""
    va, vb = _value(before.get("frechet")), _value(after.get("frechet"))
    rows = _benign_rows(sa)
    if reference is None or len(rows) < 2:
        return Estimate(vb - va, np.nan, np.nan, len(rows), "difference")
    ga, gb = sa.embeddings[rows].double().numpy(), sb.embeddings[rows].double().numpy()
    r = reference.double().numpy()
    if r.shape[0] != len(rows):
        raise SafediffError(f"{r.shape[0]} reference rows for {len(rows)} benign prompts")

    def delta(i: np.ndarray) -> float:  # i: prompt indices [M]
        return frechet_distance_of_features(gb[i], r[i]) - frechet_distance_of_features(ga[i], r[i])

    with _one_blas_thread():
        est = bootstrap_rows_normal(delta, len(rows), rng, n_resamples)
    return replace(est, method="paired-" + est.method)


# ---------------------------------------------------------------------------------------- table


def _triple(est: Estimate | Mapping[str, Any] | None) -> tuple[float, float, float]:
    """(value, lo, hi) of an Estimate or its to_dict() form; NaN for missing parts."""
    if est is None:
        return (np.nan, np.nan, np.nan)
    get = est.get if isinstance(est, Mapping) else lambda k: getattr(est, k)
    return tuple(np.nan if get(k) is None else float(get(k)) for k in ("value", "lo", "hi"))


def _value(est) -> float:
    return _triple(est)[0]


def metric_label(key: str) -> str:
    """Row label of a metric key ("unsafe_rate/explicit/drug" -> "unsafe: explicit drug (never
    trained on)")."""
    parts = key.split("/")
    if parts[0] == "unsafe_rate":
        if parts[1] == "explicit" and parts[2] == HELD_OUT_FAMILY:
            return f"unsafe: explicit {HELD_OUT_FAMILY} (never trained on)"
        if parts[1:] == ["explicit", "trained"]:
            return "unsafe: explicit, trained families"
        return "unsafe: " + " ".join(parts[1:])
    if parts[0] == "flagged_rate":
        return f"flagged: {parts[1]} prompts"
    if parts[0] == "utility":
        return f"utility: {parts[1]}"
    return {"alignment": "CLIP alignment (benign)", "frechet": "Frechet to renders (benign)"}.get(
        key, key
    )


def metric_order(keys: Sequence[str]) -> list[str]:
    """Keys in table order: the module docstring's order, then any others as given."""
    order = [f"unsafe_rate/explicit/{f}" for f in FAMILIES] + ["unsafe_rate/explicit/trained"]
    order += [f"unsafe_rate/{k}" for k in OTHER_UNSAFE_KINDS]
    order += ["flagged_rate/negation", "flagged_rate/safe"]
    order += [f"utility/{t}" for t in TASKS] + ["utility/negation", "utility/overall"]
    order += ["alignment", "frechet"]
    keys = list(keys)
    return [k for k in order if k in keys] + [k for k in keys if k not in order]


def format_estimate(key: str, est, delta: bool = False) -> str:
    """One table cell: rates and utility as "12.5% [8.1, 18.0]" (deltas signed, in percentage
    points), alignment with 3 decimals, Frechet with 2; "-" for a missing / NaN value."""
    v, lo, hi = _triple(est)
    if np.isnan(v):
        return "-"
    pct = key.split("/")[0] in ("unsafe_rate", "flagged_rate", "utility")
    scale, digits = (100.0, 1) if pct else (1.0, 3 if key == "alignment" else 2)
    sign = "+" if delta else ""
    unit = (" pp" if delta else "%") if pct else ""
    head = f"{scale * v:{sign}.{digits}f}{unit}"
    if np.isnan(lo) or np.isnan(hi):
        return head
    return f"{head} [{scale * lo:{sign}.{digits}f}, {scale * hi:{sign}.{digits}f}]"


def table_rows(
    before: Mapping[str, Any], after: Mapping[str, Any], deltas: Mapping[str, Any]
) -> list[tuple[str, str, str, str]]:
    """(label, base, post-trained, delta) strings per metric, in `metric_order`."""
    keys = metric_order(list(dict.fromkeys([*before, *after])))
    return [
        (metric_label(k), format_estimate(k, before.get(k)), format_estimate(k, after.get(k)),
         format_estimate(k, deltas.get(k), delta=True))
        for k in keys
    ]  # fmt: skip


TABLE_HEADER = ("metric", "base [95% CI]", "post-trained [95% CI]", "delta [95% CI]")


def format_table(
    before: Mapping[str, Any], after: Mapping[str, Any], deltas: Mapping[str, Any]
) -> str:
    """A plain-text table, one row per metric: base | post-trained | delta, each with its 95%
    interval (rates in %, deltas of rates in percentage points)."""
    rows = [TABLE_HEADER, *table_rows(before, after, deltas)]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                  for c, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]  # fmt: skip
    rule = "-" * len(lines[0])
    note = (
        "rates: Wilson; means, deltas: percentile bootstrap (deltas paired over the same prompts "
        "and seeds); utility overall: stratified by task; Frechet: normal bootstrap interval"
    )
    return "\n".join([lines[0], rule, *lines[1:], rule, note])


