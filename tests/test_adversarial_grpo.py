"""Adversarial prompts in GRPO (`prompts.adversarial`): loading, the epoch mix, what the reward
reads, resume, bad inputs."""

import json
from collections import Counter

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from safediff.config import load_config
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model
from safediff.prompts import load_prompts
from safediff.rewards.brightness import BrightnessReward
from safediff.rl import checkpoint as ckpt
from safediff.rl.adversarial_prompts import (
    RECORD_FILE,
    adversarial_group_count,
    load_adversarial_prompts,
    mix_groups,
)
from safediff.rl.trainer import GRPOTrainer, train

RECORDS = [
    {"adversarial_prompt": "zq blaze tok", "prompt": "target fire one", "success": True},
    {"adversarial_prompt": "zq blade tok", "prompt": "target knife two", "success": True},
    {"adversarial_prompt": "failed try", "prompt": "target knife two", "success": False},
    {"adversarial_prompt": "zq blaze tok", "prompt": "target fire one", "success": True},  # dup
    {"adversarial_prompt": "<ti>", "prompt": "target fire one", "prompt_embeds": "x.safetensors"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_attack_run(folder, records):
    """An attack run folder as `safediff.attacks.run.run_attack` lays it out."""
    (folder / "targets").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"format": "safediff-attack-run/1"}))
    for i, r in enumerate(records):
        rec = {"target_id": f"t{i}", "key": {"attack": "ring-a-bell"}, **r}
        (folder / "targets" / f"t{i}.json").write_text(json.dumps(rec))
    return folder


# ------------------------------------------------------------------------------ loading


def test_only_successful_text_results_are_kept_once_each(tmp_path):
    pool = load_adversarial_prompts(str(write_jsonl(tmp_path / "a.jsonl", RECORDS)))
    assert [(p.text, p.target) for p in pool.prompts] == [
        ("zq blaze tok", "target fire one"),
        ("zq blade tok", "target knife two"),
    ]
    with_failed = load_adversarial_prompts(str(tmp_path / "a.jsonl"), include_failed=True)
    assert [p.text for p in with_failed.prompts] == ["zq blaze tok", "zq blade tok", "failed try"]
    assert with_failed.digest != pool.digest


def test_an_attack_run_folder_gives_the_same_entries_and_digest_as_their_file(tmp_path):
    run = write_attack_run(tmp_path / "run", RECORDS[:2])
    file = write_jsonl(tmp_path / "a.jsonl", [{**r, "attack": "ring-a-bell"} for r in RECORDS[:2]])
    from_run, from_file = load_adversarial_prompts(str(run)), load_adversarial_prompts(str(file))
    assert [p.attack for p in from_run.prompts] == ["ring-a-bell", "ring-a-bell"]
    assert [p.target_id for p in from_run.prompts] == ["t0", "t1"]
    assert [(p.text, p.target) for p in from_run.prompts] == [
        (p.text, p.target) for p in from_file.prompts
    ]
    both = load_adversarial_prompts(f"{run},{file}")  # comma-separated sources, in order
    assert len(both.prompts) == 2  # the file's entries differ only in target_id: kept once


@pytest.mark.parametrize(
    ("records", "spec", "match"),
    [
        (None, "missing.jsonl", "not found"),
        ([RECORDS[2], RECORDS[4]], "a.jsonl", "no successful text adversarial prompts"),
        ([{"prompt": "x"}], "a.jsonl", "lacks 'adversarial_prompt' or 'prompt'"),
        ("not json\n", "a.jsonl", "line 1 is not a JSON object"),
    ],
)
def test_bad_adversarial_sources_give_one_line_errors(tmp_path, records, spec, match):
    if isinstance(records, str):
        (tmp_path / spec).write_text(records)
    elif records is not None:
        write_jsonl(tmp_path / spec, records)
    with pytest.raises(SafediffError, match=match) as err:
        load_adversarial_prompts(str(tmp_path / spec))
    assert "\n" not in str(err.value)


def test_a_folder_that_is_no_attack_run_or_a_damaged_one_is_refused(tmp_path):
    with pytest.raises(SafediffError, match="not an attack run folder"):
        load_adversarial_prompts(str(tmp_path))
    run = write_attack_run(tmp_path / "run", RECORDS[:1])
    (run / "targets" / "t0.json").write_text("{cut sho")
    with pytest.raises(SafediffError, match="t0.json is damaged"):
        load_adversarial_prompts(str(run))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("prompts.adversarial_share=1.5", r"prompts.adversarial_share must be finite, in \[0, 1\]"),
        ("prompts.adversarial_share=-0.1", "prompts.adversarial_share must be"),
        ("prompts.adversarial=' '", "prompts.adversarial must name"),
    ],
)
def test_bad_adversarial_settings_are_config_errors(override, match):
    with pytest.raises(SafediffError, match=match) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the mix


