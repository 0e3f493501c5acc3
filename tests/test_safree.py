"""SAFREE (defenses/safree.py): the pure pieces against direct computation, the hook on tiny SD
(no flagged token: the undefended images bit for bit; stacked with negprompt, SLD and the Safe
Denoiser), bad inputs, and (slow) the sandbox run where it lowers the unsafe rate."""

import dataclasses
import math

import pytest
import torch

from safediff.config import ModelConfig
from safediff.defenses.safe_denoiser import NegationSet
from safediff.defenses.safree import (
    REFERENCE_STEPS,
    SAFREE_NUDITY,
    SANDBOX_OPTIONS,
    Safree,
    SafreeConfig,
    apply_safree,
    filtered_steps,
    flag_tokens,
    fourier_reweight,
    keywords_of,
    project_tokens,
    projection_matrix,
    reattention,
    reference_window,
    self_validating_beta,
    token_distances,
)
from safediff.defenses.stack import DefenseSpec, apply_defenses
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model
from safediff.sampling.sample import SamplerSettings, sample

CPU = torch.device("cpu")
CONCEPTS = "text=weapon|skull|fire"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_t2i_model(ModelConfig(pretrained="tiny-sd"), device="cpu")


def gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [D, r] of the rows' span, by QR (an independent computation)."""
    q, _ = torch.linalg.qr(vectors.to(torch.float64).T)
    return q


# ------------------------------------------------------------------------------ pure pieces


def test_projection_matrix_is_the_orthogonal_projection_onto_the_span():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 16, generator=g, dtype=torch.float64)
    rows = torch.cat([rows, rows[:1] + rows[1:2]])  # a dependent row: the pseudo-inverse copes
    p = projection_matrix(rows).to(torch.float64)
    q = orthonormal(rows[:3])
    torch.testing.assert_close(p, q @ q.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)


def test_flagged_tokens_lose_exactly_their_subspace_component_and_others_are_untouched():
    g = torch.Generator().manual_seed(1)
    d, length = 24, 10
    concept = torch.randn(3, d, generator=g)
    span = torch.randn(6, d, generator=g)  # the masked prompts' pooled embeddings
    coeffs = torch.randn(length, 6, generator=g)
    tokens = coeffs @ span + 0.1 * torch.randn(length, d, generator=g)  # mostly in the span
    flags = torch.zeros(length, dtype=torch.bool)
    flags[[2, 5, 6]] = True
    p_c, p_m = projection_matrix(concept), projection_matrix(span)
    out = project_tokens(tokens, p_m, p_c, flags)

    qc, qm = orthonormal(concept), orthonormal(span)
    x = tokens.to(torch.float64)
    in_span = x @ qm @ qm.T  # P_m x, directly
    direct = in_span - in_span @ qc @ qc.T  # minus its component in the toxic subspace
    torch.testing.assert_close(out[flags].double(), direct[flags], atol=1e-4, rtol=0)
    assert torch.equal(out[~flags], tokens[~flags])  # bit for bit
    # what a flagged (in-span) token lost is exactly its toxic-subspace component
    lost = in_span[flags] - out[flags].double()
    torch.testing.assert_close(lost, (in_span @ qc @ qc.T)[flags], atol=1e-4, rtol=0)
    assert (out[flags].double() @ qc).abs().max() < 1e-4  # nothing left in the subspace


def test_flagging_rule_on_a_hand_case():
    # toxic subspace = e0; masked prompt i at distance d_i from it (its e1 coordinate)
    p_c = torch.zeros(4, 4)
    p_c[0, 0] = 1.0
    dist = torch.tensor([1.0, 1.0, 1.0, 3.0])
    pooled = torch.stack([torch.tensor([5.0, di, 0.0, 0.0]) for di in dist])
    torch.testing.assert_close(token_distances(pooled, p_c), dist)
    # token 3: removing it leaves the prompt far from the subspace (3 >= 1.01 * mean(1, 1, 1))
    assert flag_tokens(pooled, p_c, alpha=0.01).tolist() == [False, False, False, True]
    # threshold: 3 < (1 + 2.5) * 1
    assert not flag_tokens(pooled, p_c, alpha=2.5).any()
    # exactly at the threshold counts as flagged (the reference keeps only d < (1 + alpha) mean)
    assert flag_tokens(pooled, p_c, alpha=2.0).tolist() == [False, False, False, True]
    assert flag_tokens(pooled[:1], p_c, alpha=0.01).tolist() == [False]  # one token: no mean


