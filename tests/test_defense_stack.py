"""DefenseStack: spec parsing and canonical order, and all four defenses together on tiny-sd
(DES encoder swap, negative prompt, SLD, Safe Denoiser), on-policy through every hook."""

import pytest
import torch

from safediff.defenses.des import DESConfig, train_des
from safediff.defenses.negative_prompt import NEGATIVE_PROMPT_PRESETS
from safediff.defenses.safe_denoiser import NegationSet, SafeDenoiser
from safediff.defenses.sld import SafeLatentDiffusion
from safediff.defenses.stack import DefenseStack, apply_defenses, parse_defense_spec
from safediff.defenses.text_encoder_adapter import adapter_for_model
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.stable_diffusion import sd_components_to_t2i
from safediff.models.tiny_sd import build_tiny_sd
from safediff.sampling.rollout import rollout, transition_log_prob

PROMPTS = ["a nude woman on a beach", "a red car", "a bowl of fruit"]
STEPS = 6


@pytest.fixture(scope="module")
def model() -> T2IModel:
    return sd_components_to_t2i(build_tiny_sd(seed=0), "tiny-sd")


def test_spec_parsing_and_canonical_order() -> None:
    stack = DefenseStack.parse(
        "safe-denoiser:/x/neg.safetensors;scale=0.5;preset=nudity-paper, sld:max,"
        " negprompt:nudity,des:/runs/des"
    )
    assert [s.kind for s in stack.specs] == ["des", "negprompt", "sld", "safe-denoiser"]
    sd = stack.get("safe-denoiser")
    assert sd.arg == "/x/neg.safetensors" and sd.options == {
        "scale": "0.5",
        "preset": "nudity-paper",
    }
    assert str(stack).startswith("des:/runs/des,negprompt:nudity,sld:max,safe-denoiser:")
    assert DefenseStack.parse("").specs == () and str(DefenseStack.parse(None)) == "none"
    assert parse_defense_spec("safe_denoiser:a.safetensors").kind == "safe-denoiser"
    for bad, message in [
        ("sld", "KIND:ARG"),
        ("foo:bar", "unknown defense kind"),
        ("sld:medium,sld:max", "more than once"),
        ("sld:", "empty argument"),
        ("sld:medium;oops", "key=value"),
    ]:
        with pytest.raises(SafediffError, match=message):
            DefenseStack.parse(bad)


def test_options_and_presets_are_checked(model: T2IModel, tmp_path) -> None:
    path = NegationSet.from_tensor(torch.randn(5, 4, 8, 8)).save(tmp_path / "neg.safetensors")
    _, kw = apply_defenses(model, f"safe-denoiser:{path};preset=nudity-paper;scale=0.5;t_min=10")
    (hook,) = kw["guidance"]
    assert hook.cfg.update == "paper" and hook.cfg.scale == 0.5 and hook.cfg.t_min == 10
    _, kw = apply_defenses(model, f"safe-denoiser:{path};gate_threshold=2e-3")
    assert kw["guidance"][0].gate_threshold == pytest.approx(2e-3)
    ref = NegationSet.from_tensor(torch.randn(3, 4, 8, 8)).save(tmp_path / "ref.safetensors")
    _, kw = apply_defenses(model, f"safe-denoiser:{path};gate=odds;reference={ref};prior_odds=0.01")
    (hook,) = kw["guidance"]
    assert hook.cfg.gate == "odds" and hook.cfg.prior_odds == 0.01
    torch.testing.assert_close(hook.reference.samples, NegationSet.load(ref).samples)
    with pytest.raises(SafediffError, match="reference set"):
        apply_defenses(model, f"safe-denoiser:{path};gate=odds")
    _, kw = apply_defenses(model, "sld:strong;sld_threshold=0.02;sld_warmup_steps=3")
    assert (
        kw["guidance"][0].cfg.sld_threshold == 0.02 and kw["guidance"][0].cfg.sld_warmup_steps == 3
    )
    for spec, message in [
        ("sld:extreme", "unknown SLD preset"),
        ("sld:medium;nope=1", "unknown sld option"),
        ("sld:medium;sld_warmup_steps=abc", "wrong type"),
        (f"safe-denoiser:{path};preset=other", "unknown Safe Denoiser preset"),
        ("negprompt:violence", "unknown negative prompt preset"),
        ("negprompt:nudity;x=1", "takes no options"),
        (f"safe-denoiser:{tmp_path / 'missing.safetensors'}", "not found"),
        (f"des:{tmp_path}", "config.json"),
    ]:
        with pytest.raises(SafediffError, match=message):
            apply_defenses(model, spec)
    same, kw = apply_defenses(model, None)
    assert same is model and kw == {"guidance": []}


