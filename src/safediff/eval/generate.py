"""Generate the images of an evaluation prompt set: `generate()` and `safediff generate`.

Layout of an output folder:

    OUT/images/<name>.png   one file per image; <name> = case number + "_<k>" (see `image_stem`)
    OUT/generation.jsonl    one JSON record per image (name, file, prompt, seed, guidance, width,
                            height, case_number, categories, row, k, extra), by row then k
    OUT/run.json            model, sampler settings, seed rule, counts, safediff version

Protocol (as in the papers' evaluation scripts, one difference named below):
- sampler: DDIM with `num_steps` steps and stochasticity `eta` (default 0: deterministic DDIM),
  classifier-free guidance with `negative_prompt` (default "", the unconditional prompt), through
  safediff's one sampling entry (`safediff.sampling.sample`), the sampler GRPO trains; or another
  `scheduler` of `safediff.sampling.schedulers.SCHEDULERS` (lms as SafeDiffusion-R1 evaluates,
  ddpm as the Safe Denoiser paper, euler, dpm++, ...), with the same CFG, seeds and defenses;
- per row: its own seed, guidance and size are honoured; rows without them take `default_seed +
  row.index`, `default_guidance` and the model's default resolution;
- seeds: image k of a row starts from CPU generator seed `row_seed + k`, drawing x_T and then one
  z per step. The reference scripts seed one generator per *batch*; here every image owns its
  generator, so an image does not depend on batch size, process count, device or resume.
  (So image 1 of row i shares its noise with image 0 of a row whose seed is row_seed + 1; with
  default seeds that is row i + 1. Images are still deterministic functions of (prompt, seed).)
- batching: rows are grouped by (guidance, width, height) and each group is sampled in batches of
  `batch_size`, so a row's size and guidance never leak into another row's batch.

Keyed by content: every image carries (a PNG text chunk "safediff") its row's prompt, seed, guidance
and size and the run's key (`content_key`): digests of the weights it was made with (UNet, text
encoder, VAE, noise schedule; after defenses), the defense stack and sha256 of the files it names,
and the sampler settings (scheduler, steps, eta, negative prompt); run.json records the key as
"made_with" and the scheduler as "sampler".
A model path whose weights changed (a run re-merged or retrained) is a different key, so:

- a folder holding images of another key is refused (SafediffError: start fresh in another
  folder, or pass `overwrite=True` / --overwrite, which first deletes those images and the old
  records and scores), so one folder never mixes images of two models;
- resume: an image already on disk is kept when it decodes (PIL verify + load), has the expected
  size and carries the same metadata; anything else of this key (missing, truncated, corrupt, a
  row whose prompt, seed, guidance or size changed) is regenerated. Files are written to a
  temporary name and renamed (os.replace), so an interrupted run never leaves a half-written PNG
  under its final name; the temporaries of killed runs are removed at the next start.

Distributed (accelerate / torchrun): process r of W takes rows at positions i with i % W == r and
writes its own images; after a barrier the main process writes generation.jsonl and run.json. Since
every image owns its generator, W processes produce the same files as one.
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

import safediff
from safediff.atomic import atomic_path, remove_orphans, write_text_atomic
from safediff.errors import SafediffError
from safediff.eval.html import to_uint8
from safediff.models.base import T2IModel
from safediff.prompt_sets import FORMATS, MAX_IMAGE_SIZE, PromptRow
from safediff.sampling.precision import CHOICES as PRECISION_CHOICES
from safediff.sampling.precision import resolve_unet_dtype, with_unet_dtype
from safediff.sampling.sample import SamplerSettings, sample
from safediff.sampling.schedulers import SCHEDULERS, check_scheduler
from safediff.seeding import generator

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
RECORDS_FILE = "generation.jsonl"
RUN_FILE = "run.json"
METADATA_KEY = "safediff"
_SAFE_STEM = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SEED_MAX = 2**63 - 1
MAX_IMAGES_PER_PROMPT = 10_000
"""The command line's bound on --images-per-prompt (a typo of 10**9 would plan for minutes)."""
"""The largest image seed: row seeds are offset by k and stored as signed 64-bit integers."""


