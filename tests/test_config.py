"""Typed config: presets, dotted overrides, validation, round-trip through the saved YAML."""

import pytest

from safediff.config import TrainConfig, load_config, preset_names, save_config, to_dict
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
