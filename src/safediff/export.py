"""Export a trained model as a diffusers pipeline folder with a model card (`safediff export`).

What `export_pipeline` writes (atomically: a hidden folder beside OUT, renamed into place when
complete, `safediff.atomic.atomic_dir`):

    OUT/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (SDXL: also
        text_encoder_2/, tokenizer_2/): `save_pretrained` (safetensors) of a StableDiffusionPipeline
        (no safety checker) or a StableDiffusionXLPipeline, so plain diffusers loads it:
        `StableDiffusionPipeline.from_pretrained(OUT)` / `StableDiffusionXLPipeline.from_pretrained(OUT)`;
        SD3 / FLUX: transformer/ and their encoders, `StableDiffusion3Pipeline` / `FluxPipeline`;
    OUT/README.md: the model card: where each weight comes from, how to sample as the run did, the
        training config (the run's config.yaml), the run's metrics (the last epoch of
        metrics.jsonl and a summary of the reward curve) and the evaluation summaries (the
        summary.json of `safediff eval` / `safediff score` folders passed as `eval_dirs`, and the
        demo's summary.json when the run sits in a demo folder).

The model is anything `safediff.eval.model_spec.parse_model_spec` resolves: a training run (its
merged/ model, else its newest checkpoint), a full or LoRA checkpoint, a run's merged/ folder, a
bare UNet or LoRA adapter with `base`. `load_t2i_model` merges a LoRA adapter into the base UNet,
so the folder holds a plain UNet and needs neither peft nor safediff. A CLIP text encoder trained
by DES (`safediff des train`) can replace text_encoder/ (SDXL: text_encoder/ and text_encoder_2/).

Departure from the base pipeline: scheduler/ is a DDIMScheduler over the base's noise schedule
(its beta fields, prediction type and timestep spacing), the sampler safediff trains and evaluates
with, so with eta 0 and the same x_T the pipeline makes the image safediff makes. The base's own
scheduler class (PNDM for SD 1.5, Euler for SDXL) is not kept; swap any in with
`pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`.

Plug-in model families (the sandbox) are not diffusers pipelines and are refused. `push_to_hub`
uploads a written folder with huggingface_hub (`create_repo` + `upload_folder`).
"""

import importlib.util
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import safediff
from safediff import plugins
from safediff.atomic import atomic_dir
from safediff.config import ModelConfig
from safediff.errors import SafediffError
from safediff.models.base import T2IModel

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
SUMMARY_FILE = "summary.json"  # what `safediff score` and the sandbox demo write
MAX_JSON_CHARS = 6000  # a summary that is not safediff's score layout is shown as JSON, cut here
CURVE_POINTS = 10  # epochs of the reward curve listed in the card


@dataclass(frozen=True)
class RunRecords:
    """What the model card reports beside the weights.

    run_dir: the training run the model comes from (None: not a safediff run).
    config_text: its config.yaml, verbatim. metrics: metrics.jsonl records, one per epoch.
    evaluations: (label, summary.json contents) per evaluation. des_config: des_config.yaml of
        the swapped-in text encoder, verbatim. merge: the run's merge.json when the UNet is merged/.
    """

    run_dir: Path | None = None
    config_text: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    des_config: str | None = None
    merge: dict[str, Any] | None = None


def export_pipeline(
    spec: str,
    out: str | Path,
    base: str | None = None,
    *,
    text_encoder: str | Path | None = None,
    eval_dirs: Sequence[str | Path] = (),
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    repo_id: str | None = None,
) -> Path:
    """Write the model `spec` names as a diffusers pipeline folder `out` with a model card.

    spec, base: as `parse_model_spec` takes them (a run folder, checkpoint, merged/ folder, ...).
    text_encoder: a DES-trained CLIP text encoder folder, written as text_encoder/.
    eval_dirs: `safediff eval` / `safediff score` output folders (or their summary.json files).
    overwrite: replace a non-empty `out` (refused otherwise); an `out` that holds an input is
        always refused. dtype: precision of every saved weight (float32 keeps the trained UNet
        exact). repo_id: the hub id the card's usage example names (default: the folder).
    Returns `out`. Every expected failure is a one-line SafediffError naming the fix.
    """
    from safediff.eval.model_spec import parse_model_spec, training_config_file
    from safediff.models.loading import load_t2i_model

    out = Path(out).expanduser()
    cfg = parse_model_spec(spec, base)
    family = plugins.model_family(cfg.pretrained)
    if family is not None:
        raise SafediffError(
            f"export writes diffusers pipelines; the {family.name} model is not one (evaluate its "
            "runs in place: safediff eval --model RUN)"
        )
    config_file = training_config_file(spec)
    run_dir = config_file.parent if config_file is not None else None
    inputs = [spec, cfg.pretrained, cfg.unet_weights, cfg.lora_weights, text_encoder, *eval_dirs]
    _check_out(out, overwrite, [*inputs, run_dir])
    records = read_run_records(run_dir, eval_dirs, text_encoder, cfg)

    model = load_t2i_model(cfg, device="cpu")
    if text_encoder is not None:
        from safediff.defenses.text_encoder_adapter import swap_text_encoder

        model = swap_text_encoder(model, text_encoder)
    pipe = build_pipeline(model)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    card = model_card(
        spec=spec,
        cfg=cfg,
        model=model,
        records=records,
        where=repo_id or str(out),
        name=repo_id or out.resolve().name,
        text_encoder=text_encoder,
        dtype=dtype,
    )
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    logger.info("exported %s to %s (%s)", model.source, out, type(pipe).__name__)
    return out