@dataclass(frozen=True)
class ImageJob:
    """One image to produce: row, image number k within the row, and its resolved settings."""

    row: PromptRow
    k: int
    name: str
    seed: int
    guidance: float
    width: int
    height: int


@dataclass
class GenerationResult:
    """What `generate` did.

    out_dir: the output folder. records: one dict per image of the whole set (all processes),
    as written to generation.jsonl. generated: images sampled by this call, over all processes.
    skipped: images found complete on disk and kept. seconds: wall time of this process.
    """

    out_dir: Path
    records: list[dict[str, Any]]
    generated: int
    skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Sizes and names


def vae_factor(model: T2IModel) -> int:
    """Pixels per latent cell: the VAE's downsampling (8 for SD), or 1 without a VAE component."""
    vae = model.components.get("vae")
    if vae is None:
        return 1
    from safediff.models.stable_diffusion import vae_scale_factor

    return vae_scale_factor(vae)


def default_size(model: T2IModel) -> tuple[int, int]:
    """(width, height) in pixels of the model's default resolution."""
    _, h, w = model.latent_shape
    f = vae_factor(model)
    return w * f, h * f


def latent_shape_for(model: T2IModel, width: int, height: int) -> tuple[int, int, int]:
    """(C, height // f, width // f): the latent of a width x height image (f = VAE factor).

    Raises SafediffError when a side is not a positive multiple of f.
    """
    f = vae_factor(model)
    if width <= 0 or height <= 0 or width % f or height % f:
        raise SafediffError(
            f"image size {width}x{height} does not fit model {model.source!r}: width and height "
            f"must be positive multiples of its VAE factor {f}"
        )
    return (model.latent_shape[0], height // f, width // f)


def image_stem(row: PromptRow) -> str:
    """The file stem of a row's images: its case number when that is 1-64 characters of
    [A-Za-z0-9_-], else its index. Never built from prompt text."""
    if row.case_number is not None and _SAFE_STEM.match(row.case_number):
        return row.case_number
    return str(row.index)


def plan_jobs(
    model: T2IModel,
    rows: Sequence[PromptRow],
    *,
    default_seed: int,
    default_guidance: float,
    images_per_prompt: int,
) -> list[ImageJob]:
    """Every image of `rows` with its resolved seed, guidance and size, by row then k.

    Raises SafediffError naming the rows when two rows would share a file name (compared
    case-insensitively), a row's size does not fit the model, or an image's seed (row seed + k)
    would exceed SEED_MAX.
    """
    dw, dh = default_size(model)
    jobs: list[ImageJob] = []
    stems: dict[str, PromptRow] = {}
    for row in rows:
        stem = image_stem(row)
        other = stems.get(stem.lower())
        if other is not None:
            raise SafediffError(
                f"rows {other.index} and {row.index} would both write images/{stem}_*.png "
                f"(case numbers {other.case_number!r}, {row.case_number!r}); make case numbers "
                "unique"
            )
        stems[stem.lower()] = row
        width, height = row.width or dw, row.height or dh
        try:
            latent_shape_for(model, width, height)
        except SafediffError as err:
            raise SafediffError(f"row {row.index} (case {row.case_number}): {err}") from None
        row_seed = row.seed if row.seed is not None else default_seed + row.index
        if row_seed + images_per_prompt - 1 > SEED_MAX:
            source = (
                f"its seed {row.seed}"
                if row.seed is not None
                else f"--seed {default_seed} + row index {row.index}"
            )
            raise SafediffError(
                f"row {row.index} (case {row.case_number}): {source} + image "
                f"{images_per_prompt - 1} exceeds the largest seed 2**63 - 1; pass a smaller "
                "seed"
            )
        guidance = row.guidance if row.guidance is not None else default_guidance
        for k in range(images_per_prompt):
            jobs.append(
                ImageJob(row, k, f"{stem}_{k}", row_seed + k, float(guidance), width, height)
            )
    return jobs


def job_record(job: ImageJob) -> dict[str, Any]:
    """The generation.jsonl record of one image."""
    return {
        "name": job.name,
        "file": f"{IMAGES_DIR}/{job.name}.png",
        "prompt": job.row.prompt,
        "seed": job.seed,
        "guidance": job.guidance,
        "width": job.width,
        "height": job.height,
        "case_number": job.row.case_number,
        "categories": list(job.row.categories),
        "row": job.row.index,
        "k": job.k,
        "extra": dict(job.row.extra),
    }


# ---------------------------------------------------------------------------------------------
# What made an image: the run's content key


def _file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _schedule_digest(model: T2IModel) -> str:
    """blake2b of the noise schedule (alpha-bars, final alpha-bar, prediction type, spacing; a
    flow schedule: its fields)."""
    sched = model.schedule
    h = hashlib.blake2b(digest_size=16)
    if not hasattr(sched, "alphas_cumprod"):  # a FlowSchedule (sampling/flow.py): plain fields
        h.update(json.dumps(dataclasses.asdict(sched), sort_keys=True, default=str).encode())
        return h.hexdigest()
    h.update(sched.alphas_cumprod.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(
        f"{sched.final_alpha_cumprod!r}:{sched.prediction_type}:{sched.steps_offset}:"
        f"{sched.timestep_spacing}".encode()
    )
    return h.hexdigest()


def content_key(model: T2IModel, defenses: str | None, sampler: SamplerSettings) -> dict[str, Any]:
    """What every image of a run depends on besides its row (JSON-ready; compared on rerun).

    model: the model as sampled, after defenses (a DES encoder is in its text encoder).
    weights: `module_digest` of the UNet and of every module component (text encoder, VAE, a
    model family's adapters) and a digest of the noise schedule; defenses: the canonical stack
    spec; defense_files: sha256 of each file it names (the Safe Denoiser's negation and
    reference sets); scheduler, steps, eta, negative_prompt: the sampler's. Digesting reads every
    weight once (a few seconds for SD 1.5).
    """
    from safediff.defenses.stack import DefenseStack, safe_denoiser_files
    from safediff.models.digest import module_digest

    stack = DefenseStack.parse(defenses)
    files = {}
    for spec in stack.specs:
        if spec.kind == "safe-denoiser":
            files.update({f: _file_sha256(f) for f in safe_denoiser_files(spec)})
    weights = {"unet": module_digest(model.unet), "schedule": _schedule_digest(model)}
    for name, module in sorted(model.components.items()):
        if isinstance(module, torch.nn.Module):  # text encoder, VAE, a family's adapters
            weights[name] = module_digest(module)
    return {
        "weights": weights,
        "defenses": str(stack) if stack.specs else "",
        "defense_files": files,
        "scheduler": sampler.scheduler,
        "steps": sampler.num_steps,
        "eta": sampler.eta,
        "negative_prompt": sampler.negative_prompt,
    }


_KEY_WORDS = {
    "defenses": "defenses",
    "defense_files": "defense files",
    "scheduler": "sampler scheduler",
    "steps": "sampler steps",
    "eta": "sampler eta",
    "negative_prompt": "negative prompt",
}
_WEIGHT_WORDS = {"unet": "UNet weights", "vae": "VAE weights", "schedule": "noise schedule"}
_KEY_DEFAULTS = {"scheduler": "ddim"}
"""What an image made before a key part existed was made with (every image before --scheduler was
DDIM), so such a folder is not refused for it; its images still regenerate on resume."""


def _key_differences(made_with: Any, key: Mapping[str, Any]) -> list[str]:
    """What differs between an image's metadata and `key`, in words ([] when it matches)."""
    if not isinstance(made_with, dict) or not isinstance(made_with.get("weights"), dict):
        return ["weights (unrecorded: an image of an older safediff or another program)"]
    recorded, wanted = made_with["weights"], key["weights"]
    diffs = [
        _WEIGHT_WORDS.get(name, f"{name.replace('_', ' ')} weights")
        for name in sorted({*recorded, *wanted}, key=lambda n: (n != "unet", n))
        if recorded.get(name) != wanted.get(name)
    ]
    return diffs + [
        words
        for part, words in _KEY_WORDS.items()
        if made_with.get(part, _KEY_DEFAULTS.get(part)) != key[part]
    ]


def _made_with(path: Path) -> Any:
    """The metadata a PNG carries (parsed JSON; {} when it carries none or garbage), or None
    when the file does not open as an image (a truncated file: resume regenerates it)."""
    try:
        with Image.open(path) as im:  # the text chunk precedes the pixels: no decoding here
            text = im.info.get(METADATA_KEY)
    except Exception:  # unreadable: not evidence of another model
        return None
    try:
        return json.loads(text) if isinstance(text, str) else {}
    except json.JSONDecodeError:
        return {}


def _stale_images(images_dir: Path, key: Mapping[str, Any]) -> dict[Path, list[str]]:
    """The readable PNGs in `images_dir` not made with `key`: path -> what differs."""
    stale = {}
    if images_dir.is_dir():
        for path in sorted(images_dir.glob("*.png")):
            meta = _made_with(path)
            diffs = _key_differences(meta, key) if meta is not None else []
            if diffs:
                stale[path] = diffs
    return stale


def _refuse_or_clear_stale(
    out_dir: Path, key: Mapping[str, Any], overwrite: bool, delete: bool = True
) -> None:
    """Refuse a folder holding images of another key, or (overwrite) delete them together with
    the records and scores that describe them (delete=False: leave that to the main process)."""
    from safediff.eval.score import SCORES_DIR, SUMMARY_FILE

    stale = _stale_images(out_dir / IMAGES_DIR, key)
    if not stale:
        return
    what = sorted({d for diffs in stale.values() for d in diffs})
    example = next(iter(stale)).relative_to(out_dir).as_posix()
    if not overwrite:
        raise SafediffError(
            f"{out_dir} holds {len(stale)} image(s) made with other {', '.join(what)} than this "
            f"run (e.g. {example}); start fresh with another --out, or add --overwrite to delete "
            "them and regenerate"
        )
    if not delete:
        return
    for path in stale:
        path.unlink(missing_ok=True)
    for name in (RECORDS_FILE, RUN_FILE, SUMMARY_FILE):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / SCORES_DIR, ignore_errors=True)
    logger.warning(
        "overwrite: deleted %d image(s) of %s made with other %s, and their records and scores",
        len(stale),
        out_dir,
        ", ".join(what),
    )


# ---------------------------------------------------------------------------------------------
# Files


def _metadata(job: ImageJob, settings: Mapping[str, Any]) -> str:
    """The PNG text chunk that ties a file to what made it (compared verbatim on resume):
    the row's prompt, seed, guidance and size, and the run's `content_key`."""
    meta = {
        "prompt": job.row.prompt,
        "seed": job.seed,
        "guidance": job.guidance,
        "width": job.width,
        "height": job.height,
        **settings,
    }
    return json.dumps(meta, sort_keys=True, ensure_ascii=True)


def is_complete(path: Path, width: int, height: int, metadata: str | None = None) -> bool:
    """True when `path` is a readable RGB PNG of width x height (and carries `metadata`)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            if im.format != "PNG" or im.mode != "RGB" or im.size != (width, height):
                return False
            return metadata is None or im.text.get(METADATA_KEY) == metadata
    except Exception:  # any decoding failure (OSError, SyntaxError, struct.error...): regenerate
        return False


def save_png_atomic(image: Image.Image, path: Path, metadata: str | None = None) -> None:
    """Write `image` as PNG to a temporary file beside `path`, then rename it into place."""
    info = None
    if metadata is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, metadata)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


# ---------------------------------------------------------------------------------------------
# Generation


def generate(
    model: T2IModel,
    rows: Sequence[PromptRow],
    out_dir: str | Path,
    *,
    default_seed: int = 0,
    default_guidance: float = 7.5,
    num_steps: int = 50,
    eta: float = 0.0,
    batch_size: int = 8,
    images_per_prompt: int = 1,
    negative_prompt: str = "",
    accelerator: Any = None,
    progress: bool = True,
    run_info: Mapping[str, Any] | None = None,
    defenses: str | None = None,
    overwrite: bool = False,
    scheduler: str = "ddim",
) -> GenerationResult:
    """Sample `images_per_prompt` images per row and write them under `out_dir` (module docstring).

    defenses: a defense stack spec (`safediff.defenses.stack.DefenseStack.parse`), e.g.
        "des:DIR,negprompt:nudity,sld:medium,safe-denoiser:NEGSET.safetensors", applied on top of
        `model` (text-encoder swap, negative prompt, sampler guidance); recorded in run.json and
        in every image's metadata, so a resumed run with other defenses regenerates.

    model: on its device (the UNet's parameters give it). rows: e.g. `load_prompt_set(...).rows`.
    accelerator: an `accelerate.Accelerator` to split rows across processes, or None (one process).
    run_info: extra entries for run.json (e.g. the model spec and prompt file as given).
    overwrite: when `out_dir` holds images made with another `content_key` (other weights,
        defenses or sampler settings), delete them (and the old records and scores) and
        regenerate, instead of raising SafediffError.
    scheduler: a name of `safediff.sampling.schedulers.SCHEDULERS` ("ddim": safediff's DDIM
        with `eta`; any other takes eta 0); recorded in run.json ("sampler") and in the key.
    Returns a `GenerationResult`; every process returns the same records and counts.
    """
    if images_per_prompt < 1:
        raise SafediffError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    sampler = SamplerSettings(
        num_steps, float(eta), float(default_guidance), negative_prompt, batch_size, scheduler
    )
    if not rows:
        raise SafediffError("no prompt rows to generate")
    out_dir = Path(out_dir)
    rank, world = (
        (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    )
    is_main = rank == 0
    jobs = plan_jobs(
        model,
        rows,
        default_seed=default_seed,
        default_guidance=default_guidance,
        images_per_prompt=images_per_prompt,
    )
    rollout_kwargs: dict[str, Any] = {}
    if defenses:
        from safediff.defenses.stack import apply_defenses

        model, rollout_kwargs = apply_defenses(model, defenses)
        if "negative_embeds" in rollout_kwargs and negative_prompt:
            raise SafediffError(
                "a negprompt defense and --negative-prompt both set the negative prompt; use one"
            )
    settings = content_key(model, defenses, sampler)
    images_dir = out_dir / IMAGES_DIR
    if is_main:
        images_dir.mkdir(parents=True, exist_ok=True)
        for folder in (out_dir, images_dir):
            remove_orphans(folder)  # `.NAME.tmp-PID` of killed runs' records and PNGs
    # every process reaches the same verdict (one scan of the same files), so all raise together
    _refuse_or_clear_stale(out_dir, settings, overwrite, delete=is_main)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # stale images are gone before anyone checks for resume

    start = time.perf_counter()
    position = {row.index: i for i, row in enumerate(rows)}
    mine = [j for j in jobs if position[j.row.index] % world == rank]
    todo = [
        j
        for j in mine
        if not is_complete(images_dir / f"{j.name}.png", j.width, j.height, _metadata(j, settings))
    ]
    skipped = len(mine) - len(todo)
    if skipped and is_main:
        logger.info("%d image(s) already in %s are kept", skipped, images_dir)
    _sample_jobs(model, todo, images_dir, settings, sampler, progress and is_main, rollout_kwargs)
    seconds = time.perf_counter() - start

    generated, skipped = len(todo), skipped
    if accelerator is not None:
        from accelerate.utils import gather_object

        counts = gather_object([(generated, skipped)])
        generated, skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
        accelerator.wait_for_everyone()  # every image is on disk before the records say so

    records = [job_record(j) for j in jobs]
    if is_main:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        write_text_atomic(out_dir / RECORDS_FILE, text)
        run = {
            "safediff_version": safediff.__version__,
            "model": model.source,
            **dict(run_info or {}),
            "sampler": scheduler,
            "num_steps": num_steps,
            "eta": float(eta),
            "negative_prompt": negative_prompt,
            "defenses": defenses or "",
            "made_with": settings,
            "default_seed": default_seed,
            "default_guidance": float(default_guidance),
            "default_size": list(default_size(model)),
            "images_per_prompt": images_per_prompt,
            "seed_rule": "image k of a row: CPU generator seeded row_seed + k; "
            "row_seed = the row's seed, else default_seed + row index",
            "batch_size": batch_size,
            "world_size": world,
            "rows": len(rows),
            "images": len(records),
            "generated": generated,
            "skipped": skipped,
            "seconds": round(seconds, 3),
        }
        write_text_atomic(out_dir / RUN_FILE, json.dumps(run, indent=1, ensure_ascii=False) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return GenerationResult(out_dir, records, generated, skipped, seconds)


def _sample_jobs(
    model: T2IModel,
    jobs: list[ImageJob],
    images_dir: Path,
    settings: Mapping[str, Any],
    sampler: SamplerSettings,
    progress: bool,
    rollout_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Sample `jobs` grouped by (guidance, width, height), `batch_size` at a time; save PNGs.

    rollout_kwargs: from `apply_defenses`: sampler `guidance` hooks and/or `negative_embeds`.
    """
    if not jobs:
        return
    groups: dict[tuple[float, int, int], list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault((job.guidance, job.width, job.height), []).append(job)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="generate", unit="img")
    for (guidance, width, height), group in groups.items():
        view = dataclasses.replace(model, latent_shape=latent_shape_for(model, width, height))
        for start in range(0, len(group), sampler.batch_size):
            batch = group[start : start + sampler.batch_size]
            traj = sample(
                view,
                [j.row.prompt for j in batch],
                [generator(j.seed) for j in batch],
                sampler,
                guidance_scale=guidance,
                defense=rollout_kwargs,
            ).trajectory
            assert traj.images is not None
            pixels = to_uint8(traj.images).numpy()  # [B, H, W, 3]
            for job, array in zip(batch, pixels, strict=True):
                save_png_atomic(
                    Image.fromarray(array, mode="RGB"),
                    images_dir / f"{job.name}.png",
                    _metadata(job, settings),
                )
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Command line


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="'tiny-sd', 'sandbox', 'vanilla' (+ --base), a pipeline folder, a safediff run or "
        "checkpoint folder (full or LoRA), a bare UNet .safetensors or LoRA adapter folder "
        "(+ --base), or a hub id",
    )
    p.add_argument(
        "--base",
        help="base pipeline (hub id or folder) for bare UNets, LoRA adapters and 'vanilla'",
    )
    p.add_argument(
        "--prompts", required=True, help="prompt set: .csv (I2P, MMA, COCO, CoPro) or .txt"
    )
    p.add_argument(
        "--out", required=True, help="output folder (images/, generation.jsonl, run.json)"
    )
    p.add_argument("--format", default="auto", choices=FORMATS, help="prompt set format")
    p.add_argument("--prompt-column", help="CSV column holding the prompt (overrides the format's)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the prompt file")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="longer prompts are skipped")
    p.add_argument(
        "--max-image-size",
        type=int,
        default=MAX_IMAGE_SIZE,
        help="the largest width or height a prompt row may ask for, in pixels (>= 8; default "
        f"{MAX_IMAGE_SIZE})",
    )
    sampler_note = (
        " (default: the run's training sampler for a safediff run or checkpoint, a plug-in "
        "model's own sampler, else the protocol's 50 steps, eta 0, CFG 7.5)"
    )
    p.add_argument(
        "--scheduler",
        default="ddim",
        help="sampler: ddim (default; safediff's DDIM, the one GRPO trains), or for evaluation "
        f"{', '.join(n for n in SCHEDULERS if n != 'ddim')} (diffusers' schedulers over the "
        "model's noise schedule; lms is SafeDiffusion-R1's, ddpm the Safe Denoiser paper's)",
    )
    p.add_argument("--steps", type=int, help="sampler steps" + sampler_note)
    p.add_argument("--guidance", type=float, help="CFG scale for rows without one" + sampler_note)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="rows without a seed use SEED + row index (image k: + k); SEED + row index + k "
        "must not exceed 2**63 - 1",
    )
    p.add_argument(
        "--eta",
        type=float,
        help="DDIM eta in [0, 1] (0 = deterministic; other schedulers: 0)" + sampler_note,
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per UNet batch")
    p.add_argument(
        "--images-per-prompt",
        type=int,
        default=1,
        help=f"images per row (seeds +k), 1 to {MAX_IMAGES_PER_PROMPT}",
    )
    p.add_argument(
        "--negative-prompt", help="unconditional prompt for CFG (default: as the sampler's)"
    )
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument(
        "--defense",
        help="defense stack, e.g. 'negprompt:nudity,sld:medium' or 'des:DIR,safe-denoiser:NEG.safetensors'",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="precision of the VAE and text encoder (the UNet's is --unet-dtype)",
    )
    p.add_argument(
        "--unet-dtype",
        default="float32",
        choices=PRECISION_CHOICES,
        help="precision of the UNet while sampling ('auto': bfloat16 where the device computes "
        "it natively, a GPU or a CPU with AVX512-BF16 / AMX, else float32); with --dtype "
        "bfloat16 the whole pipeline "
        "samples in bf16 (about twice float32's speed on a GPU; images differ slightly from "
        "float32's, so the content key, which digests the weights with their dtype, differs "
        "too). Latents and the DDIM step stay float32",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, let float32 matmuls and convolutions use TF32 (default on; no effect "
        "on the CPU or on bf16/fp16 modules)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="when --out holds images made with other weights, defenses or sampler settings, "
        "delete them (and the records and scores describing them) and regenerate; without it "
        "such a folder is refused",
    )


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `safediff generate` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "generate",
        help="generate the images of a prompt set (resumable, multi-process)",
        description="Generate the images of an evaluation prompt set with per-row seeds, "
        "guidance and sizes; resumable; run under torchrun / accelerate launch to split rows.",
    )
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)
    return p