def test_self_validating_schedule():
    cfg = SafreeConfig()
    assert reference_window(0.0, 10, 5.333, 2.5) == 0
    assert reference_window(1.0, 10, 5.333, 2.5) == 10
    assert reference_window(0.5333, 10, 5.333, 2.5) == 5  # the sigmoid's midpoint
    expected = round(10 / (1 + math.exp(-5.0 * (6.0 - 5.333))))
    assert reference_window(0.6, 10, 5.333, 2.5) == expected
    # at the reference's 50 steps: steps i <= k, i.e. k + 1 steps
    for beta in (0.0, 0.5, 0.6, 1.0):
        k = reference_window(beta, 10, 5.333, 2.5)
        assert filtered_steps(beta, REFERENCE_STEPS, cfg) == k + 1
    assert filtered_steps(1.0, 10, cfg) == round(11 * 10 / 50)  # the same fraction of 10 steps
    assert filtered_steps(0.0, 3, cfg) == 1  # at least one step
    assert filtered_steps(1.0, 2, SafreeConfig(up_t=50)) == 2  # capped at the step count
    assert filtered_steps(0.0, 7, SafreeConfig(svf=False)) == 7  # no filter: every step
    # beta: 0 when projecting changes nothing, 1 - cos otherwise, over the active rows only
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
    proj = torch.tensor([[1.0, 0.0], [1.0, 0.0], [9.0, 0.0]])
    active = torch.tensor([True, True, False])
    assert self_validating_beta(x, proj, active) == pytest.approx(1 - (1 + 2**-0.5) / 2)
    assert self_validating_beta(x, x, torch.ones(3, dtype=torch.bool)) == pytest.approx(0.0)


def test_fourier_reweight_on_a_hand_case():
    checker = torch.tensor([[(-1.0) ** (i + j) for j in range(4)] for i in range(4)])
    h = (2.0 + checker).expand(1, 2, 4, 4)  # DC 2 (inside the window) + Nyquist (outside)
    low = torch.ones(1, 2, 4, 4)  # the reference features: DC 1
    out = fourier_reweight(h, low, threshold=1, scale=0.5)
    torch.testing.assert_close(out, (1.0 + checker).expand(1, 2, 4, 4), atol=1e-5, rtol=0)
    # where the filtered features are not above the reference's: untouched
    high = 3.0 * torch.ones(1, 2, 4, 4)
    torch.testing.assert_close(fourier_reweight(h, high, 1, 0.5), h, atol=1e-5, rtol=0)
    assert fourier_reweight(h, low, 1, 1.0) is h  # scale 1: the identity


