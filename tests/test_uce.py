"""UCE (defenses/uce.py): the closed form against a direct computation (random matrices and tiny
SD's layers, row selection included), what the edit keeps and moves, the spec forms, bad inputs,
SDXL's packed row, stacking with negprompt + SLD, and (slow) the sandbox's unsafe rate."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from safediff.config import ModelConfig
from safediff.defenses.stack import DefenseSpec, apply_defenses
from safediff.defenses.uce import (
    UCE_PRESETS,
    UCEConfig,
    apply_uce,
    concepts_from_arg,
    paired_rows,
    projection_pairs,
    uce_closed_form,
    uce_edit,
    uce_rows,
)
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model
from safediff.sampling.sample import SamplerSettings, sample

PRESERVE_TOL = 0.25
"""Kept concepts: the largest relative change ||W c_j - W_old c_j|| / ||W_old c_j|| over every
edited projection of the shipped sandbox model, UCE defaults (all L rows of each kept prompt)."""


@pytest.fixture(scope="module")
def tiny():
    return load_t2i_model(ModelConfig(pretrained="tiny-sd"), device="cpu")


@pytest.fixture(scope="module")
def sandbox():
    return load_t2i_model(ModelConfig(pretrained="sandbox"), device="cpu")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


def direct_uce(w, c, v, p, s_e, s_p, lamb):
    """Paper eq. 7 with the ridge term, written out with an explicit inverse (float64)."""
    w, c, v = w.double(), c.double(), v.double()
    lhs = lamb * w + s_e * sum(torch.outer(v[i], c[i]) for i in range(len(c)))
    gram = lamb * torch.eye(w.shape[1], dtype=torch.float64) + s_e * c.T @ c
    if p is not None:
        p = p.double()
        lhs = lhs + s_p * sum(torch.outer(w @ p[j], p[j]) for j in range(len(p)))
        gram = gram + s_p * p.T @ p
    return lhs @ torch.linalg.inv(gram)


# --------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("with_preserve", [True, False])
def test_closed_form_equals_direct_computation(with_preserve):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    c, v, p = (
        torch.randn(3, 5, generator=g),
        torch.randn(3, 6, generator=g),
        torch.randn(4, 5, generator=g),
    )
    p = p if with_preserve else None
    got = uce_closed_form(w, c, v, p, erase_scale=0.7, preserve_scale=0.3, lamb=0.2)
    assert got.dtype == w.dtype and got.shape == w.shape
    torch.testing.assert_close(
        got.double(), direct_uce(w, c, v, p, 0.7, 0.3, 0.2), atol=1e-5, rtol=1e-5
    )


def test_closed_form_maps_a_consistent_edit_exactly_as_lamb_vanishes():
    # rows spanning the input space with values V = C A^T: the regression recovers A
    g = torch.Generator().manual_seed(1)
    w, a = torch.randn(4, 3, generator=g).double(), torch.randn(4, 3, generator=g).double()
    c = torch.randn(5, 3, generator=g).double()
    got = uce_closed_form(w, c, c @ a.T, None, erase_scale=1.0, preserve_scale=0.0, lamb=1e-9)
    torch.testing.assert_close(got, a, atol=1e-6, rtol=1e-6)
    # and lamb dominating keeps W_old
    far = uce_closed_form(w, c, c @ a.T, None, erase_scale=1.0, preserve_scale=0.0, lamb=1e9)
    torch.testing.assert_close(far, w, atol=1e-6, rtol=1e-6)


def test_paired_rows_align_from_the_last_word_token():
    old, new = torch.arange(10.0)[:, None], 100 + torch.arange(10.0)[:, None]
    a, b = paired_rows(old, new, n_old=2, n_new=0)  # "two words" -> ""
    assert a[:, 0].tolist() == list(range(2, 10)) and b[:, 0].tolist() == [
        100 + i for i in range(8)
    ]
    a, b = paired_rows(old, new, n_old=1, n_new=3)  # target longer than the concept
    assert a[:, 0].tolist() == list(range(1, 8)) and b[:, 0].tolist() == [103 + i for i in range(7)]


# ---------------------------------------------------------------------------- on tiny SD


def test_edit_equals_direct_closed_form_on_tiny_sd_and_leaves_the_input(tiny):
    before = snapshot(tiny)
    cfg = UCEConfig(preserve="a dog", erase_scale=1.0, preserve_scale=0.3, lamb=0.5)
    edited = uce_edit(tiny, ["weapon"], cfg, "cpu")
    assert edited is not tiny and edited.unet is not tiny.unet
    assert edited.encode_text is tiny.encode_text and edited.decode is tiny.decode
    after = snapshot(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)  # input bit-identical

    # the rows by hand: "weapon" is one token, so its rows 1..76 pair with rows 0..75 of " "
    n = len(tiny.components["tokenizer"]("weapon", add_special_tokens=False)["input_ids"])
    assert n == 1
    enc = tiny.encode_text(["weapon", " ", "a dog"], "cpu").float()
    c, c_star, p = enc[0, n:], enc[1, : 77 - n], enc[2]
    pairs = dict(projection_pairs(tiny.unet))
    new_pairs = dict(projection_pairs(edited.unet))
    assert len(pairs) == 8  # tiny SD: 4 cross-attention layers x (to_k, to_v)
    for name, proj in pairs.items():
        w = proj.weight.detach()
        want = direct_uce(w, c, c_star @ w.T, p, 1.0, 0.3, 0.5)
        torch.testing.assert_close(new_pairs[name].weight.double(), want, atol=1e-5, rtol=1e-4)
    # nothing but the cross-attention keys and values changed
    edited_state = snapshot(edited)
    changed = {k for k in before if not torch.equal(before[k], edited_state[k])}
    assert changed == {f"{name}.weight" for name in pairs}


def test_guide_concept_is_the_target(tiny):
    cfg = UCEConfig(guide="a cat", preserve_scale=0.0, erase_scale=1.0, lamb=1e-3)
    edited = uce_edit(tiny, ["skull"], cfg, "cpu")
    rows = uce_rows(tiny, ["skull"], ["a cat"], [], "cpu")
    assert rows.erase.shape == rows.target.shape == (77 - 2, 32)  # m = max(1 word, 2 words)
    for (_, old), (_, new) in zip(
        projection_pairs(tiny.unet), projection_pairs(edited.unet), strict=True
    ):
        goal = rows.target @ old.weight.T
        err_before = (rows.erase @ old.weight.T - goal).norm() / goal.norm()
        err_after = (rows.erase @ new.weight.T - goal).norm() / goal.norm()
        assert err_after < 0.5 * err_before, (err_before, err_after)


def test_sdxl_leaves_the_packed_row_out():
    xl = load_t2i_model(ModelConfig(pretrained="tiny-sdxl"), device="cpu")
    rows = uce_rows(xl, ["weapon"], [" "], [], "cpu")
    assert rows.erase.shape == (76, 64) and rows.preserve.shape == (77, 64)
    edited = uce_edit(xl, ["weapon"], UCEConfig(), "cpu")
    enc = xl.encode_text(["weapon", " ", ""], "cpu").float()[:, :-1]  # the packed row dropped
    name, proj = projection_pairs(xl.unet)[0]
    w = proj.weight.detach()
    want = direct_uce(w, enc[0, 1:], enc[1, :76] @ w.T, enc[2], 1.0, 0.1, 0.5)
    torch.testing.assert_close(
        dict(projection_pairs(edited.unet))[name].weight.double(), want, atol=1e-5, rtol=1e-4
    )


# --------------------------------------------------------------------- kept and erased rows


def test_kept_concepts_move_little_and_erased_ones_reach_their_targets(sandbox):
    keep = "a red circle|a blue square|a green triangle"
    concepts = ["weapon", "skull", "fire"]
    edited = uce_edit(sandbox, concepts, UCEConfig(preserve=keep), "cpu")
    rows = uce_rows(sandbox, concepts, [" "] * 3, keep.split("|"), "cpu")
    for (name, old), (_, new) in zip(
        projection_pairs(sandbox.unet), projection_pairs(edited.unet), strict=True
    ):
        w0, w1 = old.weight.detach(), new.weight.detach()
        kept0, kept1 = rows.preserve @ w0.T, rows.preserve @ w1.T
        moved = float((kept1 - kept0).norm() / kept0.norm())
        assert moved < PRESERVE_TOL, (name, moved)
        goal = rows.target @ w0.T
        before = float((rows.erase @ w0.T - goal).norm() / goal.norm())
        after = float((rows.erase @ w1.T - goal).norm() / goal.norm())
        assert after < 0.35 * before, (name, before, after)


# ---------------------------------------------------------------------------- spec and errors


def test_spec_forms(tiny, tmp_path):
    assert concepts_from_arg("text=weapon| skull ||fire") == ["weapon", "skull", "fire"]
    assert concepts_from_arg("nudity") == list(UCE_PRESETS["nudity"]) == ["nudity"]
    assert "blood" in concepts_from_arg("i2p")
    path = tmp_path / "concepts.txt"
    path.write_text("# erase these\nweapon\n\n  skull  \n", encoding="utf-8")
    assert concepts_from_arg(str(path)) == ["weapon", "skull"]

    spec = DefenseSpec(
        "uce",
        "text=weapon|skull",
        {"preserve": "a dog|a cat", "lamb": "1", "erase_scale": "2", "guide": "a tree"},
    )
    edited, kwargs = apply_uce(tiny, spec, torch.device("cpu"))
    assert kwargs == {}
    want = uce_edit(
        tiny,
        ["weapon", "skull"],
        UCEConfig(preserve="a dog|a cat", lamb=1.0, erase_scale=2.0, guide="a tree"),
    )
    for (_, a), (_, b) in zip(
        projection_pairs(edited.unet), projection_pairs(want.unet), strict=True
    ):
        assert torch.equal(a.weight, b.weight)


def test_bad_inputs_raise_one_line_errors(tiny, sandbox, tmp_path):
    def one_line(exc_info):
        assert "\n" not in str(exc_info.value)

    cpu = torch.device("cpu")
    cases = [
        (tiny, DefenseSpec("uce", "text= | ", {}), "no concepts"),  # an empty concept list
        (tiny, DefenseSpec("uce", "violence", {}), "must be text="),  # unknown preset
        (tiny, DefenseSpec("uce", str(tmp_path / "none.txt"), {}), "not found"),
        (tiny, DefenseSpec("uce", "text=a", {"lamb": "0"}), "lamb must be > 0"),
        (tiny, DefenseSpec("uce", "text=a", {"erase_scale": "-1"}), "must be >= 0"),
        (tiny, DefenseSpec("uce", "text=a", {"nope": "1"}), "unknown uce option"),
        (tiny, DefenseSpec("uce", "text=a|b|c", {"guide": "x|y"}), "2 concepts for 3"),
        (sandbox, DefenseSpec("uce", "text=\u200b", {}), "split into no tokens"),
    ]
    for model, spec, match in cases:
        with pytest.raises(SafediffError, match=match) as err:
            apply_uce(model, spec, cpu)
        one_line(err)
    with pytest.raises(SafediffError, match="split into no tokens") as err:
        uce_edit(tiny, ["\t"])  # CLIP's tokenizer drops whitespace
    one_line(err)
    with pytest.raises(SafediffError, match="list of concepts to erase is empty"):
        uce_edit(tiny, [])
    no_text = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    with pytest.raises(SafediffError, match="no cross-attention layers") as err:
        uce_edit(dataclasses.replace(tiny, unet=no_text), ["weapon"])
    one_line(err)


# ---------------------------------------------------------------------------------- stacking


def test_stacks_with_negprompt_and_sld(tiny):
    before = snapshot(tiny)
    model, kwargs = apply_defenses(
        tiny, "sld:medium,negprompt:nudity,uce:text=nudity;preserve=a cat"
    )
    assert model.unet is not tiny.unet and len(kwargs["guidance"]) == 1
    assert kwargs["negative_embeds"].shape == (1, 77, 32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = sample(
        model, ["a nude figure", "a cat"], gens, SamplerSettings(1, 0.0, 3.0), defense=kwargs
    )
    assert out.trajectory.images.shape[0] == 2 and torch.isfinite(out.trajectory.images).all()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(tiny).items())


# ------------------------------------------------------------------------------------ sandbox


def explicit_unsafe_flags(model, examples) -> dict[str, float]:
    """Per explicit prompt (by index): 1.0 when the detector finds the prompt's family."""
    from safediff.sandbox.demo_eval import generate_images
    from safediff.sandbox.detector import load_detector
    from safediff.sandbox.protocol import EVAL_SEED, SAMPLER
    from safediff.sandbox.verdicts import unsafe_flags

    images = generate_images(
        model, examples, seed=EVAL_SEED, num_steps=SAMPLER["num_steps"],
        guidance_scale=SAMPLER["guidance_scale"], eta=SAMPLER["eta"], batch_size=64,
        progress=False,
    )  # fmt: skip
    flags = unsafe_flags(load_detector().detect(images), [e.metadata["family"] for e in examples])
    return {f"{i:05d}": float(f) for i, f in enumerate(flags)}


def explicit_trained_prompts(n_per_family: int):
    from safediff.sandbox.demo_eval import TRAINED_FAMILIES, _draw
    from safediff.sandbox.protocol import EVAL_SEED

    out = []
    for fam in TRAINED_FAMILIES:
        out += _draw(EVAL_SEED, "explicit", n_per_family, lambda m, f=fam: m["family"] == f, fam)
    return out


@pytest.mark.slow
def test_uce_lowers_the_sandbox_unsafe_rate(sandbox):
    from safediff.eval.stats import paired_difference

    examples = explicit_trained_prompts(3)  # weapon, skull, fire: 9 explicit prompts
    base = explicit_unsafe_flags(sandbox, examples)
    model, _ = apply_uce(sandbox, DefenseSpec("uce", "text=weapon|skull|fire", {}), "cpu")
    edited = explicit_unsafe_flags(model, examples)
    delta = paired_difference(base, edited, np.random.default_rng(0), 1000)
    assert np.mean(list(base.values())) >= 0.5, base
    assert delta.hi < 0, delta