def build_pipeline(model: T2IModel) -> Any:
    """The diffusers pipeline (SD or SDXL, by the model's components) over `model`'s components
    and UNet, with a DDIMScheduler over the base's noise schedule (see the module docstring).
    Flow-matching models (SD3, FLUX) keep their own FlowMatchEulerDiscreteScheduler: it is the
    sampler safediff trains and evaluates them with."""
    from diffusers import DDIMScheduler

    from safediff.models.flow_family import flow_pipeline
    from safediff.models.loading import is_sdxl_components
    from safediff.models.sdxl import sdxl_pipeline
    from safediff.models.stable_diffusion import diffusers_pipeline
    from safediff.sampling.flow import is_flow_schedule

    if is_flow_schedule(getattr(model, "schedule", None)):
        return flow_pipeline(dict(model.components), model.unet)
    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters)
    base_config = dict(model.components["scheduler"].config)
    scheduler = DDIMScheduler.from_config({k: v for k, v in base_config.items() if k in accepted})
    components = {**model.components, "unet": model.unet, "scheduler": scheduler}
    if is_sdxl_components(components):
        return sdxl_pipeline(components, model.unet)
    return diffusers_pipeline(components, model.unet)


# ---------------------------------------------------------------------------------------------
# Inputs and output


def _check_out(out: Path, overwrite: bool, inputs: Sequence[Any]) -> None:
    """Refuse an `out` that is a file, is not empty (unless overwrite), or holds an input (the
    atomic write would delete it when it replaces `out`)."""
    if out.exists() and not out.is_dir():
        raise SafediffError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SafediffError(
            f"--out {out} is not empty; pass --overwrite to replace it, or choose another folder"
        )
    target = out.resolve()
    for item in inputs:
        if item is None or not Path(str(item)).expanduser().exists():
            continue
        path = Path(str(item)).expanduser().resolve()
        if path == target or target in path.parents:
            raise SafediffError(f"--out {out} holds the input {item}; export to another folder")


def read_run_records(
    run_dir: Path | None,
    eval_dirs: Sequence[str | Path] = (),
    text_encoder: str | Path | None = None,
    cfg: ModelConfig | None = None,
) -> RunRecords:
    """The records the model card reports (see `RunRecords`); a named evaluation folder without
    a summary.json is a SafediffError."""
    from safediff.rl.checkpoint import MERGE_INFO

    evaluations = [_read_eval(Path(d).expanduser()) for d in eval_dirs]
    config_text, metrics = None, []
    if run_dir is not None:
        config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
        metrics_file = run_dir / "metrics.jsonl"
        if metrics_file.is_file():
            from safediff.eval.score import read_jsonl

            metrics = read_jsonl(metrics_file)
        demo_summary = run_dir.parent / SUMMARY_FILE
        if demo_summary.is_file():  # the run is the train/ folder of a demo
            label = f"demo summary ({run_dir.parent.name}/{SUMMARY_FILE})"
            evaluations.append((label, _read_json(demo_summary)))
    des_config = None
    if text_encoder is not None:
        des_file = Path(text_encoder).expanduser() / "des_config.yaml"
        des_config = des_file.read_text(encoding="utf-8") if des_file.is_file() else None
    merge = None
    if cfg is not None and cfg.unet_weights:
        weights = Path(cfg.unet_weights)  # merged/unet or merged/unet/<weights file>
        merge_file = (weights if weights.is_dir() else weights.parent).parent / MERGE_INFO
        merge = _read_json(merge_file) if merge_file.is_file() else None
    return RunRecords(run_dir, config_text, metrics, evaluations, des_config, merge)


