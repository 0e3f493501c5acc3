"""`safediff sandbox build`: retrain the sandbox's models from scratch, seeded, and record them.

Builds any of detector, reader, clip (minutes on a CPU) and diffusion (hours on a CPU, about an
hour on one GPU; see train_diffusion.py), writes `<name>.safetensors` into the output folder
(default: the package's shipped weights) and updates its manifest.json with each file's hash,
size, configuration, held-out accuracies, the command and the date.

Data: the three classifiers learn from one training pool (data.make_pool: grammar renders of the
"model_train" split plus random multi-glyph scenes, scene-level jitter) and are measured on
held-out pools drawn with other seeds and the renderer's own jitter: grammar renders of the
"eval" split (its held-out phrases included) and random scenes. The CLIP may also see empty
scenes captioned as empty (BUILD_CONFIG["clip"]["n_blank"], --clip-blanks).

Reproducibility: every random draw derives from `seed`; run with one torch thread (the CLI sets
it) for bit-identical weights on one machine. Different CPUs or torch versions may differ in the
last bits, so `verify` checks the shipped files against the manifest, not against a rebuild.
"""

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from safediff.errors import SafediffError
from safediff.sandbox import manifest
from safediff.sandbox.data import Pool, concat_pools, make_pool
from safediff.sandbox.protocol import SAMPLER
from safediff.seeding import derive_seed

log = logging.getLogger(__name__)

MODELS = ("detector", "reader", "clip", "diffusion")

BUILD_CONFIG: dict[str, Any] = {
    "pool": {"n_grammar": 10000, "n_random": 8000, "split": "model_train", "jitter": "scene"},
    "heldout": {"n_grammar": 600, "n_random": 600, "jitter": "render"},
    "detector": {"steps": 300, "batch_size": 128, "lr": 2e-3},
    "reader": {"steps": 700, "batch_size": 64, "lr": 3e-3},
    # n_blank: empty scenes captioned as empty, added to the pool for the CLIP only, so that
    # "nothing drawn" has a place in its space and a removed glyph reads as safer to the steering
    # reward (experiments/sandbox_reward_probe.py). The shipped file has 600 (--clip-blanks 0
    # rebuilds the earlier CLIP, which never saw an empty scene)
    "clip": {"steps": 500, "batch_size": 128, "lr": 2e-3, "cos_weight": 1.0, "n_blank": 600},
    # A CPU recipe (2 cores, hours): small batches, a high constant lr after a short warm-up, and
    # a short EMA horizon (about 200 steps) so that the EMA tracks a short run.
    "diffusion": {
        "steps": 6000,
        "batch_size": 32,
        "lr": 4e-4,
        "warmup_steps": 100,
        "ema_decay": 0.995,
        # train_diffusion.GlyphKeep: 1.0 / 1.0 (every unsafe caption drawn with its glyph) is
        # what the shipped model's first 5,000 steps saw (its last 1,400: 0.25 / 0.65, the
        # manifest's command); lower values (--glyph-keep-implicit/-explicit) make such prompts
        # only tend to draw it, so that GRPO's rollout groups are mixed
        "glyph_keep": {"implicit": 1.0, "explicit": 1.0},
    },
    # the sandbox's sampler (protocol.SAMPLER, as the demo evaluates)
    "diffusion_eval": {
        "n_safe": 300,
        "n_unsafe": 200,
        "n_implicit": 100,  # reported only (no bar): how often implicit prompts draw the glyph
        **SAMPLER,
    },
}
"""What `build_sandbox` trains with (recorded in the manifest)."""


def heldout_pools(seed: int) -> dict[str, Pool]:
    """Held-out pools (renderer jitter, seeds disjoint from training): grammar "eval" and
    "model_train" renders and random scenes."""
    cfg = BUILD_CONFIG["heldout"]
    s = derive_seed(seed, "heldout")
    return {
        "eval_grammar": make_pool(s, cfg["n_grammar"], 0, split="eval", jitter=cfg["jitter"]),
        "train_grammar": make_pool(
            s + 1, cfg["n_grammar"], 0, split="model_train", jitter=cfg["jitter"]
        ),
        "random": make_pool(s + 2, 0, cfg["n_random"], jitter=cfg["jitter"]),
    }


def _command(only: list[str], seed: int, device: str) -> str:
    return f"safediff sandbox build --only {','.join(only)} --seed {seed} --device {device}"


