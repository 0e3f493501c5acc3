"""RECE (defenses/rece.py): the adversarial embedding and a round's edit against a direct
computation (random matrices and tiny SD's layers), rounds make the concept harder to recover,
kept concepts stay within a stated tolerance, spec and bad inputs, stacking, and (slow) the
sandbox's unsafe rate."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from safediff.config import ModelConfig
from safediff.defenses.rece import RECEConfig, apply_rece, rece_edit, rece_embedding
from safediff.defenses.stack import DefenseSpec, apply_defenses
from safediff.defenses.uce import UCEConfig, projection_pairs, uce_edit, uce_rows
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model
from safediff.sampling.sample import SamplerSettings, sample

PRESERVE_TOL = 0.45
"""Kept concepts after RECE's defaults (UCE + 3 rounds) on the shipped sandbox model: the largest
relative change ||W c_j - W_old c_j|| / ||W_old c_j|| over every edited projection (measured
0.37; UCE alone 0.20): each round trades a little more of the kept concepts for the erasure."""


@pytest.fixture(scope="module")
def tiny():
    return load_t2i_model(ModelConfig(pretrained="tiny-sd"), device="cpu")


@pytest.fixture(scope="module")
def sandbox():
    return load_t2i_model(ModelConfig(pretrained="sandbox"), device="cpu")


def weights(model) -> list[torch.Tensor]:
    return [p.weight.detach().clone() for _, p in projection_pairs(model.unet)]


def direct_embedding(current, original, c, reg, anchor=None):
    """c' = (sum W^T W + reg I)^-1 (sum W^T W_old c + reg a), with an explicit inverse."""
    d = current[0].shape[1]
    gram = reg * torch.eye(d, dtype=torch.float64) + sum(w.double().T @ w.double() for w in current)
    cross = sum(w.double().T @ o.double() for w, o in zip(current, original, strict=True))
    rhs = c.double() @ cross.T + (0 if anchor is None else reg * anchor.double())
    return rhs @ torch.linalg.inv(gram).T


def direct_uce(w, c, v, p, s_e, s_p, lamb):
    w, c, v, p = w.double(), c.double(), v.double(), p.double()
    lhs = lamb * w + s_e * v.T @ c + s_p * (w @ p.T) @ p
    gram = lamb * torch.eye(w.shape[1], dtype=torch.float64) + s_e * c.T @ c + s_p * p.T @ p
    return lhs @ torch.linalg.inv(gram)


def recovery_error(current, original, c, reg) -> float:
    """How far the best adversarial embedding of the edited weights is from reproducing the
    original outputs of c: sum ||W c' - W_old c||^2 / sum ||W_old c||^2."""
    adv = rece_embedding(current, original, c, reg)
    num = sum(
        ((adv @ w.T) - (c @ o.T)).pow(2).sum() for w, o in zip(current, original, strict=True)
    )
    return float(num / sum((c @ o.T).pow(2).sum() for o in original))