def resolve_sampler(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """scheduler, num_steps, eta, guidance_scale, negative_prompt: each from its option when
    given, else from `model_spec.sampler_defaults` (the run's training sampler, a plug-in model's
    own, or the protocol's); eta is 0 for a scheduler other than ddim unless given (then
    SamplerSettings refuses it). Logs where the defaults came from."""
    from safediff.eval.model_spec import sampler_defaults

    scheduler = check_scheduler(getattr(args, "scheduler", None) or "ddim")
    given = {
        "num_steps": args.steps,
        "eta": args.eta,
        "guidance_scale": args.guidance,
        "negative_prompt": args.negative_prompt,
    }
    defaults, source = sampler_defaults(args.model, cfg)
    if scheduler != "ddim":
        defaults = {**defaults, "eta": 0.0}  # a training sampler's eta is DDIM's
    sampler = {k: defaults[k] if v is None else v for k, v in given.items()}
    taken = [k for k, v in given.items() if v is None]
    if taken:
        logger.info(
            "sampler: %d %s steps, eta %g, CFG %g (%s from %s)",
            sampler["num_steps"],
            scheduler,
            sampler["eta"],
            sampler["guidance_scale"],
            ", ".join(taken),
            source,
        )
    return {"scheduler": scheduler, **sampler}


def run_generate(args: argparse.Namespace) -> int:
    """`safediff generate`: parse the spec, read the prompts, load the model, generate."""
    from safediff.eval.model_spec import parse_model_spec
    from safediff.models.loading import load_t2i_model
    from safediff.prompt_sets import load_prompt_set
    from safediff.rewards.encoders.base import parse_dtype

    if args.limit is not None and args.limit < 1:
        raise SafediffError(f"--limit must be >= 1, got {args.limit}")
    if not 1 <= args.images_per_prompt <= MAX_IMAGES_PER_PROMPT:
        raise SafediffError(
            f"--images-per-prompt must be in [1, {MAX_IMAGES_PER_PROMPT}], got "
            f"{args.images_per_prompt}"
        )
    if args.max_image_size < 8:
        raise SafediffError(f"--max-image-size must be >= 8 pixels, got {args.max_image_size}")
    cfg = parse_model_spec(args.model, args.base)
    sampler = resolve_sampler(args, cfg)  # a bad --scheduler or --eta fails before any loading
    settings = SamplerSettings(
        sampler["num_steps"],
        float(sampler["eta"]),
        float(sampler["guidance_scale"]),
        sampler["negative_prompt"],
        args.batch_size,
        sampler["scheduler"],
    )
    pset = load_prompt_set(
        args.prompts,
        fmt=args.format,
        prompt_column=args.prompt_column,
        max_prompt_chars=args.max_prompt_chars,
        encoding=args.encoding,
        max_image_size=args.max_image_size,
    )
    rows = list(pset.rows[: args.limit] if args.limit else pset.rows)

    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=args.device == "cpu")
        device = accelerator.device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # process-wide PyTorch settings: set here, at the edge
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = load_t2i_model(cfg, device=device, dtype=parse_dtype(args.dtype))
    unet_dtype = resolve_unet_dtype(args.unet_dtype, device)
    model = with_unet_dtype(model, parse_dtype(unet_dtype))
    logger.info("sampling: %s", settings.describe(model))  # a flow model's in its own terms
    result = generate(
        model,
        rows,
        Path(args.out),
        default_seed=args.seed,
        default_guidance=sampler["guidance_scale"],
        num_steps=sampler["num_steps"],
        eta=sampler["eta"],
        batch_size=args.batch_size,
        images_per_prompt=args.images_per_prompt,
        negative_prompt=sampler["negative_prompt"],
        accelerator=accelerator,
        progress=not args.no_progress,
        defenses=args.defense,
        overwrite=args.overwrite,
        scheduler=sampler["scheduler"],
        run_info={
            "model_spec": args.model,
            "base": args.base,
            "prompts": args.prompts,
            "prompt_format": pset.format,
            "limit": args.limit,
            "dtype": args.dtype,
            "unet_dtype": unet_dtype,
            "tf32": bool(args.tf32 and device.type == "cuda"),
        },
    )
    if accelerator is None or accelerator.is_main_process:
        print(
            f"{len(result.records)} images of {len(rows)} {pset.format} prompts in {args.out}: "
            f"{result.generated} generated ({result.images_per_second:.2f} images/s), "
            f"{result.skipped} already on disk"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m safediff.eval.generate ...` (same options as `safediff generate`)."""
    parser = argparse.ArgumentParser(prog="safediff-generate", description=__doc__.splitlines()[0])
    add_generate_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run_generate(args)
    except SafediffError as err:
        print(f"safediff generate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