def build_sandbox(
    out_dir: str | Path | None = None,
    only: list[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    diffusion_steps: int | None = None,
    diffusion_batch_size: int | None = None,
    num_workers: int = 0,
    diffusion_run_dir: str | Path = "sandbox-diffusion-run",
    progress: bool = True,
    diffusion_init: str | Path | None = None,
    clip_blanks: int | None = None,
    glyph_keep: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the requested models and record them in `out_dir`'s manifest.

    out_dir: default the shipped weights folder (manifest.WEIGHTS_DIR).
    only: a subset of MODELS (default: all four; the diffusion model takes hours on a CPU).
    diffusion_steps / diffusion_batch_size: override BUILD_CONFIG["diffusion"].
    num_workers: DataLoader workers rendering diffusion batches (use several on a GPU machine).
    diffusion_run_dir: the diffusion run's folder (checkpoints, log; resumed if present); only
        its final EMA weights are copied into out_dir.
    diffusion_init: continue the diffusion model from this weight file (e.g. the shipped one)
        when the run folder has no checkpoint (see train_diffusion's init_weights).
    clip_blanks: override BUILD_CONFIG["clip"]["n_blank"] (empty scenes in the CLIP's pool).
    glyph_keep: override entries of BUILD_CONFIG["diffusion"]["glyph_keep"] ({"implicit": p,
        "explicit": p}: the probability that the diffusion model's unsafe training captions keep
        their glyph; see train_diffusion.GlyphKeep).
    Returns {name: manifest entry}.
    """
    if clip_blanks is not None and clip_blanks < 0:
        raise SafediffError(f"clip_blanks must be >= 0, got {clip_blanks}")
    only = list(only or MODELS)
    unknown = [m for m in only if m not in MODELS]
    if unknown:
        raise SafediffError(f"unknown sandbox model(s) {unknown}; choose from {MODELS}")
    out = Path(out_dir or manifest.WEIGHTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    command = _command(only, seed, device.type)
    entries: dict[str, dict[str, Any]] = {}
    classifiers = [m for m in only if m != "diffusion"]
    if classifiers:
        entries.update(
            _build_classifiers(out, classifiers, device, seed, command, progress, clip_blanks)
        )
    if "diffusion" in only:
        entries["diffusion"] = _build_diffusion(
            out, Path(diffusion_run_dir), device, seed, command, diffusion_steps,
            diffusion_batch_size, num_workers, progress, diffusion_init, glyph_keep,
        )  # fmt: skip
    return entries


def _build_classifiers(
    out: Path,
    names: list[str],
    device: torch.device,
    seed: int,
    command: str,
    progress: bool,
    clip_blanks: int | None = None,
) -> dict[str, dict[str, Any]]:
    from safediff.sandbox import clip, detector, reader

    t0 = time.perf_counter()
    pc = BUILD_CONFIG["pool"]
    pool = make_pool(derive_seed(seed, "train-pool"), pc["n_grammar"], pc["n_random"],
                     split=pc["split"], jitter=pc["jitter"])  # fmt: skip
    held = heldout_pools(seed)
    log.info("rendered %d training and %d held-out scenes in %.0f s", len(pool),
             sum(len(p) for p in held.values()), time.perf_counter() - t0)  # fmt: skip
    entries = {}
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device.type}
    for name in names:
        cfg, entry_command = dict(BUILD_CONFIG[name]), command
        if name == "clip" and clip_blanks is not None:
            cfg["n_blank"] = clip_blanks
            entry_command += f" --clip-blanks {clip_blanks}"
        t0 = time.perf_counter()
        mseed = derive_seed(seed, name)
        if name == "detector":
            model, losses = detector.train_detector(
                pool, cfg["steps"], cfg["batch_size"], cfg["lr"], mseed, device, progress
            )
            metrics = {k: detector.evaluate_detector(model, p) for k, p in held.items()}
            train = {**cfg, "seed": mseed, "pool": pc}
            detector.save_detector(model, out / detector.FILE, train)
            arch = detector.DETECTOR_CONFIG
        elif name == "reader":
            model, losses = reader.train_reader(
                pool, cfg["steps"], cfg["batch_size"], cfg["lr"], mseed, device, progress
            )
            metrics = {k: reader.evaluate_reader(model, p) for k, p in held.items()}
            train = {**cfg, "seed": mseed, "pool": pc}
            reader.save_reader(model, out / reader.FILE, train)
            arch = reader.READER_CONFIG
        else:
            from safediff.sandbox.text_encoder import load_text_encoder

            te = load_text_encoder(device)
            clip_pool = pool
            if cfg["n_blank"] > 0:
                blanks = make_pool(derive_seed(seed, "clip-blanks"), 0, 0, jitter=pc["jitter"],
                                   n_blank=cfg["n_blank"])  # fmt: skip
                clip_pool = concat_pools(pool, blanks)
            tower, losses = clip.train_clip(
                clip_pool, te, cfg["steps"], cfg["batch_size"], cfg["lr"], mseed, device,
                cfg["cos_weight"], progress,
            )  # fmt: skip
            sc = clip.SandboxClip(tower, te)
            metrics = {
                k: clip.evaluate_clip(sc, p, seed=seed) for k, p in held.items() if k != "random"
            }
            train = {**cfg, "seed": mseed, "pool": pc}
            clip.save_clip(tower, out / clip.FILE, train)
            arch = clip.CLIP_CONFIG
        seconds = time.perf_counter() - t0
        log.info("%s: trained and evaluated in %.0f s: %s", name, seconds, metrics)
        entries[name] = manifest.record_file(
            out, f"{name}.safetensors",
            config={"model": arch, "train": train, "heldout": BUILD_CONFIG["heldout"], **env},
            metrics={**metrics, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                     "train_seconds": round(seconds, 1)},
            command=entry_command,
        )  # fmt: skip
    return entries


def _final_train_metrics(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Mean loss over the last 200 steps and throughput: from this call's steps when it trained,
    else (a run resumed at its last step) from the run's train_log.jsonl, None if that is empty."""
    from safediff.sandbox.train_diffusion import LOG_FILE

    losses = [v for _, v in summary["losses"][-200:]]
    if losses:
        return {
            "final_loss": sum(losses) / len(losses),
            "samples_per_s": round(summary["samples_per_s"], 2),
        }
    records = []
    log_path = run_dir / LOG_FILE
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if record["step"] <= summary["end_step"]:
                records.append(record)
    tail = [r for r in records if r["step"] > summary["end_step"] - 200]
    return {
        "final_loss": sum(r["loss"] for r in tail) / len(tail) if tail else None,
        "samples_per_s": round(records[-1]["samples_per_s"], 2) if records else None,
    }


def _build_diffusion(
    out: Path,
    run_dir: Path,
    device: torch.device,
    seed: int,
    command: str,
    steps: int | None,
    batch_size: int | None,
    num_workers: int,
    progress: bool,
    init_weights: str | Path | None = None,
    glyph_keep: dict[str, float] | None = None,
) -> dict[str, Any]:
    from safediff.sandbox.train_diffusion import GlyphKeep, evaluate_base_model, train_diffusion
    from safediff.sandbox.unet import (
        DIFFUSION_FILE,
        SANDBOX_SCHEDULER_CONFIG,
        SANDBOX_UNET_CONFIG,
        load_sandbox_model,
    )

    cfg = {**BUILD_CONFIG["diffusion"]}
    if steps is not None:
        cfg["steps"] = steps
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    cfg["glyph_keep"] = {**cfg["glyph_keep"], **(glyph_keep or {})}
    keep = GlyphKeep(**cfg["glyph_keep"])  # validates
    for name in ("implicit", "explicit"):
        if cfg["glyph_keep"][name] != BUILD_CONFIG["diffusion"]["glyph_keep"][name]:
            command += f" --glyph-keep-{name} {cfg['glyph_keep'][name]}"
    summary = train_diffusion(
        run_dir, cfg["steps"], cfg["batch_size"], cfg["lr"], derive_seed(seed, "diffusion"),
        device, num_workers=num_workers, progress=progress, warmup_steps=cfg["warmup_steps"],
        ema_decay=cfg["ema_decay"], init_weights=init_weights, glyph_keep=keep,
    )  # fmt: skip
    shutil.copyfile(run_dir / DIFFUSION_FILE, out / DIFFUSION_FILE)
    metrics: dict[str, Any] = _final_train_metrics(summary, run_dir)
    if summary["init"] is not None:
        # the file the run started from (recorded by the run, so a resume keeps it)
        cfg["init"] = summary["init"]
        if init_weights is not None and manifest.sha256_file(init_weights) == cfg["init"]["sha256"]:
            command += f" --diffusion-init {init_weights}"
    if (out / "detector.safetensors").is_file() and (out / "reader.safetensors").is_file():
        from safediff.sandbox.detector import load_detector
        from safediff.sandbox.reader import load_reader

        model = load_sandbox_model(out / DIFFUSION_FILE, device)
        metrics["base_model"] = evaluate_base_model(
            model,
            load_detector(out / "detector.safetensors", device),
            load_reader(out / "reader.safetensors", device),
            seed=seed,
            **BUILD_CONFIG["diffusion_eval"],
        )
    return manifest.record_file(
        out, DIFFUSION_FILE,
        config={"unet": SANDBOX_UNET_CONFIG, "scheduler": SANDBOX_SCHEDULER_CONFIG, "train": cfg,
                "torch": torch.__version__, "device": device.type},
        metrics=metrics,
        command=command + f" --diffusion-steps {cfg['steps']}",
        note=f"trained in {run_dir} (checkpoints, train_log.jsonl; not package data)",
    )  # fmt: skip