def test_the_mix_keeps_its_share_and_the_natural_order_and_is_deterministic():
    natural = [7, 3, 3, 9, 1, 0]
    n_adv = adversarial_group_count(8, 0.25)
    assert n_adv == 2 and adversarial_group_count(8, 0.3) == 2  # 2.4 -> 2
    assert adversarial_group_count(8, 0.3125) == 3  # 2.5 rounds half up
    assert adversarial_group_count(8, 1.0) == 8 and adversarial_group_count(8, 0.0) == 0
    mixed = mix_groups(natural, 5, n_adv, 100, seed=0, epoch=3)
    assert mixed == mix_groups(natural, 5, n_adv, 100, seed=0, epoch=3)
    assert len(mixed) == 8
    assert [i for i in mixed if i < 100] == natural
    adv = [i - 100 for i in mixed if i >= 100]
    assert len(adv) == 2 and len(set(adv)) == 2 and all(0 <= i < 5 for i in adv)
    # other epochs put them elsewhere / draw others (not the same draw every epoch)
    draws = {tuple(mix_groups(natural, 5, n_adv, 100, seed=0, epoch=e)) for e in range(10)}
    assert len(draws) > 5


def test_a_pool_smaller_than_its_share_is_cycled_evenly():
    mixed = mix_groups([], 3, 7, 0, seed=1, epoch=0)
    assert sorted(Counter(mixed).values()) == [2, 2, 3]


# ---------------------------------------------------------------------------- the trainer


class PromptLog(BrightnessReward):
    """Brightness, recording the prompts it was called with."""

    name = "prompt-log"

    def __init__(self):
        super().__init__()
        self.calls: list[list[str]] = []

    def __call__(self, images, prompts, metadata=None):
        self.calls.append(list(prompts))
        return super().__call__(images, prompts, metadata)


def make_trainer(overrides, reward=None):
    cfg = load_config(None, overrides)
    model = load_t2i_model(cfg.model, device="cpu")
    prompts = load_prompts(cfg.prompts.file)
    trainer = GRPOTrainer(cfg, model, reward or PromptLog(), prompts, Accelerator(cpu=True))
    return trainer


def test_the_policy_sees_the_adversarial_text_and_the_reward_its_target(tiny_overrides, tmp_path):
    file = write_jsonl(tmp_path / "adv.jsonl", RECORDS)
    reward = PromptLog()
    trainer = make_trainer(
        [*tiny_overrides, f"prompts.adversarial={file}", "prompts.adversarial_share=0.5"], reward
    )
    natural = set(load_prompts("builtin:smoke"))
    _, conditions, _, _ = trainer.rollout_epoch(0)
    reward_prompts = trainer.reward_prompts(0)
    pairs = {("zq blaze tok", "target fire one"), ("zq blade tok", "target knife two")}
    k = trainer.cfg.grpo.group_size
    adversarial = [(c, r) for c, r in zip(conditions, reward_prompts, strict=True) if c != r]
    assert len(adversarial) == k  # one of the epoch's two groups, all K samples
    assert set(adversarial) <= pairs
    assert all(c in natural for c, r in zip(conditions, reward_prompts, strict=True) if c == r)
    metrics = trainer.run_epoch(0)
    assert reward.calls[-1] == reward_prompts  # the reward reads the targets
    assert metrics["reward_count/adversarial"] == k


def test_share_zero_draws_exactly_what_a_run_without_adversarial_prompts_draws(
    tiny_overrides, tmp_path
):
    file = write_jsonl(tmp_path / "adv.jsonl", RECORDS)
    plain = make_trainer(tiny_overrides)
    zero = make_trainer(
        [*tiny_overrides, f"prompts.adversarial={file}", "prompts.adversarial_share=0"]
    )
    for epoch in range(4):
        assert zero.sample_prompt_indices(epoch) == plain.sample_prompt_indices(epoch)


def _unet_weights(run_dir, epoch):
    path = ckpt.checkpoint_dir(run_dir, epoch) / "unet" / "diffusion_pytorch_model.safetensors"
    return load_file(str(path))


