"""`safediff export`: a trained tiny SD / SDXL run as a diffusers pipeline folder + model card.

The folder must load in plain diffusers and, with its DDIM scheduler, eta 0 and safediff's x_T for
a seed, make the image safediff makes from the run; the card carries the run's config, metrics and
evaluation; bad inputs and an offline push are one-line errors.
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open

from safediff.cli import main
from safediff.config import ModelConfig, load_config
from safediff.errors import SafediffError
from safediff.eval.model_spec import parse_model_spec
from safediff.eval.score import score_run
from safediff.eval.scorers.base import make_aggregate, summarize_values
from safediff.export import export_pipeline
from safediff.models.loading import load_t2i_model
from safediff.rl.trainer import train
from safediff.sampling.sample import SamplerSettings, sample
from safediff.seeding import generator

PROMPT = "a red apple on a table"
STEPS, GUIDANCE = 3, 2.0  # the tiny run's sampler (conftest's TINY_GRPO_OVERRIDES)


def _train(root: Path, overrides: Sequence[str], *extra: str) -> Path:
    cfg = load_config(None, [*overrides, f"run.output_dir={root}", *extra])
    return Path(train(cfg)["run_dir"])


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, tiny_grpo_overrides):
    """A one-epoch full fine-tune of tiny-sd, as the train/ folder of a demo (with the demo's
    summary.json beside it)."""
    demo = tmp_path_factory.mktemp("demo")
    (demo / "summary.json").write_text(json.dumps({"mode": "quick", "unsafe_rate_after": 0.125}))
    return _train(demo / "train", tiny_grpo_overrides)


@pytest.fixture(scope="module")
def sd_lora_run(tmp_path_factory, tiny_grpo_overrides):
    root = tmp_path_factory.mktemp("lora") / "run"
    return _train(root, tiny_grpo_overrides, "lora.enabled=true", "lora.rank=2")


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_grpo_overrides):
    root = tmp_path_factory.mktemp("sdxl") / "run"
    return _train(root, tiny_grpo_overrides, "model.pretrained=tiny-sdxl")


def _safediff_image(run: Path, seed: int) -> torch.Tensor:
    """safediff's image of PROMPT from the run's model: [H, W, 3] in [0, 1]."""
    model = load_t2i_model(parse_model_spec(str(run)))
    settings = SamplerSettings(num_steps=STEPS, eta=0.0, guidance_scale=GUIDANCE)
    images = sample(model, [PROMPT], [generator(seed)], settings).trajectory.images
    return images[0].permute(1, 2, 0)


def _pipeline_image(pipe, seed: int) -> torch.Tensor:
    """The diffusers pipeline's image of PROMPT from safediff's x_T for `seed`: [H, W, 3]."""
    c = pipe.unet.config.in_channels
    side = pipe.unet.config.sample_size
    latents = torch.randn((1, c, side, side), generator=generator(seed))  # as safediff draws x_T
    with torch.no_grad():
        out = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            eta=0.0,
            latents=latents,
            output_type="pt",
        )
    return out.images[0].permute(1, 2, 0)


def _assert_same_images(run: Path, pipe) -> None:
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    for seed in (0, 7):
        ours, theirs = _safediff_image(run, seed), _pipeline_image(pipe, seed)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert (_safediff_image(run, 0) - _safediff_image(run, 7)).abs().max() > 1e-3  # not vacuous


def _unet_differs_from_base(folder: Path, base: str) -> bool:
    exported = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    original = load_t2i_model(ModelConfig(pretrained=base)).unet.state_dict()
    return any(not torch.equal(exported[k], original[k]) for k in original)


# ---------------------------------------------------------------------------------------------
# The folder loads in plain diffusers and makes safediff's image


def test_full_sd_run_exports_a_pipeline_that_makes_safediffs_image(sd_run, tmp_path):
    out = export_pipeline(str(sd_run), tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {
        "model_index.json",
        "README.md",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    }
    assert not list(tmp_path.glob(".export.tmp-*"))  # written atomically, no temporary left
    _assert_same_images(sd_run, StableDiffusionPipeline.from_pretrained(out))
    assert _unet_differs_from_base(out, "tiny-sd")  # the trained UNet, not the base's
    # the folder is also a model safediff loads (e.g. `safediff eval --model OUT`)
    assert parse_model_spec(str(out)) == ModelConfig(pretrained=str(out.resolve()))


def test_lora_run_is_exported_with_the_adapter_merged(sd_lora_run, tmp_path):
    out = export_pipeline(str(sd_lora_run), tmp_path / "export")
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        names = list(fh.keys())  # safe_open is not iterable
    assert names and not [k for k in names if "lora" in k]  # a plain UNet, no adapter layers
    _assert_same_images(sd_lora_run, StableDiffusionPipeline.from_pretrained(out))
    assert _unet_differs_from_base(out, "tiny-sd")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert re.search(r"UNet: LoRA adapter run/checkpoints/checkpoint-0*1/lora \(rank 2,", card)


def test_sdxl_run_exports_a_pipeline_that_makes_safediffs_image(sdxl_run, tmp_path):
    out = export_pipeline(str(sdxl_run), tmp_path / "export")
    assert (out / "text_encoder_2").is_dir() and (out / "tokenizer_2").is_dir()
    pipe = StableDiffusionXLPipeline.from_pretrained(out, add_watermarker=False)
    _assert_same_images(sdxl_run, pipe)
    assert _unet_differs_from_base(out, "tiny-sdxl")
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()


def test_a_runs_merged_model_is_what_is_exported(tiny_grpo_overrides, tmp_path):
    run = _train(tmp_path / "run", tiny_grpo_overrides, "run.merge_weight=0.5")
    out = export_pipeline(str(run), tmp_path / "export")
    exported = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    merged = UNet2DConditionModel.from_pretrained(run / "merged" / "unet").state_dict()
    assert exported.keys() == merged.keys()
    assert all(torch.equal(exported[k], merged[k]) for k in merged)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "UNet: the run's merged model (run/merged/unet: merge weight 0.5 of epoch 1" in card


def test_des_text_encoder_goes_into_text_encoder(sd_run, tmp_path):
    encoder = load_t2i_model(ModelConfig(pretrained="tiny-sd")).components["text_encoder"]
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.01)
    encoder.save_pretrained(tmp_path / "des")
    (tmp_path / "des" / "des_config.yaml").write_text("concept: nudity\nsteps: 3\n")
    out = export_pipeline(str(sd_run), tmp_path / "export", text_encoder=tmp_path / "des")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(pipe.text_encoder.state_dict()[k], v, rtol=0, atol=0)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "des (trained by DES)" in card and "concept: nudity" in card


# ---------------------------------------------------------------------------------------------
# The model card


class MeanBrightness:
    """A real `Scorer` (the protocol's layout through `make_aggregate`): mean pixel value."""

    protocol, kind, value_key, value_type = "brightness/mean", "utility", "brightness", "continuous"

    def score_images(self, images, prompts=None):
        return [{"brightness": float(img.mean())} for img in images]

    def aggregate(self, records):
        values = [r["brightness"] for r in records]
        est = summarize_values(values, "continuous")
        metrics = {"brightness": est}
        return make_aggregate(
            self.protocol, self.kind, len(values), "brightness", metrics, "brightness", "continuous"
        )


def test_model_card_carries_config_metrics_and_evaluation(sd_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n", encoding="utf-8")
    evaluation = tmp_path / "eval"
    argv = ["generate", "--model", str(sd_run), "--prompts", str(prompts), "--out", str(evaluation)]
    assert main([*argv, "--steps", "2", "--no-progress"]) == 0
    summary = score_run(evaluation, [MeanBrightness()])
    out = export_pipeline(str(sd_run), tmp_path / "export", eval_dirs=[evaluation])
    card = (out / "README.md").read_text(encoding="utf-8")

    assert card.startswith("---\nlibrary_name: diffusers\n")
    assert (sd_run / "config.yaml").read_text(encoding="utf-8").strip() in card  # the config
    last = json.loads((sd_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "1 epoch(s) logged" in card and "Last epoch (epoch 0)" in card
    assert f"| reward_mean/all | {last['reward_mean/all']:.4g} |" in card
    assert f"| train/loss | {last['train/loss']:.4g} |" in card
    headline = summary["scores"]["brightness/mean"]["metrics"]["brightness"]["value"]
    assert f"| brightness/mean | brightness | {headline:.4g} [" in card  # the evaluation
    assert "demo summary (" in card and '"unsafe_rate_after": 0.125' in card  # the demo's
    assert "(cut;" not in card and str(evaluation) not in card  # the eval named by its folder
    assert "num_inference_steps=3," in card and "guidance_scale=2.0," in card  # run's sampler


# ---------------------------------------------------------------------------------------------
# The hub and bad inputs: one line each


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # log lines, then the error
    errors = [line for line in lines if line.startswith("safediff: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_push_to_hub_offline_fails_in_one_line_after_writing(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "export"
    err = _one_line_error(capsys, ["export", "tiny-sd", "--out", str(out), "--push-to-hub", "me/m"])
    assert "offline" in err and f"huggingface-cli upload me/m {out}" in err
    assert (out / "model_index.json").is_file()  # the folder is kept for a later upload


def test_push_to_hub_without_a_token_fails_in_one_line(monkeypatch, capsys, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    def no_token(*args, **kwargs):
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_token)
    out = tmp_path / "export"
    err = _one_line_error(capsys, ["export", "tiny-sd", "--out", str(out), "--push-to-hub", "me/m"])
    assert "no token found" in err and "hf auth login" in err


def test_bad_inputs_are_one_line_errors(sd_run, capsys, tmp_path):
    out = tmp_path / "export"
    err = _one_line_error(capsys, ["export", "sandbox", "--out", str(out)])
    assert "export writes diffusers pipelines; the sandbox model is not one" in err
    err = _one_line_error(capsys, ["export", str(tmp_path / "no-such-run"), "--out", str(out)])
    assert "not found" in err and "no-such-run" in err
    err = _one_line_error(
        capsys, ["export", "tiny-sd", "--out", str(out), "--push-to-hub", "a/b/c"]
    )
    assert "not a valid hub repo id" in err and not out.exists()  # refused before exporting
    err = _one_line_error(capsys, ["export", "tiny-sd", "--out", str(out), "--eval", str(tmp_path)])
    assert "no summary.json" in err and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _one_line_error(capsys, ["export", "tiny-sd", "--out", str(out)])
    assert "is not empty; pass --overwrite" in err and (out / "keep.txt").is_file()
    assert main(["export", "tiny-sd", "--out", str(out), "--overwrite"]) == 0
    assert (out / "model_index.json").is_file() and not (out / "keep.txt").exists()

    # --overwrite never replaces a folder that holds the input (it would delete the run)
    err = _one_line_error(
        capsys, ["export", str(sd_run), "--out", str(sd_run.parent), "--overwrite"]
    )
    assert "holds the input" in err and (sd_run / "config.yaml").is_file()


def test_dtype_sets_the_precision_of_every_saved_weight(tmp_path):
    out = tmp_path / "export"
    assert main(["export", "tiny-sd", "--out", str(out), "--dtype", "float16"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float16
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}  # noqa: SIM118
    assert "- precision: float16" in (out / "README.md").read_text(encoding="utf-8")


def test_sdxl_with_an_sd_des_text_encoder_is_refused(tmp_path):
    encoder = load_t2i_model(ModelConfig(pretrained="tiny-sd")).components["text_encoder"]
    encoder.save_pretrained(tmp_path / "des")
    with pytest.raises(SafediffError, match="no text_encoder/ text encoder folder"):
        export_pipeline("tiny-sdxl", tmp_path / "export", text_encoder=tmp_path / "des")
    assert not (tmp_path / "export").exists()


def test_sd3_run_exports_a_pipeline_that_makes_safediffs_image(tiny_grpo_overrides, tmp_path):
    """A flow model's export is a StableDiffusion3Pipeline folder with its own flow scheduler;
    with safediff's x_T as latents it makes safediff's ODE image (eta 0)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    run = _train(
        tmp_path / "run",
        tiny_grpo_overrides,
        "model.pretrained=tiny-sd3",
        "sampling.eta=0.7",
        "grpo.clip_range=0.2",
    )
    out = export_pipeline(str(run), tmp_path / "export")
    assert (out / "transformer").is_dir() and (out / "text_encoder_3").is_dir()
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    trained = load_t2i_model(parse_model_spec(str(run))).unet.state_dict()
    exported = SD3Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    model = load_t2i_model(parse_model_spec(str(run)))
    settings = SamplerSettings(num_steps=STEPS, eta=0.0, guidance_scale=GUIDANCE)
    traj = sample(model, [PROMPT], [generator(0)], settings).trajectory
    ours, x_t = traj.images[0], traj.latents[:, 0]  # safediff's image and its x_T
    side = model.latent_shape[1] * pipe.vae_scale_factor
    with torch.no_grad():
        theirs = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=side,
            width=side,
            max_sequence_length=model.components["max_sequence_length"],
            latents=x_t.clone(),
            output_type="pt",
        ).images[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "eta=" not in card
