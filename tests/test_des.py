"""DES: each loss against a hand computation, the targets, a training step that touches only the
text encoder, and the saved encoder as a drop-in transformers folder on tiny-sd."""

import argparse
import json
import math

import pytest
import torch
from transformers import CLIPTextModel

from safediff.defenses.cli import add_des_parser
from safediff.defenses.des import (
    DESConfig,
    concept_direction,
    cosine_loss,
    des_losses,
    train_des,
    unsafe_targets,
)
from safediff.defenses.text_encoder_adapter import (
    CLIPTextEncoderAdapter,
    adapter_for_model,
    swap_text_encoder,
)
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.stable_diffusion import sd_components_to_t2i
from safediff.models.tiny_sd import build_tiny_sd, save_pipeline_folder

SAFE = ["a dog in a park", "a bowl of fruit", "a city at night", "a red car", "two cats"]
UNSAFE = ["a nude woman", "naked people on a beach", "an explicit photo"]


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def flat(t: torch.Tensor) -> list[float]:
    return t.reshape(-1).double().tolist()


@pytest.fixture
def model() -> T2IModel:
    return sd_components_to_t2i(build_tiny_sd(seed=0), "tiny-sd")


def test_losses_against_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    L, D, scale, lam = 3, 4, 2.5, 0.3
    tu, tgt, ts, os_ = (torch.randn(2, L, D, generator=g) for _ in range(4))
    tc, oe = torch.randn(1, L, D, generator=g), torch.randn(1, L, D, generator=g)
    u = torch.randn(L * D, generator=g)
    u = u / u.norm()
    out = des_losses(tu, tgt, ts, os_, tc, oe, u, scale, lam)
    unsafe = sum(1 - cos(flat(tu[i]), flat(tgt[i])) for i in range(2)) / 2
    safe = sum(1 - cos(flat(ts[i]), flat(os_[i])) for i in range(2)) / 2
    shifted = [[a + scale * b for a, b in zip(flat(ts[i]), flat(u), strict=True)] for i in range(2)]
    safe_concept = sum(1 - cos(shifted[i], flat(os_[i])) for i in range(2)) / 2
    concept = 1 - cos(flat(tc), flat(oe))
    total = lam * (safe + safe_concept) + (1 - lam) * (unsafe + concept)
    got = out.as_floats()
    for name, want in [
        ("unsafe", unsafe),
        ("safe", safe),
        ("safe_concept", safe_concept),
        ("concept", concept),
        ("total", total),
    ]:
        assert got[name] == pytest.approx(want, rel=1e-5, abs=1e-6), name
    # cosine_loss broadcasts a [1, ...] second argument
    assert float(cosine_loss(ts, oe)) == pytest.approx(
        sum(1 - cos(flat(ts[i]), flat(oe)) for i in range(2)) / 2, rel=1e-5
    )