def test_reattention_pairs_filtered_with_original_rows_and_removes_its_hooks(tiny):
    unet = tiny.unet
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, *tiny.latent_shape, generator=g)
    t = torch.tensor([500])
    a, b = tiny.encode_text(["a skull", "a cat"], CPU).chunk(2)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=a).sample
        cfg = SafreeConfig(lra_s1=0.5, lra_s2=0.5)
        with reattention(unet, 1, cfg):  # identical halves: nothing is above itself
            same = unet(
                torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([a, a])
            )
        with reattention(unet, 1, cfg):
            moved = unet(
                torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([a, b])
            )
        with reattention(unet, 1, SafreeConfig(lra_s1=1.0, lra_s2=1.0)):  # scale 1: no hooks
            ident = unet(
                torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([a, b])
            )
        after = unet(x, t, encoder_hidden_states=a).sample
    torch.testing.assert_close(same.sample[:1], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(ident.sample[:1], plain, atol=1e-5, rtol=0)
    assert not torch.allclose(moved.sample[:1], plain, atol=1e-4)
    original = unet(x, t, encoder_hidden_states=b).sample
    torch.testing.assert_close(moved.sample[1:], original, atol=1e-5, rtol=0)  # untouched
    assert all(not blk._forward_pre_hooks for blk in unet.up_blocks)
    assert torch.equal(after, plain)


# ------------------------------------------------------------------------------ on tiny SD


def test_filter_flags_and_windows_on_tiny_sd(tiny):
    _, kw = apply_safree(tiny, DefenseSpec("safree", CONCEPTS, {"alpha": "-0.5"}), CPU)
    hook = kw["guidance"][0]
    prompts = ["a photo of a skull and a weapon", "a cat", "cat"]
    cond = tiny.encode_text(prompts, CPU)
    filt = hook.filter(prompts, cond, 4)
    assert filt.flags[0].any() and not filt.flags[2].any()  # one word: nothing to compare
    assert not filt.flags[:, 0].any() and not filt.flags[:, -1].any()  # start token, padding
    assert torch.equal(filt.embeds[~filt.flags], cond[~filt.flags])
    assert not torch.equal(filt.embeds[0], cond[0])
    assert filt.steps[2] == 0 and 1 <= int(filt.steps[0]) <= 4
    empty = hook.filter(["", "cat"], tiny.encode_text(["", "cat"], CPU), 4)  # no word to mask
    assert not empty.flags.any() and empty.steps.tolist() == [0, 0]
    bound = hook.for_prompts(prompts, cond, 4)
    steps = int(filt.steps[0])
    first = bound.step_embeds(0, 0, 3, cond)
    assert torch.equal(first[0], filt.embeds[0]) and torch.equal(first[2], cond[2])
    assert bound.step_embeds(4, 0, 3, cond) is cond  # past every window: the tensor itself
    row0 = cond[:1]
    assert torch.equal(bound.step_embeds(steps - 1, 0, 1, row0), filt.embeds[:1])
    assert bound.step_embeds(steps, 0, 1, row0) is row0  # the window ends after `steps` steps


def test_without_flagged_tokens_the_images_are_the_undefended_ones(tiny):
    settings = SamplerSettings(num_steps=2, eta=1.0, guidance_scale=3.0)
    prompts = ["a photo of a skull", "a cat on a mat"]
    base = sample(tiny, prompts, gens(2), settings).trajectory.images
    model, kw = apply_safree(tiny, DefenseSpec("safree", CONCEPTS, {"alpha": "100"}), CPU)
    assert model is tiny
    got = sample(model, prompts, gens(2), settings, defense=kw).trajectory.images
    assert torch.equal(got, base)
    # with flagged tokens the images move, and re-attention changes them further
    _, kw = apply_safree(tiny, DefenseSpec("safree", CONCEPTS, {"alpha": "-0.5"}), CPU)
    moved = sample(tiny, prompts, gens(2), settings, defense=kw).trajectory.images
    _, kw_plain = apply_safree(
        tiny, DefenseSpec("safree", CONCEPTS, {"alpha": "-0.5", "lra": "false"}), CPU
    )
    plain = sample(tiny, prompts, gens(2), settings, defense=kw_plain).trajectory.images
    assert not torch.equal(moved, base) and not torch.equal(moved, plain)


def test_stacks_with_negprompt_sld_and_the_safe_denoiser(tiny, tmp_path):
    samples = torch.randn(4, *tiny.latent_shape, generator=torch.Generator().manual_seed(3))
    negset = NegationSet.from_tensor(samples).save(tmp_path / "n.safetensors")
    others = f"sld:max,safe-denoiser:{negset};t_min=0,negprompt:text=a weapon and a skull"
    model, kw = apply_defenses(tiny, f"{others},safree:{CONCEPTS};alpha=-0.5;svf=false", CPU)
    assert [h.name for h in kw["guidance"]] == ["safree", "sld", "safe-denoiser"]
    assert kw["negative_embeds"].shape[0] == 1
    settings = SamplerSettings(num_steps=1, eta=1.0, guidance_scale=3.0)
    out = sample(model, ["a skull with fire", "a dog"], gens(2), settings, defense=kw)
    assert torch.isfinite(out.trajectory.images).all()
    _, kw_others = apply_defenses(tiny, others, CPU)
    without = sample(model, ["a skull with fire", "a dog"], gens(2), settings, defense=kw_others)
    assert not torch.equal(out.trajectory.images, without.trajectory.images)  # SAFREE acted


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs(tiny):
    for arg in ("text=", "text=weapon||fire", "text= | "):
        with pytest.raises(SafediffError, match="empty keyword"):
            apply_safree(tiny, DefenseSpec("safree", arg, {}), CPU)
    with pytest.raises(SafediffError, match="unknown safree concept preset"):
        keywords_of("violence")
    assert keywords_of("nudity") == SAFREE_NUDITY
    with pytest.raises(SafediffError, match="no tokens"):
        Safree(tiny, ["weapon", "\t"], SafreeConfig(), CPU)
    with pytest.raises(SafediffError, match="at least one"):
        Safree(tiny, [], SafreeConfig(), CPU)
    with pytest.raises(SafediffError, match="alpha"):
        apply_safree(tiny, DefenseSpec("safree", CONCEPTS, {"alpha": "-2"}), CPU)
    with pytest.raises(SafediffError, match="lra_s1"):
        SafreeConfig(lra_s1=1.5)
    with pytest.raises(SafediffError, match="unknown safree option"):
        apply_safree(tiny, DefenseSpec("safree", CONCEPTS, {"beta": "1"}), CPU)
    two = dict(tiny.components, text_encoder_2=tiny.components["text_encoder"])  # SDXL's layout
    with pytest.raises(SafediffError, match="one text encoder"):
        apply_safree(
            dataclasses.replace(tiny, components=two), DefenseSpec("safree", "nudity"), CPU
        )
    _, kw = apply_safree(tiny, DefenseSpec("safree", CONCEPTS, {}), CPU)
    settings = SamplerSettings(num_steps=1, eta=1.0, guidance_scale=3.0)
    embeds = tiny.encode_text(["a skull"], CPU)
    with pytest.raises(SafediffError, match="prompt_embeds"):
        sample(tiny, ["a skull"], gens(1), settings, defense=kw, prompt_embeds=embeds)
    from safediff.sampling.rollout import rollout  # the unbound hook: re-scoring is refused

    with pytest.raises(SafediffError, match="sample through"):
        rollout(tiny, embeds, None, gens(1), num_steps=1, eta=1.0, guidance_scale=1.0,
                batch_size=1, guidance=kw["guidance"])  # fmt: skip


# ------------------------------------------------------------------------------ the sandbox

SANDBOX_SPEC = f"safree:{CONCEPTS}" + "".join(f";{k}={v}" for k, v in SANDBOX_OPTIONS.items())
"""The sandbox setting (safree.py's `SANDBOX_OPTIONS`): MiniLM's betas are lower than CLIP's."""


@pytest.mark.slow
def test_safree_lowers_the_sandbox_unsafe_rate():
    import numpy as np

    from safediff.eval.stats import paired_difference
    from safediff.sandbox.captions import HELD_OUT_FAMILY
    from safediff.sandbox.demo_eval import demo_eval_prompts, generate_images
    from safediff.sandbox.detector import load_detector
    from safediff.sandbox.protocol import EVAL_SEED, SAMPLER
    from safediff.sandbox.verdicts import unsafe_flags

    model = load_t2i_model(ModelConfig(pretrained="sandbox"), device="cpu")
    examples = [
        e for e in demo_eval_prompts(0, 8, 0, EVAL_SEED) if e.metadata["family"] != HELD_OUT_FAMILY
    ]
    families = [e.metadata["family"] for e in examples]
    kwargs = dict(seed=EVAL_SEED, batch_size=32, progress=False, **SAMPLER)
    detector = load_detector(device="cpu")
    with torch.no_grad():
        base = unsafe_flags(detector.detect(generate_images(model, examples, **kwargs)), families)
        defended, kw = apply_defenses(model, SANDBOX_SPEC, CPU)
        images = generate_images(defended, examples, rollout_kwargs=kw, **kwargs)
        after = unsafe_flags(detector.detect(images), families)
    names = [f"{i:03d}" for i in range(len(examples))]
    delta = paired_difference(
        dict(zip(names, map(float, base), strict=True)),
        dict(zip(names, map(float, after), strict=True)),
        np.random.default_rng(0),
        n_resamples=1000,
    )
    assert sum(base) / len(base) >= 0.5, f"the base model must draw the concepts: {base}"
    assert delta.hi < 0, delta
