"""Typed config: presets, dotted overrides, validation, round-trip through the saved YAML, the
help of every field (`config --explain`, docs/config.md) and the old spellings."""

import dataclasses
import logging
import math
import typing
from pathlib import Path

import pytest
import yaml

from safediff.config import (
    REWARD_HAS_GATE,
    Bounds,
    RewardConfig,
    TrainConfig,
    config_markdown,
    field_help,
    field_rule,
    load_config,
    preset_names,
    save_config,
    to_dict,
)
from safediff.errors import SafediffError


def test_defaults_match_reference_run():
    cfg = TrainConfig()
    assert (
        cfg.sampling.num_steps == 50
        and cfg.sampling.eta == 1.0
        and cfg.sampling.guidance_scale == 5.0
    )
    assert cfg.grpo.group_size == 16 and cfg.grpo.clip_range == 1e-4 and cfg.grpo.adv_clip == 2.5
    assert cfg.optim.lr == 1e-5 and cfg.optim.weight_decay == 1e-4
    assert cfg.grpo.kl_coef == 0.0 and cfg.grpo.logprob_reduction == "mean"


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "grpo.group_size=4",
            "optim.lr=3e-4",
            "lora.enabled=true",
            "reward.params.target=0.7",
            "model.unet_weights=null",
        ],
    )
    assert cfg.grpo.group_size == 4
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.lora.enabled is True
    assert cfg.reward.params == {"target": 0.7}
    assert cfg.model.unet_weights is None


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(SafediffError, match="grpo.group_size"):
        load_config(None, ["grpo.group_size=2.5"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("grpo.gruop_size=4", "unknown config key 'grpo.gruop_size'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("grpo.group_size", "must look like section.key=value"),
        ("lora.enabled=maybe", "lora.enabled"),
        ("sampling.eta=0", "eta"),
        ("grpo.timestep_fraction=1.5", "timestep_fraction"),
        ("run.mixed_precision=fp8", "mixed_precision"),
        ("grpo.batching=timesteps", "grpo.batching must be one of transitions, samples"),
        ("grpo.adv_std=sample", "grpo.adv_std must be one of population, unbiased"),
        ("prompts.order=sequential", "prompts.order must be one of random, pass"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(
        SafediffError, match=fragment.replace("(", r"\(").replace(")", r"\)")
    ) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_unknown_key_error_lists_valid_keys():
    with pytest.raises(SafediffError, match="group_size"):
        load_config(None, ["grpo.nope=1"])


def test_presets_load_and_round_trip(tmp_path):
    names = preset_names()
    assert {"sd15-paper", "sd15-lora-24gb", "tiny-demo"} <= set(names)
    for name in names:
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        save_config(cfg, path)
        assert load_config(str(path)) == cfg
        assert to_dict(load_config(str(path))) == to_dict(cfg)


def test_paper_preset_has_section3_defaults():
    cfg = load_config("sd15-paper")
    assert cfg.lora.enabled is False and cfg.run.num_processes == 8
    assert cfg.run.mixed_precision == "bf16" and cfg.run.epochs == 300
    assert cfg.sampling.num_steps == 50 and cfg.grpo.group_size == 16
    lora = load_config("sd15-lora-24gb")
    assert lora.lora.enabled is True and lora.run.num_processes == 1


def test_missing_preset_and_file(tmp_path):
    with pytest.raises(SafediffError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(SafediffError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [1, 2\n")
    with pytest.raises(SafediffError, match="not valid YAML"):
        load_config(str(bad))


def test_param_overrides_merge_into_the_preset_params():
    cfg = load_config(
        "sd15-paper", ["reward.params.alpha=0.7", "reward.params.encoder=hf-clip:/w/clip"]
    )
    assert cfg.reward.params["alpha"] == 0.7
    assert cfg.reward.params["encoder"] == "hf-clip:/w/clip"
    assert cfg.reward.params["anchors"] == "compact"


# ---------------------------------------------------------------------------------------------
# Help: every field documented, `config --explain`, docs/config.md

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTAL = {
    "grpo.kl_scope",
    "grpo.pg_scope",
    "grpo.adv_scale",
    "grpo.min_step_std",
    "prompts.stratify",
    "optim.lr_schedule",
    "optim.lr_final",
    "run.merge_weight",
}


def _leaf_fields():
    """(dotted key, field, annotation) of every field of every TrainConfig section."""
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{section.name}.{f.name}", f, hints[f.name]


def _numeric(tp) -> bool:
    args = typing.get_args(tp) or (tp,)
    return any(a in (int, float) for a in args) and bool not in args


def test_every_field_has_help_and_every_number_a_range():
    for section in dataclasses.fields(TrainConfig):
        assert section.metadata.get("help"), f"section {section.name} has no help"
    keys = []
    for key, f, tp in _leaf_fields():
        keys.append(key)
        assert len(f.metadata.get("help", "")) > 10, f"{key} has no help"
        if _numeric(tp):
            assert f.metadata.get("bounds") is not None, f"{key}: a number without a range"
            assert "Valid: " in field_help(f), key
    assert len(keys) >= 50


def test_experimental_options_are_marked_in_help_and_docs():
    marked = {key for key, f, _ in _leaf_fields() if f.metadata.get("experimental")}
    assert marked == EXPERIMENTAL
    docs = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    for key, f, _ in _leaf_fields():
        line = next(line for line in docs.splitlines() if line.startswith(f"- **`{key}`**"))
        assert ("*experimental*" in line) == (key in EXPERIMENTAL), key
        assert field_help(f).startswith("Experimental") == (key in EXPERIMENTAL), key


def test_docs_config_md_is_up_to_date():
    docs = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert docs == config_markdown(), (
        "docs/config.md is stale: python -m safediff.config --markdown > docs/config.md"
    )


def test_config_explain_prints_every_field_with_value_default_and_help(capsys):
    from safediff.cli import main

    assert main(["config", "--explain", "--preset", "tiny-demo", "grpo.group_size=8"]) == 0
    out = capsys.readouterr().out
    for key, _, _ in _leaf_fields():
        assert f"{key} = " in out, key
    assert "* grpo.group_size = 8  (int, default 16)" in out
    assert "  optim.beta1 = 0.9  (float, default 0.9)" in out
    assert "AdamW decay rate of the first-moment" in out and "Valid: finite, in [0, 1)." in out
    assert main(["config", "--explain", "optim.lr=nan"]) == 2
    assert "optim.lr must be finite, > 0; got nan" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Number validation: one rule per option, stated in its help


def _bad_values(f, tp):
    """Values just outside the field's range (and non-finite ones for floats)."""
    b = f.metadata["bounds"]
    is_float = float in (typing.get_args(tp) or (tp,))
    num = float if is_float else int
    step = 0.5 if is_float else 1
    bad = [num(b.lo) if b.lo_open else num(b.lo) - step]
    if math.isfinite(b.hi):
        bad.append(num(b.hi) if b.hi_open else num(b.hi) + step)
    if is_float:
        bad += ["nan", ".nan", "inf", "-inf", "1e309"]
    return bad


NUMERIC = [(key, f, tp) for key, f, tp in _leaf_fields() if _numeric(tp)]


@pytest.mark.parametrize("key, f, tp", NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_every_number_is_checked_against_its_range(key, f, tp):
    for value in _bad_values(f, tp):
        with pytest.raises(SafediffError) as err:
            load_config(None, [f"{key}={value}"])
        message = str(err.value)
        assert "\n" not in message
        assert f"{key} must be {field_rule(f)}; got" in message, message
    b = f.metadata["bounds"]
    edge = b.lo if not b.lo_open else (b.lo + b.hi) / 2 if math.isfinite(b.hi) else b.lo + 1
    edge = edge if float in (typing.get_args(tp) or (tp,)) else int(edge)
    value = getattr(getattr(load_config(None, [f"{key}={edge}"]), key.split(".")[0]), f.name)
    assert value == edge


@pytest.mark.parametrize(
    "override, fragment",
    [
        # the cases of issue 27
        ("optim.lr=1e309", "optim.lr must be finite, > 0; got inf"),
        ("optim.lr=0", "optim.lr must be finite, > 0; got 0.0"),
        ("optim.beta1=2", "optim.beta1 must be finite, in [0, 1); got 2.0"),
        ("optim.beta2=1", "optim.beta2 must be finite, in [0, 1); got 1.0"),
        ("optim.eps=-1", "optim.eps must be finite, > 0; got -1.0"),
        ("optim.weight_decay=nan", "optim.weight_decay must be finite, >= 0; got nan"),
        ("lora.dropout=7", "lora.dropout must be finite, in [0, 1); got 7.0"),
        ("lora.alpha=nan", "lora.alpha must be finite, > 0; got nan"),
        ("sampling.guidance_scale=1e309", "sampling.guidance_scale must be finite, >= 1"),
        ("sampling.guidance_scale=0.5", "sampling.guidance_scale must be finite, >= 1"),
        ("sampling.eta=.nan", "sampling.eta must be finite, in (0, 1]; got nan"),
        ("sampling.eta=1.5", "sampling.eta must be finite, in (0, 1]; got 1.5"),
        ("grpo.group_size=1", "grpo.group_size must be >= 2; got 1"),
        ("run.merge_weight=-.inf", "run.merge_weight must be finite, >= 0; got -inf"),
        ("model.resolution=0", "model.resolution must be >= 1; got 0"),
        ("grpo.adv_scale=median", "grpo.adv_scale must be one of group, pooled; got 'median'"),
    ],
)
def test_issue_27_numbers_are_refused_in_one_line(override, fragment):
    with pytest.raises(SafediffError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_optional_numbers_accept_null_and_help_states_each_range():
    cfg = load_config(None, ["model.resolution=null", "run.stop_after_epochs=null"])
    assert cfg.model.resolution is None and cfg.run.stop_after_epochs is None
    fields = {key: f for key, f, _ in _leaf_fields()}
    assert field_rule(fields["optim.beta1"]) == "finite, in [0, 1)"
    assert field_rule(fields["sampling.guidance_scale"]) == "finite, >= 1"
    assert field_rule(fields["grpo.group_size"]) == ">= 2"
    assert field_rule(fields["grpo.kl_scope"]) == "one of all, unsteered"


def test_bounds_parse_and_membership():
    assert 0.0 in Bounds.parse("[0, 1)") and 1.0 not in Bounds.parse("[0, 1)")
    assert 1.0 in Bounds.parse("(0, 1]") and 0.0 not in Bounds.parse("(0, 1]")
    assert 0.0 not in Bounds.parse("> 0") and 0.0 in Bounds.parse(">= 0")
    assert math.inf not in Bounds.parse(">= 0") and math.nan not in Bounds.parse(">= 0")
    with pytest.raises(ValueError, match="bad bounds"):
        Bounds.parse("0..1")


# ---------------------------------------------------------------------------------------------
# Cross-field rules and reward capabilities


def test_scopes_need_a_gated_reward_where_the_config_can_tell():
    with pytest.raises(SafediffError, match="kl_scope 'unsteered' needs a reward with a gate"):
        load_config(None, ["grpo.kl_scope=unsteered", "grpo.kl_coef=0.1"])
    with pytest.raises(SafediffError, match="pg_scope 'steered' needs a reward with a gate"):
        load_config(None, ["grpo.pg_scope=steered", "reward.name=alignment"])
    # no KL term, nothing to scope
    assert load_config(None, ["grpo.kl_scope=unsteered"]).grpo.kl_scope == "unsteered"
    steering = ["reward.name=steering", "grpo.kl_coef=0.1"]
    load_config(None, [*steering, "grpo.kl_scope=unsteered", "grpo.pg_scope=steered"])
    # a plug-in's gate is checked by the trainer (isinstance GatedReward)
    load_config(None, ["reward.name=my_plugin", "grpo.pg_scope=steered"])


def test_prompt_pass_does_not_stratify():
    with pytest.raises(SafediffError, match="prompts.order 'pass' .* use prompts.stratify=none"):
        load_config(None, ["prompts.order=pass", "prompts.stratify=kind"])
    assert load_config(None, ["prompts.order=pass"]).prompts.order == "pass"


def test_reward_gate_table_matches_the_builders_protocols():
    from safediff.rewards.base import CachedReward, GatedReward
    from safediff.rewards.brightness import BrightnessReward
    from safediff.rewards.registry import REWARD_BUILDERS
    from safediff.rewards.steering_reward import SteeringReward

    for name, gated in REWARD_HAS_GATE.items():
        builder = REWARD_BUILDERS[name]
        builder = getattr(builder, "func", builder)  # functools.partial
        returns = builder if isinstance(builder, type) else typing.get_type_hints(builder)["return"]
        assert issubclass(returns, GatedReward) == gated, name
    assert issubclass(SteeringReward, CachedReward) and not issubclass(
        BrightnessReward, CachedReward
    )
    assert not isinstance(BrightnessReward(), GatedReward)


@pytest.mark.parametrize(
    "name, params, fragment",
    [
        (
            "steering",
            {"encoder": "x", "alpha": "strong"},
            "reward.params.alpha='strong' must be a finite number; e.g. reward.params.alpha=0.5",
        ),
        (
            "steering",
            {"encoder": "x", "alpha": math.nan},
            "reward.params.alpha=nan must be a finite number",
        ),
        ("steering", {"encoder": 3}, "reward.params.encoder=3 must be a string"),
        (
            "steering",
            {"encoder": "x", "jpeg_parity": 1},
            "reward.params.jpeg_parity=1 must be true or false",
        ),
        (
            "steering",
            {"encoder": "x", "chunk_size": 2.5},
            "chunk_size=2.5 must be an integer or null",
        ),
        ("alignment", {"encoder": "x", "dtype": 16}, "reward.params.dtype=16 must be a string"),
        ("brightness", {"target": "bright"}, "target='bright' must be a finite number or null"),
        ("weighted", {"components": "steering"}, "components='steering' must be a list"),
    ],
)
def test_reward_params_are_type_checked_in_one_line(name, params, fragment):
    from safediff.rewards.registry import check_reward_params

    with pytest.raises(SafediffError) as err:
        check_reward_params(RewardConfig(name=name, params=params))
    message = str(err.value)
    assert fragment in message and f"reward {name!r}" in message and "\n" not in message


def test_preset_reward_params_have_the_builders_types():
    from safediff.rewards.registry import check_reward_params

    for name in preset_names():
        check_reward_params(load_config(name).reward)


# ---------------------------------------------------------------------------------------------
# prompts.stratify: one option; the old stratify + stratify_by spellings still load


@pytest.mark.parametrize(
    "old, new",
    [
        ({"stratify": True}, "kind"),
        ({"stratify": False}, "none"),
        ({"stratify": True, "stratify_by": "kind_family"}, "kind_family"),
        ({"stratify": False, "stratify_by": "kind_family"}, "none"),
        ({"stratify_by": "kind_family"}, "none"),
        ({"stratify": "kind", "stratify_by": "kind_family"}, "kind_family"),
    ],
)
def test_old_stratify_spellings_load_with_a_warning(old, new, tmp_path, caplog):
    saved = to_dict(TrainConfig())
    saved["prompts"] = {"file": "builtin:smoke", **old}
    path = tmp_path / "config.yaml"  # a run's config.yaml from an earlier version
    path.write_text(yaml.safe_dump(saved), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="safediff.config"):
        cfg = load_config(str(path))
    assert cfg.prompts.stratify == new
    assert "deprecated" in caplog.text and f"prompts.stratify={new}" in caplog.text
    save_config(cfg, path)
    assert "stratify_by" not in path.read_text() and load_config(str(path)) == cfg


def test_old_stratify_overrides_and_the_new_option(caplog):
    with caplog.at_level(logging.WARNING, logger="safediff.config"):
        old = load_config(None, ["prompts.stratify=true", "prompts.stratify_by=kind_family"])
    assert old.prompts.stratify == "kind_family" and "deprecated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="safediff.config"):
        new = load_config(None, ["prompts.stratify=kind_family"])
    assert new == old and not caplog.text
    assert load_config("sandbox-demo").prompts.stratify == "kind" and not caplog.text
    with pytest.raises(SafediffError, match="prompts.stratify must be one of none, kind, kind_fam"):
        load_config(None, ["prompts.stratify=true", "prompts.stratify_by=family"])