def test_direction_and_targets_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    e_concept, e_empty = torch.randn(1, 2, 3, generator=g), torch.randn(1, 2, 3, generator=g)
    u = concept_direction(e_concept, e_empty, "difference")
    d = [a - b for a, b in zip(flat(e_concept), flat(e_empty), strict=True)]
    n = math.sqrt(sum(x * x for x in d))
    assert u.tolist() == pytest.approx([x / n for x in d], rel=1e-5)
    ref = concept_direction(e_concept, e_empty, "concept")  # the reference code's form
    assert ref.tolist() == pytest.approx(
        [x / e_concept.norm().item() for x in flat(e_concept)], rel=1e-5
    )

    codebook = torch.randn(6, 2, 3, generator=g)
    unsafe = torch.randn(4, 2, 3, generator=g)
    targets, idx = unsafe_targets(unsafe, codebook, u, scale=200.0, chunk=3)
    for i in range(4):
        sims = [cos(flat(unsafe[i]), flat(codebook[j])) for j in range(6)]
        j = min(range(6), key=sims.__getitem__)  # the least similar safe entry
        assert idx[i].item() == j
        want = [c - 200.0 * v for c, v in zip(flat(codebook[j]), u.tolist(), strict=True)]
        assert flat(targets[i]) == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_training_changes_only_the_text_encoder(model: T2IModel) -> None:
    before = {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in [
            ("unet", model.unet),
            ("vae", model.components["vae"]),
            ("text_encoder", model.components["text_encoder"]),
        ]
    }
    adapter = adapter_for_model(model)
    cfg = DESConfig(lr=1e-3, batch_size=4, epochs=3, concept_scale=5.0)
    result = train_des(adapter, SAFE, UNSAFE, cfg)
    # 5 pairs per epoch (the shorter list is cycled), batch 4 -> 2 steps per epoch
    assert len(result.history) == 6
    assert result.history[-1]["total"] < result.history[0]["total"]
    trained = result.adapter.module
    assert trained is not model.components["text_encoder"]
    assert not any(p.requires_grad for p in trained.parameters()) and not trained.training
    for key, value in trained.state_dict().items():
        assert not torch.equal(value, before["text_encoder"][key]), f"{key} did not change"
    for name, module in [
        ("unet", model.unet),
        ("vae", model.components["vae"]),
        ("text_encoder", model.components["text_encoder"]),  # the original encoder is untouched
    ]:
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key} changed"
    # one step with max_steps, and the codebook of the original encoder is what E_orig(s) means
    one = train_des(adapter, SAFE, UNSAFE, cfg, max_steps=1)
    assert len(one.history) == 1 and one.history[0] == result.history[0]


def test_saved_encoder_drops_into_the_model(model: T2IModel, tmp_path) -> None:
    adapter = adapter_for_model(model)
    cfg = DESConfig(lr=1e-3, batch_size=8, epochs=1, concept_scale=5.0)
    trained = train_des(adapter, SAFE, UNSAFE, cfg).adapter
    folder = trained.save(tmp_path / "des")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    reloaded = CLIPTextModel.from_pretrained(folder)
    for key, value in trained.module.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)

    swapped = swap_text_encoder(model, folder)
    prompts = ["a nude woman", "a red car"]
    with torch.no_grad():
        want = trained.encode(prompts)
    torch.testing.assert_close(swapped.encode_text(prompts, "cpu"), want)
    assert not torch.allclose(model.encode_text(prompts, "cpu"), want)  # the input model is intact
    assert swapped.unet is model.unet and swapped.components["vae"] is model.components["vae"]
    assert "text encoder" in swapped.source

    # as the text_encoder/ of a diffusers pipeline folder, with no other change
    comps = {**build_tiny_sd(seed=0), "text_encoder": reloaded}
    pipe_dir = save_pipeline_folder(comps, tmp_path / "pipe")
    swapped_again = swap_text_encoder(model, pipe_dir)  # a pipeline folder works too
    torch.testing.assert_close(swapped_again.encode_text(prompts, "cpu"), want)
    with pytest.raises(SafediffError, match="config.json"):
        swap_text_encoder(model, tmp_path)


def test_des_cli_writes_a_loadable_encoder(tmp_path) -> None:
    safe, unsafe = tmp_path / "safe.txt", tmp_path / "unsafe.csv"
    safe.write_text("\n".join(SAFE) + "\n", encoding="utf-8")
    unsafe.write_text("prompt\n" + "\n".join(UNSAFE) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_des_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "run"
    args = parser.parse_args(
        [
            "des", "train", "--safe-prompts", str(safe), "--unsafe-prompts", str(unsafe),
            "--concept", "yes", "--output-dir", str(out), "--no-progress",
            "epochs=1", "batch_size=4", "lr=1e-4",
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    history = json.loads((out / "des_history.json").read_text())
    assert len(history["steps"]) == 2 and history["seconds"] > 0
    config = (out / "des_config.yaml").read_text()
    assert "concept: 'yes'" in config and "batch_size: 4" in config
    adapter = CLIPTextEncoderAdapter(
        build_tiny_sd()["tokenizer"], CLIPTextModel.from_pretrained(out)
    )
    assert adapter.encode(["x"]).shape == (1, 77, 32)
    with pytest.raises(SafediffError, match="lambda_safe"):
        DESConfig(lambda_safe=1.5)
