"""`safediff generate`: per-row protocol vs diffusers' pipeline, batch and process invariance,
resume, safe file names, and model specs in every form."""

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from safediff.config import ModelConfig, TrainConfig, save_config
from safediff.errors import SafediffError
from safediff.eval.generate import (
    generate,
    image_stem,
    is_complete,
    latent_shape_for,
    main,
    plan_jobs,
)
from safediff.eval.model_spec import parse_model_spec
from safediff.models.loading import load_t2i_model, save_unet_safetensors
from safediff.models.stable_diffusion import diffusers_pipeline
from safediff.models.tiny_sd import save_tiny_sd
from safediff.prompt_sets import PromptRow, load_prompt_set
from safediff.seeding import generator

STEPS = 4


@pytest.fixture(scope="module")
def model():
    return load_t2i_model(ModelConfig(pretrained="tiny-sd"))


def mixed_rows() -> list[PromptRow]:
    """Rows with their own seeds, guidance and sizes, and rows that take the defaults."""
    specs = [
        dict(prompt="a red square", seed=11, guidance=3.0, width=24, height=16, case_number="c0"),
        dict(prompt="a blue circle", case_number="c1"),
        dict(prompt="two dogs", seed=5, guidance=3.0, case_number="c2"),
        dict(prompt="a cat on a mat", seed=7, width=24, height=16, guidance=3.0, case_number="c3"),
        dict(prompt="fire and smoke", guidance=1.0, case_number="c4"),
        dict(prompt="a green tree", seed=2**40, case_number="c5"),
    ]
    return [PromptRow(index=i, **s) for i, s in enumerate(specs)]


def read_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}


def run(model, rows, out, **kw):
    kw = {"num_steps": STEPS, "batch_size": 4, "progress": False, **kw}
    return generate(model, rows, out, **kw)


# ---------------------------------------------------------------------------------------------
# Sizes and names


def test_latent_shape_for(model):
    assert model.latent_shape == (4, 8, 8)  # tiny SD: 16 x 16 images, VAE factor 2
    assert latent_shape_for(model, 16, 16) == (4, 8, 8)
    assert latent_shape_for(model, 24, 16) == (4, 8, 12)  # (C, height / 2, width / 2)
    with pytest.raises(SafediffError, match=r"image size 15x16 .* multiples of its VAE factor 2"):
        latent_shape_for(model, 15, 16)