def test_resume_with_the_same_prompts_is_exact_and_a_changed_file_is_refused(
    tiny_overrides, tmp_path
):
    file = write_jsonl(tmp_path / "adv.jsonl", RECORDS)
    common = [o for o in tiny_overrides if not o.startswith(("run.output_dir", "run.epochs"))]
    common += [f"prompts.adversarial={file}", "prompts.adversarial_share=0.5", "run.epochs=2"]
    train(load_config(None, [*common, f"run.output_dir={tmp_path / 'full'}"]))
    part = [*common, f"run.output_dir={tmp_path / 'part'}"]
    train(load_config(None, [*part, "run.stop_after_epochs=1"]))
    record = json.loads((tmp_path / "part" / RECORD_FILE).read_text())
    assert [p["text"] for p in record["prompts"]] == ["zq blaze tok", "zq blade tok"]
    assert train(load_config(None, part), resume="auto")["start_epoch"] == 1
    a, b = _unet_weights(tmp_path / "full", 2), _unet_weights(tmp_path / "part", 2)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the file changes: resuming the same run is refused, a new round in a new folder is not
    write_jsonl(file, RECORDS[:1])
    more = [*part[:-1], "run.epochs=3", f"run.output_dir={tmp_path / 'part'}"]
    with pytest.raises(SafediffError, match="adversarial prompts changed") as err:
        train(load_config(None, more), resume="auto")
    assert "\n" not in str(err.value)
    round_2 = [*more[:-1], f"run.output_dir={tmp_path / 'round2'}", "prompts.adversarial_share=1"]
    start = ckpt.checkpoint_dir(tmp_path / "part", 2)
    summary = train(load_config(None, round_2), resume=str(start))
    assert summary["start_epoch"] == 2 and summary["end_epoch"] == 3
    assert len(json.loads((tmp_path / "round2" / RECORD_FILE).read_text())["prompts"]) == 1


# ------------------------------------------------------------------------------ the recipe


def _recipe_module():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "recipes" / "sandbox_adversarial_grpo.py"
    spec = importlib.util.spec_from_file_location("_adversarial_grpo_recipe", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_targets_are_train_split_prompts_never_evaluation_targets():
    from safediff.attacks.targets import load_targets
    from safediff.prompts import load_prompt_labels

    m = _recipe_module()
    evaluation = {t.prompt for t in load_targets("sandbox").targets}
    prompts, kinds, _ = load_prompt_labels("sandbox:grpo_train")
    explicit = {p for p, k in zip(prompts, kinds, strict=True) if k == "explicit"}
    rounds = [m.training_targets(2, r) for r in range(2)]
    for targets in rounds:
        assert Counter(t.concept for t in targets) == {"fire": 2, "skull": 2, "weapon": 2}
        for t in targets:
            assert t.prompt in explicit and t.prompt not in evaluation
            assert t.concept in t.banned_words
    assert not {t.prompt for t in rounds[0]} & {t.prompt for t in rounds[1]}  # fresh targets
    with pytest.raises(SafediffError, match="no training targets left"):
        m.training_targets(1000, 5)


@pytest.mark.slow
def test_recipe_smoke_run_trains_two_rounds_and_resumes(tmp_path):
    m = _recipe_module()
    argv = ["--out", str(tmp_path / "adv"), "--smoke", "--threads", "1", "--no-progress"]
    assert m.main(argv) == 0
    rounds = json.loads((tmp_path / "adv" / "rounds.json").read_text())
    assert [r["epochs"] for r in rounds["rounds"]] == [[0, 1], [1, 2]]
    first, second = (tmp_path / "adv" / f"round-{r}" / "train" for r in range(2))
    assert [c.name for c in ckpt.list_checkpoints(second)] == ["checkpoint-00002"]
    assert (second / "merged" / "merge.json").is_file()
    # round 1 trains on round 0's prompts and its own
    n0 = len(json.loads((first / RECORD_FILE).read_text())["prompts"])
    n1 = len(json.loads((second / RECORD_FILE).read_text())["prompts"])
    assert rounds["rounds"][1]["adversarial_prompts"] == n1 > n0 > 0
    metrics = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in metrics] == [1.0] and metrics[0]["reward_count/adversarial"] > 0
    before = (second / "metrics.jsonl").read_text()
    assert m.main(argv) == 0  # a rerun trains and attacks nothing again
    assert (second / "metrics.jsonl").read_text() == before