def test_all_four_defenses_on_tiny_sd(model: T2IModel, tmp_path) -> None:
    # DES: a (briefly) trained encoder; Safe Denoiser: a negation set near the samples
    cfg = DESConfig(lr=1e-3, batch_size=4, epochs=1, concept_scale=5.0)
    des = train_des(adapter_for_model(model), ["a red car", "a dog"], ["a nude woman"], cfg)
    des_dir = des.adapter.save(tmp_path / "des")
    negset = NegationSet.from_tensor(
        torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    )
    neg_path = negset.save(tmp_path / "negset.safetensors")
    spec = (
        f"sld:medium;sld_warmup_steps=1,safe-denoiser:{neg_path};gate_threshold=0;t_min=0,"
        f"negprompt:nudity,des:{des_dir}"
    )
    defended, kw = apply_defenses(model, spec)
    assert [type(h) for h in kw["guidance"]] == [SafeLatentDiffusion, SafeDenoiser]
    # DES is applied first: prompts, the negative prompt and the SLD concept use its encoder
    with torch.no_grad():
        want = des.adapter.encode([NEGATIVE_PROMPT_PRESETS["nudity"]])
    torch.testing.assert_close(kw["negative_embeds"], want)
    assert not torch.allclose(
        defended.encode_text(PROMPTS, "cpu"), model.encode_text(PROMPTS, "cpu")
    )
    assert defended.unet is model.unet

    cond = defended.encode_text(PROMPTS, "cpu")
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    args = dict(num_steps=STEPS, eta=1.0, guidance_scale=4.0, batch_size=3)
    traj = rollout(defended, cond, generators=gens, **args, **kw)
    assert traj.images is not None and torch.isfinite(traj.images).all()
    assert traj.images.shape == (3, 3, 16, 16)
    plain = rollout(
        model, model.encode_text(PROMPTS, "cpu"), model.encode_text([""], "cpu"),
        [torch.Generator().manual_seed(i) for i in range(3)], **args,
    )  # fmt: skip
    assert (traj.latents[:, -1] - plain.latents[:, -1]).abs().max() > 1e-2
    assert [sorted(s) for s in traj.guidance_states] == [["momentum"], []]

    # GRPO on the defended sampler stays on-policy: re-scoring every step gives the stored log-prob
    n_idx = torch.arange(3).repeat_interleave(STEPS)
    s_idx = torch.arange(STEPS).repeat(3)
    with torch.no_grad():
        out = transition_log_prob(
            defended.unet,
            defended.schedule,
            traj.latents[n_idx, s_idx],
            traj.latents[n_idx, s_idx + 1],
            traj.timesteps[s_idx],
            traj.prev_timesteps[s_idx],
            cond[n_idx],
            kw["negative_embeds"],
            4.0,
            1.0,
            guidance=kw["guidance"],
            step_index=s_idx,
            guidance_states=traj.guidance_states_at(n_idx, s_idx),
        )
    torch.testing.assert_close(out.log_prob, traj.log_probs[n_idx, s_idx], rtol=0, atol=1e-4)


def test_options_parse_yaml_lists_into_tuple_fields():
    from safediff.attacks.ring_a_bell import RingABellConfig
    from safediff.defenses.stack import with_options

    cfg = with_options(RingABellConfig(), {"pairs": "[[a knife, a], [a gun, a]]"}, "attack")
    assert cfg.pairs == (("a knife", "a"), ("a gun", "a"))
    with pytest.raises(SafediffError, match="YAML list"):
        with_options(RingABellConfig(), {"pairs": "a knife"}, "attack")