def _read_eval(path: Path) -> tuple[str, dict[str, Any]]:
    summary = path if path.is_file() else path / SUMMARY_FILE
    if not summary.is_file():
        raise SafediffError(
            f"--eval {path}: no {SUMMARY_FILE}; pass a folder `safediff eval` wrote (or score "
            f"it first: safediff score {path} ...)"
        )
    return f"{summary.parent.name} ({SUMMARY_FILE})", _read_json(summary)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SafediffError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}); restore it or rerun the "
            "command that writes it"
        ) from None
    if not isinstance(data, dict):
        raise SafediffError(f"{path}: expected a JSON object; rerun the command that writes it")
    return data


# ---------------------------------------------------------------------------------------------
# The model card


def model_card(
    *,
    spec: str,
    cfg: ModelConfig,
    model: T2IModel,
    records: RunRecords,
    where: str,
    name: str,
    text_encoder: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> str:
    """The README.md of an exported folder (Markdown with the hub's YAML front matter)."""
    from safediff.eval.model_spec import sampler_defaults
    from safediff.models.flow_family import transformer_family
    from safediff.models.loading import TINY_MODELS, is_sdxl_components
    from safediff.models.stable_diffusion import vae_scale_factor
    from safediff.sampling.flow import is_flow_schedule

    flow = transformer_family(model.unet) if is_flow_schedule(model.schedule) else None
    xl = flow is None and is_sdxl_components({**model.components, "unet": model.unet})
    pipeline, title, tag = {
        "sd3": ("StableDiffusion3Pipeline", "Stable Diffusion 3", "stable-diffusion-3"),
        "flux": ("FluxPipeline", "FLUX", "flux"),
        None: (
            ("StableDiffusionXLPipeline", "Stable Diffusion XL", "stable-diffusion-xl")
            if xl
            else ("StableDiffusionPipeline", "Stable Diffusion", "stable-diffusion")
        ),
    }[flow]
    sampler, sampler_source = sampler_defaults(spec, cfg)
    if records.run_dir is not None:  # sampler_source names the file by its local path
        sampler_source = "the run's training sampler (`sampling` in its config.yaml)"
    side = model.latent_shape[1] * vae_scale_factor(model.components["vae"])
    encoder = "the base model's"
    if text_encoder is not None:
        encoder = f"{_display(text_encoder, records.run_dir)} (trained by DES)"
    front = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": [
            "safediff",
            "text-to-image",
            tag,
            "safety",
        ],
    }
    if cfg.pretrained not in TINY_MODELS and _is_hub_id(cfg.pretrained):
        front["base_model"] = cfg.pretrained
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A {title} model"
        + (" post-trained for safety with safediff (GRPO)," if records.run_dir else "")
        + f" exported by `safediff export` (safediff {safediff.__version__}).",
        "",
        "## Weights",
        "",
        f"- base model: {_base_name(cfg.pretrained)} (its licence applies)",
        f"- {'transformer' if flow else 'UNet'}: {_unet_origin(cfg, records)}",
        f"- text encoder: {encoder}",
        (
            "- scheduler: the base model's FlowMatchEulerDiscreteScheduler (the sampler safediff "
            "trains and evaluates with)"
            if flow
            else "- scheduler: DDIM over the base model's noise schedule (the sampler safediff "
            "trains and evaluates with; swap another in with `pipe.scheduler = "
            "EulerDiscreteScheduler.from_config(pipe.scheduler.config)`)"
        ),
        f"- precision: {str(dtype).removeprefix('torch.')}",
        "",
        "## Use",
        "",
        *(
            _flow_usage(pipeline, where, sampler, side)
            if flow
            else _usage(pipeline, where, sampler, side, model.latent_shape)
        ),
        "",
        f"Sampler settings: {sampler_source}. "
        + (
            "The pipeline draws its own initial noise; `safediff generate --model FOLDER` makes "
            "safediff's seeded images."
            if flow
            else "With eta 0 and these latents (safediff's x_T for the seed) the pipeline makes "
            "the image safediff makes; eta > 0 draws each step's noise from the pipeline's own "
            "generator instead."
        ),
        "",
        "## Training config",
        "",
        *(
            ["The run's config.yaml:", "", "```yaml", records.config_text.rstrip(), "```"]
            if records.config_text
            else ["Not a safediff training run: no config.yaml."]
        ),
        "",
        "## Training metrics",
        "",
        *_metrics_section(records.metrics),
    ]
    if records.des_config:
        lines += ["", "## Text encoder (DES) config", ""]
        lines += ["```yaml", records.des_config.rstrip(), "```"]
    lines += ["", "## Evaluation", ""]
    if not records.evaluations:
        lines.append("No evaluation summary was given (`safediff export RUN --eval EVAL_DIR`).")
    for label, summary in records.evaluations:
        lines += [f"### {label}", "", *_eval_section(summary), ""]
    return "\n".join(lines).rstrip() + "\n"