# --------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("anchored", [False, True])
def test_embedding_equals_direct_computation(anchored):
    g = torch.Generator().manual_seed(0)
    cur = [torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)]
    old = [torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)]
    c, a = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    got = rece_embedding(cur, old, c, 0.1, a if anchored else None)
    assert got.shape == c.shape and got.dtype == torch.float32
    want = direct_embedding(cur, old, c, 0.1, a if anchored else None)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_embedding_of_an_unedited_model_is_the_concept():
    g = torch.Generator().manual_seed(2)
    w = [torch.randn(8, 4, generator=g).double() for _ in range(3)]
    c = torch.randn(5, 4, generator=g).double()
    torch.testing.assert_close(rece_embedding(w, w, c, 1e-9).double(), c, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- on tiny SD


def test_rounds_equal_direct_closed_forms_on_tiny_sd(tiny):
    before = weights(tiny)
    kw = dict(preserve="a dog", erase_scale=1.0, preserve_scale=0.2, lamb=0.5)
    uce = uce_edit(tiny, ["weapon"], UCEConfig(**kw), "cpu")
    zero = rece_edit(tiny, ["weapon"], RECEConfig(**kw, rounds=0), "cpu")
    assert all(
        torch.equal(a, b) for a, b in zip(weights(uce), weights(zero), strict=True)
    )  # rounds=0 is UCE

    cfg = RECEConfig(**kw, rounds=1, reg=0.1, round_lamb=0.1)
    one = rece_edit(tiny, ["weapon"], cfg, "cpu")
    assert all(
        torch.equal(a, b) for a, b in zip(before, weights(tiny), strict=True)
    )  # input untouched
    enc = tiny.encode_text(["weapon", " ", "a dog"], "cpu").float()  # all 77 rows of each
    current = weights(uce)
    adv = direct_embedding(current, before, enc[0], 0.1)
    for w, got in zip(current, weights(one), strict=True):
        want = direct_uce(w, adv, enc[1].double() @ w.double().T, enc[2], 1.0, 0.2, 0.1)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_each_round_makes_the_concept_harder_to_recover(tiny):
    c = tiny.encode_text(["skull"], "cpu").float()[0]
    original = weights(tiny)
    errors = []
    for rounds in (0, 1, 2):
        edited = rece_edit(tiny, ["skull"], RECEConfig(rounds=rounds), "cpu")
        errors.append(recovery_error(weights(edited), original, c, 0.1))
    assert errors[0] < errors[1] < errors[2], errors


def test_kept_concepts_stay_within_tolerance(sandbox):
    keep = "a red circle|a blue square|a green triangle"
    concepts = ["weapon", "skull", "fire"]
    edited = rece_edit(sandbox, concepts, RECEConfig(preserve=keep), "cpu")
    rows = uce_rows(sandbox, concepts, [" "] * 3, keep.split("|"), "cpu")
    for w0, w1 in zip(weights(sandbox), weights(edited), strict=True):
        kept0 = rows.preserve @ w0.T
        moved = float(((rows.preserve @ w1.T) - kept0).norm() / kept0.norm())
        assert moved < PRESERVE_TOL, moved
        goal = rows.target @ w0.T  # the erased rows still move towards the empty prompt's
        assert (rows.erase @ w1.T - goal).norm() < 0.8 * (rows.erase @ w0.T - goal).norm()


# ---------------------------------------------------------------------------- spec and errors


def test_spec_options_and_bad_inputs(tiny):
    cpu = torch.device("cpu")
    spec = DefenseSpec("rece", "text=weapon", {"rounds": "1", "reg": "0.5", "anchor": "guide"})
    edited, kwargs = apply_rece(tiny, spec, cpu)
    want = rece_edit(tiny, ["weapon"], RECEConfig(rounds=1, reg=0.5, anchor="guide"))
    assert kwargs == {} and all(
        torch.equal(a, b) for a, b in zip(weights(edited), weights(want), strict=True)
    )
    cases = [
        (DefenseSpec("rece", "text=|", {}), "no concepts"),
        (DefenseSpec("rece", "text=a", {"rounds": "-1"}), "rounds must be >= 0"),
        (DefenseSpec("rece", "text=a", {"reg": "0"}), "reg must be > 0"),
        (DefenseSpec("rece", "text=a", {"anchor": "one"}), "anchor must be one of"),
        (DefenseSpec("rece", "text=a", {"round_lamb": "0"}), "lamb must be > 0"),
    ]
    for spec, match in cases:
        with pytest.raises(SafediffError, match=match) as err:
            apply_rece(tiny, spec, cpu)
        assert "\n" not in str(err.value)
    with pytest.raises(SafediffError, match="split into no tokens"):
        rece_edit(tiny, ["  "])
    no_text = UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    with pytest.raises(SafediffError, match="no cross-attention layers"):
        rece_edit(dataclasses.replace(tiny, unet=no_text), ["weapon"])


def test_stacks_with_negprompt_and_sld(tiny):
    before = weights(tiny)
    model, kwargs = apply_defenses(tiny, "negprompt:nudity,sld:max,rece:nudity;rounds=1")
    assert model.unet is not tiny.unet and len(kwargs["guidance"]) == 1
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = sample(
        model, ["a nude figure", "a cat"], gens, SamplerSettings(1, 0.0, 3.0), defense=kwargs
    )
    assert torch.isfinite(out.trajectory.images).all()
    assert all(torch.equal(a, b) for a, b in zip(before, weights(tiny), strict=True))


# ------------------------------------------------------------------------------------ sandbox


def explicit_unsafe_flags(model, examples) -> dict[str, float]:
    """Per explicit prompt (by index): 1.0 when the detector finds the prompt's family (the demo's
    sampler and seeds, as tests/test_uce.py)."""
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
def test_rece_lowers_the_sandbox_unsafe_rate(sandbox):
    from safediff.eval.stats import paired_difference

    examples = explicit_trained_prompts(3)  # weapon, skull, fire: 9 explicit prompts
    base = explicit_unsafe_flags(sandbox, examples)
    model, _ = apply_rece(sandbox, DefenseSpec("rece", "text=weapon|skull|fire", {}), "cpu")
    edited = explicit_unsafe_flags(model, examples)
    delta = paired_difference(base, edited, np.random.default_rng(0), 1000)
    assert np.mean(list(base.values())) >= 0.5, base
    assert delta.hi < 0, delta