def test_bad_row_size_is_an_error_before_any_image(model, tmp_path):
    rows = [PromptRow(0, "ok"), PromptRow(1, "odd", width=17, case_number="k9")]
    with pytest.raises(SafediffError, match=r"row 1 \(case k9\): image size 17x16"):
        run(model, rows, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.png"))


def test_seed_rule_and_names(model):
    rows = [PromptRow(0, "a", seed=100), PromptRow(1, "b", case_number="x-1"), PromptRow(2, "c")]
    jobs = plan_jobs(model, rows, default_seed=7, default_guidance=4.0, images_per_prompt=2)
    got = [(j.name, j.seed, j.guidance, j.width, j.height) for j in jobs]
    assert got == [
        ("0_0", 100, 4.0, 16, 16),
        ("0_1", 101, 4.0, 16, 16),
        ("x-1_0", 8, 4.0, 16, 16),  # default_seed + row index, + k
        ("x-1_1", 9, 4.0, 16, 16),
        ("2_0", 9, 4.0, 16, 16),
        ("2_1", 10, 4.0, 16, 16),
    ]


def test_file_names_never_contain_prompt_text(model, tmp_path):
    out = tmp_path / "deep" / "out"
    nasty = ["../../etc/passwd", "a/b\\c", "/abs/path.png", "..", "x" * 300, "ok?*<>|"]
    rows = [PromptRow(i, p, case_number=p if i % 2 else None) for i, p in enumerate(nasty)]
    rows.append(PromptRow(len(rows), "fine", case_number="case_7-B"))
    assert [image_stem(r) for r in rows] == ["0", "1", "2", "3", "4", "5", "case_7-B"]
    result = run(model, rows, out, num_steps=1)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    names = sorted(f"{r['name']}.png" for r in result.records)
    assert files == sorted(
        [Path("deep/out/generation.jsonl"), Path("deep/out/run.json")]
        + [Path("deep/out/images") / n for n in names]
    )
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+_\d+\.png", n) for n in names)
    # the prompt text is kept where it belongs: in the records
    assert [r["prompt"] for r in result.records] == [*nasty, "fine"]


def test_colliding_names_are_an_error(model, tmp_path):
    rows = [PromptRow(0, "a", case_number="1"), PromptRow(1, "b", case_number="bad name")]
    with pytest.raises(SafediffError, match=r"rows 0 and 1 would both write images/1_\*\.png"):
        run(model, rows, tmp_path)
    rows = [PromptRow(0, "a", case_number="Ab"), PromptRow(1, "b", case_number="aB")]
    with pytest.raises(SafediffError, match=r"rows 0 and 1"):  # case-insensitive file systems
        run(model, rows, tmp_path)


# ---------------------------------------------------------------------------------------------
# The protocol, against diffusers' own pipeline


def test_each_image_equals_diffusers_pipeline(model, tmp_path):
    """Every image equals StableDiffusionPipeline run with that row's prompt, negative prompt,
    guidance, size and x_T = the first draw of generator(row_seed + k), DDIM eta 0."""
    rows = mixed_rows()[:2]
    result = run(
        model,
        rows,
        tmp_path,
        images_per_prompt=2,
        negative_prompt="blurry",
        default_seed=3,
        default_guidance=6.0,
    )
    pipe = diffusers_pipeline(model.components, model.unet)
    assert len(result.records) == 4
    for rec in result.records:
        latents = torch.randn(
            (1, 4, rec["height"] // 2, rec["width"] // 2), generator=generator(rec["seed"])
        )
        ref = pipe(
            rec["prompt"],
            negative_prompt="blurry",
            height=rec["height"],
            width=rec["width"],
            num_inference_steps=STEPS,
            guidance_scale=rec["guidance"],
            eta=0.0,
            latents=latents,
            output_type="np",
        ).images[0]
        ours = read_pixels(tmp_path / rec["file"]).astype(np.float64) / 255
        assert ours.shape == (rec["height"], rec["width"], 3)
        assert np.abs(ours - ref).max() <= 0.5 / 255 + 1e-5, rec["name"]
    seeds = [(r["name"], r["seed"], r["guidance"]) for r in result.records]
    assert seeds == [("c0_0", 11, 3.0), ("c0_1", 12, 3.0), ("c1_0", 4, 6.0), ("c1_1", 5, 6.0)]
    # different seeds give different images (the comparison above is not vacuous)
    assert not np.array_equal(
        read_pixels(tmp_path / "images/c1_0.png"), read_pixels(tmp_path / "images/c1_1.png")
    )


def test_batched_equals_one_at_a_time(model, tmp_path):
    rows = mixed_rows()
    batched = run(model, rows, tmp_path / "b4", batch_size=4, images_per_prompt=2)
    single = run(model, rows, tmp_path / "b1", batch_size=1, images_per_prompt=2)
    assert batched.records == single.records and len(batched.records) == 12
    for rec in batched.records:
        a = read_pixels(tmp_path / "b4" / rec["file"]).astype(int)
        b = read_pixels(tmp_path / "b1" / rec["file"]).astype(int)
        assert np.abs(a - b).max() <= 1, rec["name"]
    # records and run.json describe the run
    lines = (tmp_path / "b4/generation.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == batched.records
    first = batched.records[0]
    assert first == {
        "name": "c0_0",
        "file": "images/c0_0.png",
        "prompt": "a red square",
        "seed": 11,
        "guidance": 3.0,
        "width": 24,
        "height": 16,
        "case_number": "c0",
        "categories": [],
        "row": 0,
        "k": 0,
        "extra": {},
    }
    info = json.loads((tmp_path / "b4/run.json").read_text(encoding="utf-8"))
    assert (info["num_steps"], info["eta"], info["model"], info["images"]) == (
        STEPS,
        0.0,
        "tiny-sd",
        12,
    )
    assert info["generated"] == 12 and info["skipped"] == 0 and info["batch_size"] == 4


def test_interrupted_run_resumes_to_the_same_images(model, tmp_path):
    rows = mixed_rows()
    full = run(model, rows, tmp_path / "full")
    reference = image_bytes(tmp_path / "full")
    assert full.generated == 6

    out = tmp_path / "resumed"
    first = run(model, rows[:4], out)  # an interrupted run: only 4 rows done (like --limit 4)
    assert (first.generated, first.skipped) == (4, 0)
    images = out / "images"
    (images / "c1_0.png").unlink()  # lost
    (images / "c2_0.png").write_bytes(b"")  # truncated to zero bytes
    half = (images / "c3_0.png").read_bytes()
    (images / "c3_0.png").write_bytes(half[: len(half) // 2])  # a partial write
    assert not is_complete(images / "c3_0.png", 24, 16)
    old = 1_000_000_000
    os.utime(images / "c0_0.png", (old, old))

    second = run(model, rows, out)
    assert (second.generated, second.skipped) == (5, 1)
    assert (images / "c0_0.png").stat().st_mtime == old  # a complete image is not regenerated
    assert image_bytes(out) == reference
    assert not [p for p in images.iterdir() if p.name.startswith(".")]  # no temporary files

    third = run(model, rows, out)  # nothing left to do
    assert (third.generated, third.skipped) == (0, 6)
    assert (images / "c0_0.png").stat().st_mtime == old


def test_images_made_with_other_settings_are_refused_or_overwritten(model, tmp_path):
    rows = mixed_rows()[:2]
    run(model, rows, tmp_path / "ref")
    out = tmp_path / "out"
    run(model, rows, out, num_steps=2)  # same names, other sampler settings
    before = image_bytes(out)
    with pytest.raises(
        SafediffError, match=r"2 image\(s\) made with other sampler steps .*--out.*--overwrite"
    ):
        run(model, rows, out)
    assert image_bytes(out) == before  # refused: nothing touched
    again = run(model, rows, out, overwrite=True)
    assert (again.generated, again.skipped) == (2, 0)
    assert image_bytes(out) == image_bytes(tmp_path / "ref")
    with pytest.raises(SafediffError, match="negative prompt"):
        run(model, rows, out, negative_prompt="x")
    assert run(model, rows, out, negative_prompt="x", overwrite=True).generated == 2
    # a row's own settings (prompt, seed, guidance, size) changing regenerates that row's images
    changed = [dataclasses.replace(rows[0], prompt="another prompt"), rows[1]]
    result = run(model, changed, out, negative_prompt="x")
    assert (result.generated, result.skipped) == (1, 1)


def test_scheduler_is_recorded_and_a_rerun_with_another_is_refused(model, tmp_path, capsys):
    """--scheduler lms: run.json "sampler", each image's metadata and the key name it; a rerun
    with euler into the folder is refused naming the scheduler, --overwrite regenerates; an image
    made before schedulers were recorded (DDIM) is not refused, only regenerated."""
    rows = mixed_rows()[:2]
    out = tmp_path / "lms"
    run(model, rows, out, scheduler="lms")
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["sampler"] == "lms" and info["made_with"]["scheduler"] == "lms"
    for line in (out / "generation.jsonl").read_text(encoding="utf-8").splitlines():
        with Image.open(out / json.loads(line)["file"]) as im:
            assert json.loads(im.info["safediff"])["scheduler"] == "lms"
    lms = image_bytes(out)
    assert lms != image_bytes(run(model, rows, tmp_path / "ddim").out_dir)  # it did use LMS
    with pytest.raises(SafediffError, match=r"2 image\(s\) made with other sampler scheduler "):
        run(model, rows, out, scheduler="euler")
    assert image_bytes(out) == lms
    assert run(model, rows, out, scheduler="lms").skipped == 2  # same scheduler: resumes
    assert run(model, rows, out, scheduler="euler", overwrite=True).generated == 2
    with pytest.raises(SafediffError, match="unknown scheduler 'nope'; choose one of: ddim, "):
        run(model, rows, out, scheduler="nope")

    old = tmp_path / "ddim" / "images" / "c0_0.png"  # as safediff wrote it before --scheduler
    with Image.open(old) as im:
        meta = json.loads(im.info["safediff"])
        pixels = im.copy()
    del meta["scheduler"]
    info = PngImagePlugin.PngInfo()
    info.add_text("safediff", json.dumps(meta, sort_keys=True))
    pixels.save(old, pnginfo=info)
    again = run(model, rows, tmp_path / "ddim")
    assert (again.generated, again.skipped) == (1, 1)

    argv = ["--model", "tiny-sd", "--prompts", str(tmp_path / "p.txt"), "--steps", "2"]
    (tmp_path / "p.txt").write_text("a cat\n", encoding="utf-8")
    argv += ["--device", "cpu", "--no-progress", "--scheduler", "ddpm", "--out"]
    assert main([*argv, str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["sampler"] == "ddpm"
    assert main([*argv, str(tmp_path / "cli2"), "--eta", "0.5"]) == 2
    assert "eta 0.5 is DDIM's" in capsys.readouterr().err


def _perturbed_unet(seed_offset: float):
    unet = load_t2i_model(ModelConfig(pretrained="tiny-sd")).unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(seed_offset)
    return unet


def test_changed_weights_behind_a_model_path_are_never_reused(tmp_path, capsys):
    """The weights behind one path change (a run retrained or re-merged): a rerun into the same
    folder is refused, leaving the images as they were; --overwrite regenerates them, equal to a
    fresh run of the new weights; an unchanged rerun still resumes."""
    from safediff.cli import main as cli_main
    from safediff.models.digest import module_digest

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(5)), encoding="utf-8")
    weights = tmp_path / "unet.safetensors"
    save_unet_safetensors(_perturbed_unet(0.01), weights)
    argv = ["generate", "--model", str(weights), "--base", "tiny-sd", "--prompts", str(prompts)]
    argv += ["--steps", "2", "--device", "cpu", "--no-progress", "--out"]
    out = tmp_path / "g"

    assert cli_main([*argv, str(out)]) == 0
    assert "5 generated" in capsys.readouterr().out
    old = image_bytes(out)
    info = json.loads((out / "run.json").read_text())
    assert info["made_with"]["weights"]["unet"] == module_digest(_perturbed_unet(0.01))
    with Image.open(out / "images" / "0_0.png") as im:
        assert json.loads(im.info["safediff"])["weights"] == info["made_with"]["weights"]

    save_unet_safetensors(_perturbed_unet(0.02), weights)  # same path, new weights
    assert cli_main([*argv, str(out)]) == 2
    captured = capsys.readouterr()
    assert "already on disk" not in captured.out
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("safediff: error: ") and "Traceback" not in captured.err
    for fragment in (str(out), "5 image(s)", "UNet weights", "--out", "--overwrite"):
        assert fragment in error, error
    assert image_bytes(out) == old

    assert cli_main([*argv, str(out), "--overwrite"]) == 0
    assert "5 generated (" in capsys.readouterr().out
    assert cli_main([*argv, str(tmp_path / "fresh")]) == 0
    capsys.readouterr()
    assert image_bytes(out) == image_bytes(tmp_path / "fresh") != old

    assert cli_main([*argv, str(out)]) == 0  # nothing changed: resumed, nothing regenerated
    assert "0 generated" in capsys.readouterr().out


def test_a_checkpoint_folder_retrained_in_place_is_refused(model, tmp_path):
    """The same through the library, for a tiny-sd pipeline folder saved over."""
    rows = mixed_rows()[:2]
    folder = tmp_path / "pipe"
    save_tiny_sd(folder)
    run(load_t2i_model(ModelConfig(pretrained=str(folder))), rows, tmp_path / "out")
    retrained = load_t2i_model(ModelConfig(pretrained=str(folder)))
    with torch.no_grad():
        next(retrained.unet.parameters()).add_(1e-3)
    retrained.unet.save_pretrained(folder / "unet", safe_serialization=True)
    reloaded = load_t2i_model(ModelConfig(pretrained=str(folder)))
    with pytest.raises(SafediffError, match="UNet weights"):
        run(reloaded, rows, tmp_path / "out")
    assert run(reloaded, rows, tmp_path / "out", overwrite=True).generated == 2


def test_temporaries_of_killed_runs_are_removed_at_start(model, tmp_path):
    images = tmp_path / "out" / "images"
    images.mkdir(parents=True)
    dead = 2**22 + 4321  # above the default pid_max: never a live process
    orphan = images / f".c0_0.png.tmp-{dead}"
    orphan.write_bytes(b"half a png")
    run(model, mixed_rows()[:1], tmp_path / "out")
    assert not orphan.exists()
    assert sorted(p.name for p in images.iterdir()) == ["c0_0.png"]


def test_seed_plus_row_index_beyond_2_63_is_refused(model):
    rows = [PromptRow(index=i, prompt=f"p{i}") for i in range(3)]
    top = 2**63 - 1
    assert plan_jobs(model, rows[:1], default_seed=top, default_guidance=1, images_per_prompt=1)
    with pytest.raises(SafediffError, match=r"row 1 .*--seed 9223372036854775807 \+ row index 1"):
        plan_jobs(model, rows, default_seed=top, default_guidance=1, images_per_prompt=1)
    own = [PromptRow(index=0, prompt="p", seed=top)]
    with pytest.raises(SafediffError, match=r"its seed 9223372036854775807 \+ image 1"):
        plan_jobs(model, own, default_seed=0, default_guidance=1, images_per_prompt=2)


def test_cli_main(tmp_path, capsys):
    prompts = tmp_path / "coco.csv"
    prompts.write_text(
        "case_number,prompt,evaluation_seed\n1,a horse,10\n2,a boat,20\n3,a kite,30\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    argv = ["--model", "tiny-sd", "--prompts", str(prompts), "--out", str(out), "--steps", "2"]
    argv += ["--device", "cpu", "--no-progress", "--images-per-prompt", "2"]
    assert main([*argv, "--limit", "2"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "1_0.png",
        "1_1.png",
        "2_0.png",
        "2_1.png",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "6 images of 3 coco prompts" in printed and "2 generated" in printed
    assert "4 already on disk" in printed
    records = [json.loads(x) for x in (out / "generation.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [10, 11, 20, 21, 30, 31]
    info = json.loads((out / "run.json").read_text())
    assert info["prompt_format"] == "coco" and info["model_spec"] == "tiny-sd"

    assert (
        main(["--model", "tiny-sd", "--prompts", str(tmp_path / "nope.csv"), "--out", str(out)])
        == 2
    )
    assert "prompt set not found" in capsys.readouterr().err


def test_cli_unet_dtype_auto_is_resolved_for_the_device_and_recorded(tmp_path, monkeypatch):
    from safediff.sampling import precision

    prompts = tmp_path / "p.txt"
    prompts.write_text("a horse\n", encoding="utf-8")
    argv = ["--model", "tiny-sd", "--prompts", str(prompts), "--steps", "1", "--device", "cpu"]
    argv += ["--no-progress", "--unet-dtype", "auto"]
    for native, want in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, v=native: v)
        out = tmp_path / want
        assert main([*argv, "--out", str(out)]) == 0
        assert json.loads((out / "run.json").read_text())["unet_dtype"] == want


@pytest.mark.slow
def test_two_processes_give_the_same_images_as_one(model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(5)) + "\n", encoding="utf-8")
    rows = list(load_prompt_set(prompts).rows)
    one = run(model, rows, tmp_path / "one", batch_size=2, num_steps=3, images_per_prompt=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", "29531", "-m", "safediff.eval.generate"]
    cmd += ["--model", "tiny-sd", "--prompts", str(prompts), "--out", str(tmp_path / "two")]
    cmd += ["--steps", "3", "--batch-size", "2", "--images-per-prompt", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert image_bytes(tmp_path / "two") == image_bytes(tmp_path / "one")
    assert len(image_bytes(tmp_path / "one")) == 10
    records = [json.loads(x) for x in (tmp_path / "two/generation.jsonl").read_text().splitlines()]
    assert records == one.records
    info = json.loads((tmp_path / "two/run.json").read_text())
    assert info["world_size"] == 2 and info["generated"] == 10


# ---------------------------------------------------------------------------------------------
# Model specs


def test_spec_names_and_vanilla():
    assert parse_model_spec("tiny-sd") == ModelConfig(pretrained="tiny-sd")
    assert parse_model_spec("org/some-model") == ModelConfig(pretrained="org/some-model")
    assert parse_model_spec("sandbox") == ModelConfig(pretrained="sandbox")
    spec = "sandbox:/runs/d/diffusion.safetensors"  # a path inside the spec: loaded, not parsed
    assert parse_model_spec(spec) == ModelConfig(pretrained=spec)
    assert parse_model_spec("vanilla", base="CompVis/stable-diffusion-v1-4") == ModelConfig(
        pretrained="CompVis/stable-diffusion-v1-4"
    )
    with pytest.raises(
        SafediffError, match=r"vanilla: 'vanilla' means the base model; pass .*--base"
    ):
        parse_model_spec("vanilla")
    with pytest.raises(SafediffError, match=r"model not found: .*no-such-dir"):
        parse_model_spec("./no-such-dir")
    with pytest.raises(SafediffError, match=r"model not found: .*gone\.safetensors"):
        parse_model_spec("gone.safetensors", base="tiny-sd")


def test_spec_pipeline_folder(tmp_path, caplog):
    folder = save_tiny_sd(tmp_path / "pipe")
    cfg = parse_model_spec(str(folder))
    assert cfg == ModelConfig(pretrained=str(folder.resolve()))
    with caplog.at_level(logging.WARNING):
        assert parse_model_spec(str(folder), base="x/y") == cfg
    assert "--base 'x/y' is ignored" in caplog.text
    assert load_t2i_model(cfg).latent_shape == (4, 8, 8)


def test_spec_bare_unet_file_and_folder(model, tmp_path):
    trained = load_t2i_model(ModelConfig(pretrained="tiny-sd")).unet
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    ckpt = tmp_path / "checkpoint_epoch_3"
    file = save_unet_safetensors(trained, ckpt / "diffusion_pytorch_model.safetensors")
    with pytest.raises(SafediffError, match=rf"{re.escape(str(file))}: a bare UNet file .*--base"):
        parse_model_spec(str(file))
    cfg = parse_model_spec(str(file), base="tiny-sd")
    assert cfg == ModelConfig(pretrained="tiny-sd", unet_weights=str(file))
    # the reference's checkpoint folder form
    with pytest.raises(SafediffError, match=r"checkpoint_epoch_3: a UNet weights folder .*--base"):
        parse_model_spec(str(ckpt))
    cfg_dir = parse_model_spec(str(ckpt), base="tiny-sd")
    assert cfg_dir.unet_weights == str(ckpt)
    loaded = load_t2i_model(cfg_dir).unet
    for (name, a), b in zip(
        loaded.state_dict().items(), trained.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # pickles are refused
    bad = tmp_path / "unet.bin"
    bad.write_bytes(b"\x80\x04")
    with pytest.raises(SafediffError, match=r"unet\.bin is not a \.safetensors UNet"):
        parse_model_spec(str(bad), base="tiny-sd")


def test_spec_trainer_checkpoint(model, tmp_path, caplog):
    run_dir = tmp_path / "run"
    save_config(
        TrainConfig(model=ModelConfig(pretrained="tiny-sd", resolution=24)), run_dir / "config.yaml"
    )
    ckpt = run_dir / "checkpoints" / "checkpoint-00002"
    model.unet.save_pretrained(ckpt / "unet", safe_serialization=True)  # as the trainer does
    (ckpt / "trainer_state.json").write_text("{}")
    expected = ModelConfig(pretrained="tiny-sd", unet_weights=str(ckpt / "unet"), resolution=24)
    assert parse_model_spec(str(ckpt)) == expected
    assert parse_model_spec(str(ckpt / "unet")) == expected  # its unet/ folder names it too
    assert parse_model_spec(str(run_dir)) == expected  # the run folder: its newest checkpoint
    assert load_t2i_model(expected).latent_shape == (4, 12, 12)
    with caplog.at_level(logging.WARNING):
        other = parse_model_spec(str(ckpt), base="tiny-sd-v")
    assert other == ModelConfig(
        pretrained="tiny-sd-v", unet_weights=str(ckpt / "unet"), resolution=24
    )
    assert "was trained on 'tiny-sd'" in caplog.text

    # run.merge_weight's merged/ model is the run's final model while it is the newest epoch's
    merged = run_dir / "merged"
    model.unet.save_pretrained(merged / "unet", safe_serialization=True)
    (merged / "merge.json").write_text(json.dumps({"merge_weight": 0.6, "epoch": 2}))
    final = ModelConfig(pretrained="tiny-sd", unet_weights=str(merged / "unet"), resolution=24)
    assert parse_model_spec(str(run_dir)) == final
    assert parse_model_spec(str(merged)) == final
    assert parse_model_spec(str(ckpt)) == expected  # a checkpoint is still itself
    (merged / "merge.json").write_text(json.dumps({"merge_weight": 0.6, "epoch": 1}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert parse_model_spec(str(run_dir)) == expected  # a stale merge: the newest checkpoint
    assert "merged from epoch 1, older than" in caplog.text
    shutil.rmtree(merged)

    (run_dir / "config.yaml").unlink()
    with pytest.raises(SafediffError, match=r"checkpoint-00002: no run config\.yaml .*--base"):
        parse_model_spec(str(ckpt))
    assert parse_model_spec(str(ckpt), base="tiny-sd").pretrained == "tiny-sd"

    lora = run_dir / "checkpoints" / "checkpoint-00004"
    (lora / "lora").mkdir(parents=True)
    (lora / "trainer_state.json").write_text("{}")
    with pytest.raises(SafediffError, match=r"checkpoint-00004 has neither unet/.* nor lora/"):
        parse_model_spec(str(lora), base="tiny-sd")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SafediffError, match=rf"{re.escape(str(empty))} is not a model folder"):
        parse_model_spec(str(empty))
    (empty / "checkpoints").mkdir()
    with pytest.raises(SafediffError, match="has no complete checkpoint yet"):
        parse_model_spec(str(empty))