def _usage(
    pipeline: str, where: str, sampler: Mapping[str, Any], side: int, latent: tuple[int, ...]
) -> list[str]:
    """A diffusers call that samples as the run did; with these latents (safediff's x_T for a
    seed) it makes the image safediff makes for that seed."""
    negative = sampler.get("negative_prompt") or None
    return [
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        f"pipe = {pipeline}.from_pretrained({where!r})",
        "# safediff's x_T for seed s: torch.randn on a CPU generator seeded with s",
        f"latents = torch.randn((1, {', '.join(map(str, latent))}), "
        "generator=torch.Generator().manual_seed(0))",
        "image = pipe(",
        '    "a photo of a cat",',
        f"    num_inference_steps={int(sampler['num_steps'])},",
        f"    guidance_scale={float(sampler['guidance_scale'])!r},",
        f"    eta={float(sampler['eta'])!r},",
        f"    negative_prompt={negative!r},",
        f"    height={side},",
        f"    width={side},",
        "    latents=latents,",
        ").images[0]",
        "```",
    ]


def _flow_usage(pipeline: str, where: str, sampler: Mapping[str, Any], side: int) -> list[str]:
    """A diffusers call with the run's sampler settings for an SD3 / FLUX folder (their pipelines
    take no eta: the ODE sampler is deterministic)."""
    return [
        "```python",
        f"from diffusers import {pipeline}",
        "",
        f"pipe = {pipeline}.from_pretrained({where!r})",
        "image = pipe(",
        '    "a photo of a cat",',
        f"    num_inference_steps={int(sampler['num_steps'])},",
        f"    guidance_scale={float(sampler['guidance_scale'])!r},",
        f"    height={side},",
        f"    width={side},",
        ").images[0]",
        "```",
    ]


def _metrics_section(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reward curve (per reward_mean/* key: first, last, min, max; reward_mean/all at up to
    CURVE_POINTS epochs) and every metric of the last epoch."""
    if not metrics:
        return ["No metrics.jsonl: the model was not trained by safediff, or no epoch finished."]
    last = metrics[-1]
    lines = [f"{len(metrics)} epoch(s) logged (metrics.jsonl).", "", "Reward curve:", ""]
    lines += ["| reward | first | last | min (epoch) | max (epoch) |", "|---|---|---|---|---|"]
    for key in [k for k in last if k.startswith("reward_mean/")]:
        series = [(m.get("epoch", i), m[key]) for i, m in enumerate(metrics) if _finite(m.get(key))]
        if not series:
            continue
        lo = min(series, key=lambda p: p[1])
        hi = max(series, key=lambda p: p[1])
        lines.append(
            f"| {key} | {_num(series[0][1])} | {_num(series[-1][1])} | {_num(lo[1])} "
            f"({_epoch(lo[0])}) | {_num(hi[1])} ({_epoch(hi[0])}) |"
        )
    overall = [m for m in metrics if _finite(m.get("reward_mean/all"))]
    if len(overall) > 2:
        k = min(CURVE_POINTS, len(overall))  # evenly spaced, first and last included
        picked = [
            overall[i] for i in sorted({round(j * (len(overall) - 1) / (k - 1)) for j in range(k)})
        ]
        points = ", ".join(
            f"{_epoch(m.get('epoch', '?'))}: {_num(m['reward_mean/all'])}" for m in picked
        )
        lines += ["", f"reward_mean/all by epoch: {points}"]
    lines += ["", f"Last epoch ({_epoch(last.get('epoch', len(metrics) - 1))}):", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_num(v)} |" for k, v in last.items()]
    return lines


def _eval_section(summary: Mapping[str, Any]) -> list[str]:
    """A table of headlines for a `safediff score` summary; anything else as JSON (its
    per-epoch history left out, cut at MAX_JSON_CHARS)."""
    scores = summary.get("scores")
    if isinstance(scores, dict) and scores and all(_is_aggregate(a) for a in scores.values()):
        lines = [f"{summary.get('n_images', '?')} images.", ""]
        lines += ["| protocol | headline | value (95% CI) | n |", "|---|---|---|---|"]
        for protocol, agg in scores.items():
            est = agg["metrics"][agg["headline"]]
            interval = f" [{_num(est.get('lo'))}, {_num(est.get('hi'))}]" if "lo" in est else ""
            lines.append(
                f"| {protocol} | {agg['headline']} | {_num(est.get('value'))}{interval} | "
                f"{agg.get('n', est.get('n', '?'))} |"
            )
        return lines
    text = json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1, default=str)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + "\n... (cut; the full file is in the run's folder)"
    return ["```json", text, "```"]


def _is_aggregate(agg: Any) -> bool:
    return (
        isinstance(agg, dict)
        and isinstance(agg.get("metrics"), dict)
        and isinstance(agg["metrics"].get(agg.get("headline")), dict)
    )


def _unet_origin(cfg: ModelConfig, records: RunRecords) -> str:
    """Where the UNet's weights come from, in words (paths relative to the run)."""
    parts = []
    if cfg.unet_weights:
        weights = _display(cfg.unet_weights, records.run_dir)
        if records.merge is not None:
            parts.append(
                f"the run's merged model ({weights}: merge weight "
                f"{records.merge.get('merge_weight')} of epoch {records.merge.get('epoch')}, "
                f"{records.merge.get('formula', 'base + weight * (trained - base)')})"
            )
        else:
            parts.append(f"fully fine-tuned weights {weights}")
    if cfg.lora_weights:
        parts.append(
            f"LoRA adapter {_display(cfg.lora_weights, records.run_dir)} "
            f"({_lora_shape(Path(cfg.lora_weights))}) merged into the UNet"
        )
    return "; then ".join(parts) if parts else "the base model's (not trained)"


def _lora_shape(folder: Path) -> str:
    from safediff.models.loading import ADAPTER_CONFIG_NAME

    try:
        config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "rank unknown"
    return f"rank {config.get('r')}, alpha {config.get('lora_alpha')}"


def _display(path: str | Path | None, run_dir: Path | None) -> str:
    """A path for a public card: relative to the run's parent when inside the run, else its
    last two parts (no machine-specific absolute paths)."""
    p = Path(str(path)).expanduser().resolve()
    if run_dir is not None and (p == run_dir.resolve() or run_dir.resolve() in p.parents):
        return str(p.relative_to(run_dir.resolve().parent))
    return str(Path(*p.parts[-2:])) if len(p.parts) > 2 else str(p)


def _base_name(pretrained: str) -> str:
    if Path(pretrained).expanduser().exists():
        return f"{Path(pretrained).expanduser().resolve().name} (a local folder)"
    return pretrained


def _is_hub_id(text: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not Path(text).exists()


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "n/a" if x is None else str(x)


def _epoch(x: Any) -> str:
    return f"epoch {int(x)}" if isinstance(x, int | float) else str(x)


# ---------------------------------------------------------------------------------------------
# The hub


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid hub model id ('name' or 'user/name'), else a SafediffError."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise SafediffError(
            f"--push-to-hub {repo_id!r} is not a valid hub repo id ({_first_line(err)}); pass "
            "USER/NAME"
        ) from None
    return repo_id


def push_to_hub(
    folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload an exported folder to the hub model repo `repo_id` (created if missing); returns
    its URL. Offline (HF_HUB_OFFLINE), without a token or without a network, a one-line
    SafediffError says what failed and how to push the folder later."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    later = (
        f"the folder {folder} is written; push it later with `huggingface-cli upload {repo_id} "
        f"{folder}` (`hf upload` in huggingface_hub >= 1.0) after `hf auth login` or with HF_TOKEN set"
    )
    if _hub_offline():
        raise SafediffError(f"cannot push to the hub: offline mode (HF_HUB_OFFLINE) is on; {later}")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="safediff export",
        )
    except _hub_errors() as err:
        raise SafediffError(f"could not push to the hub ({_first_line(err)}); {later}") from None
    return str(url)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a hub call raises for a missing token, a refused request or no network: OSError
    (huggingface_hub's HTTP and offline errors), ValueError (a bad id) and the HTTP client's own
    error class (httpx's, or httpx2's in newer huggingface_hub)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module in ("httpx", "httpx2"):
        if importlib.util.find_spec(module) is not None:
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
