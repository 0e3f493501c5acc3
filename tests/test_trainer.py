"""GRPO trainer on the tiny offline pipeline: what a step changes, skips, checkpoints, resume."""

import json
import math
from collections import Counter

import pytest
import torch
from accelerate import Accelerator

from safediff.config import load_config
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model
from safediff.prompts import load_prompt_kinds, load_prompt_labels, load_prompts
from safediff.rewards.brightness import BrightnessReward
from safediff.rl import checkpoint as ckpt
from safediff.rl.trainer import GRPOTrainer, train
from safediff.sampling.ddim import gaussian_kl
from safediff.sampling.rollout import transition_log_prob


class ConstReward:
    name = "const"

    def __call__(self, images, prompts, metadata=None):
        return torch.full((images.shape[0],), 0.5)


class NaNFirstReward(BrightnessReward):
    """Brightness, but the first sample of every call is NaN."""

    name = "nan-first"

    def __call__(self, images, prompts, metadata=None):
        r = super().__call__(images, prompts, metadata).clone()
        r[0] = float("nan")
        return r


def make_trainer(overrides, reward=None):
    cfg = load_config(None, overrides)
    model = load_t2i_model(cfg.model, device="cpu")
    frozen = {
        name: {k: v.clone() for k, v in model.components[name].state_dict().items()}
        for name in ("vae", "text_encoder")
    }
    trainer = GRPOTrainer(
        cfg,
        model,
        reward or BrightnessReward(),
        load_prompts(cfg.prompts.file),
        Accelerator(cpu=True),
    )
    return trainer, model, frozen


def test_one_step_changes_every_trainable_parameter_and_nothing_else(tiny_overrides):
    trainer, model, frozen = make_trainer(tiny_overrides)
    before = {n: p.detach().clone() for n, p in trainer.bare_unet().named_parameters()}
    metrics = trainer.run_epoch(0)
    assert metrics["groups/zero_spread_skipped"] == 0
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    unchanged = [n for n, p in trainer.bare_unet().named_parameters() if torch.equal(p, before[n])]
    assert unchanged == [], f"parameters not updated: {unchanged[:5]}"
    for name, state in frozen.items():
        for k, v in model.components[name].state_dict().items():
            assert torch.equal(v, state[k]), f"{name}.{k} changed"


def test_lora_step_leaves_base_weights_untouched(tiny_overrides):
    trainer, _, _ = make_trainer([*tiny_overrides, "lora.enabled=true", "lora.rank=2"])
    unet = trainer.bare_unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainer.run_epoch(0)
    trainer.run_epoch(1)
    for n, p in unet.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and not torch.equal(p, before[n]), (
                f"adapter weight {n} did not change"
            )
        else:
            assert not p.requires_grad and torch.equal(p, before[n]), f"base weight {n} changed"


def test_zero_spread_groups_are_skipped_and_counted(tiny_overrides, caplog):
    trainer, _, _ = make_trainer(tiny_overrides, reward=ConstReward())
    before = {n: p.detach().clone() for n, p in trainer.bare_unet().named_parameters()}
    with caplog.at_level("INFO"):
        metrics = trainer.run_epoch(0)
    assert metrics["groups/zero_spread_skipped"] == metrics["groups/total"] == 2
    assert "every group was skipped" in caplog.text
    assert all(torch.equal(p, before[n]) for n, p in trainer.bare_unet().named_parameters())


def test_nan_reward_skips_its_group(tiny_overrides, caplog):
    trainer, _, _ = make_trainer(tiny_overrides, reward=NaNFirstReward())
    with caplog.at_level("INFO"):
        metrics = trainer.run_epoch(0)
    assert metrics["groups/nan_skipped"] == 1
    assert "non-finite" in caplog.text
    adv = trainer.last_advantages
    assert torch.all(adv[:4] == 0) and torch.any(adv[4:] != 0)
    assert math.isfinite(metrics["train/loss"])


def test_same_seed_same_epoch(tiny_overrides):
    a, _, _ = make_trainer(tiny_overrides)
    b, _, _ = make_trainer(tiny_overrides)
    a.run_epoch(0)
    b.run_epoch(0)
    assert torch.equal(a.last_rewards, b.last_rewards)
    for (n, p), (_, q) in zip(
        a.bare_unet().named_parameters(), b.bare_unet().named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n


def test_kl_to_reference_is_logged_and_finite(tiny_overrides):
    trainer, _, _ = make_trainer([*tiny_overrides, "grpo.kl_coef=0.1", "grpo.inner_epochs=2"])
    metrics = trainer.run_epoch(0)
    assert math.isfinite(metrics["train/kl"]) and metrics["train/kl"] > 0


# GatedBrightness's config name: a plug-in's (config validation knows the gates of the built-in
# rewards only and leaves a plug-in's to the trainer's GatedReward check).
GATED = "reward.name=gated_brightness"


class GatedBrightness(BrightnessReward):
    """Brightness with a steering-style gate: weight 1 for the prompts in `steered`, else 0."""

    name = "gated-brightness"

    def __init__(self, steered=()):
        super().__init__()
        self.steered = set(steered)

    def prompt_targets(self, prompts):
        return {"weight": torch.tensor([float(p in self.steered) for p in prompts])}


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.bare_unet().named_parameters()}


def test_kl_scope_unsteered_weights_each_sample_by_one_minus_its_gate(tiny_overrides):
    kl = [*tiny_overrides, GATED, "grpo.kl_coef=0.1", "grpo.inner_epochs=2"]
    prompts = load_prompts(load_config(None, kl).prompts.file)
    trainer, _, _ = make_trainer(
        [*kl, "grpo.kl_scope=unsteered"], reward=GatedBrightness(steered=prompts[:1])
    )
    weights = trainer.kl_weights([prompts[0], prompts[-1], prompts[0]])
    assert weights.tolist() == [0.0, 1.0, 0.0]
    # kl_scope 'all' has no weights
    plain, _, _ = make_trainer(kl, reward=GatedBrightness(steered=prompts))
    assert plain.kl_weights(prompts) is None

    # every prompt steered: no KL at all, the same update as without the KL term
    steered, _, _ = make_trainer(
        [*kl, "grpo.kl_scope=unsteered"], reward=GatedBrightness(steered=prompts)
    )
    free, _, _ = make_trainer(
        [*tiny_overrides, "grpo.inner_epochs=2"], reward=GatedBrightness(steered=prompts)
    )
    m_steered, m_free = steered.run_epoch(0), free.run_epoch(0)
    assert m_steered["train/kl"] == 0.0 and m_free["train/kl"] == 0.0
    p_steered, p_free = _params(steered), _params(free)
    assert all(torch.equal(p_steered[n], p_free[n]) for n in p_free)

    # no prompt steered: the whole KL, the same update as kl_scope 'all'
    held, _, _ = make_trainer([*kl, "grpo.kl_scope=unsteered"], reward=GatedBrightness())
    whole, _, _ = make_trainer(kl, reward=GatedBrightness())
    m_held, m_whole = held.run_epoch(0), whole.run_epoch(0)
    assert m_held["train/kl"] > 0 and m_held["train/kl"] == m_whole["train/kl"]
    p_held, p_whole = _params(held), _params(whole)
    assert all(torch.equal(p_held[n], p_whole[n]) for n in p_whole)
    assert not all(torch.equal(p_held[n], p_free[n]) for n in p_free)


def test_kl_scope_unsteered_runs_the_reference_only_on_unsteered_transitions(tiny_overrides):
    kl = [*tiny_overrides, GATED, "grpo.kl_coef=0.1", "grpo.kl_scope=unsteered"]
    trainer, _, _ = make_trainer([*kl, "grpo.inner_epochs=2"], reward=GatedBrightness())
    drawn = [trainer.prompts[i] for i in trainer.sample_prompt_indices(0)]
    trainer.reward.steered = {drawn[0]}  # the epoch's first group steered, the rest not
    weights = trainer.kl_weights(drawn)
    assert 0 < int((weights > 0).sum()) < len(weights)

    def full_reference_kl(out, common, kl_weights, j):
        # the plain formula: the reference on every transition, then the weights
        with torch.no_grad(), trainer._reference() as ref:
            ref_out = transition_log_prob(ref, **common)
        return gaussian_kl(out.mean, ref_out.mean, out.std, reduction="mean") * kl_weights[j]

    counted = []  # batch rows of every reference UNet call
    trainer.ref_unet.register_forward_hook(lambda m, args, out: counted.append(args[0].shape[0]))
    compared = []
    fast_kl_term = trainer._kl_term

    def both(out, common, kl_weights, j):
        before = len(counted)
        fast = fast_kl_term(out, common, kl_weights, j)
        fast_rows = sum(counted[before:])
        plain = full_reference_kl(out, common, kl_weights, j)
        g_fast = torch.autograd.grad(fast.sum(), out.mean, retain_graph=True)[0]
        g_plain = torch.autograd.grad(plain.sum(), out.mean, retain_graph=True)[0]
        compared.append((fast.detach(), plain.detach(), g_fast, g_plain, kl_weights[j], fast_rows))
        return fast

    trainer._kl_term = both
    metrics = trainer.run_epoch(0)
    assert metrics["train/kl"] > 0 and compared
    for fast, plain, g_fast, g_plain, w, fast_rows in compared:
        # equal up to float32 noise: the reference sees a smaller batch (KL up to ~10 here, its
        # gradient up to ~1.6; the paths differ by ~1e-6)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-5)
        assert torch.all(fast[w == 0] == 0)
        # CFG: one batched UNet call on [uncond, cond], two rows per unsteered transition
        assert fast_rows == 2 * int((w > 0).sum())
    assert any(int((c[4] == 0).sum()) > 0 for c in compared)  # some transitions were skipped


def test_kl_scope_unsteered_needs_a_gated_reward(tiny_overrides):
    kl = [*tiny_overrides, "grpo.kl_coef=0.1", "grpo.kl_scope=unsteered"]
    with pytest.raises(SafediffError, match="needs a reward with a gate"):  # config validation
        make_trainer(kl)
    with pytest.raises(SafediffError, match="needs a reward with a gate"):  # a plug-in: trainer
        make_trainer([*kl, GATED], reward=BrightnessReward())
    with pytest.raises(SafediffError, match="kl_scope must be"):
        load_config(None, [*tiny_overrides, "grpo.kl_scope=benign"])


def test_pg_scope_steered_trains_only_the_steered_prompts_policy_gradient(tiny_overrides):
    over = [*tiny_overrides, GATED, "grpo.pg_scope=steered", "optim.weight_decay=0"]
    trainer, _, _ = make_trainer(over, reward=GatedBrightness())
    drawn = [trainer.prompts[i] for i in trainer.sample_prompt_indices(0)]
    trainer.reward.steered = {drawn[0]}  # the epoch's first group steered, the rest not
    seen = []
    train_on = trainer.train_on
    trainer.train_on = lambda batch, epoch: seen.append(batch.advantages) or train_on(batch, epoch)
    metrics = trainer.run_epoch(0)
    steered = torch.tensor([p == drawn[0] for p in drawn])
    assert 0 < int(steered.sum()) < len(drawn)
    # the group's own advantages where steered (normalised within the group, before weighting)
    assert torch.equal(seen[0][steered], trainer.last_advantages[steered])
    assert torch.any(seen[0][steered] != 0) and torch.all(seen[0][~steered] == 0)
    assert metrics["train/pg_weight_mean"] == float(steered.float().mean())

    # every prompt steered: the same update as pg_scope 'all'
    prompts = load_prompts(load_config(None, over).prompts.file)
    scoped, _, _ = make_trainer(over, reward=GatedBrightness(steered=prompts))
    plain, _, _ = make_trainer([*tiny_overrides, "optim.weight_decay=0"], reward=GatedBrightness())
    scoped.run_epoch(0)
    plain.run_epoch(0)
    p_scoped, p_plain = _params(scoped), _params(plain)
    assert all(torch.equal(p_scoped[n], p_plain[n]) for n in p_plain)

    # no prompt steered and no KL: no gradient at all, so no weight moves
    idle, _, _ = make_trainer(over, reward=GatedBrightness())
    before = _params(idle)
    assert idle.run_epoch(0)["train/loss"] == 0.0
    after = _params(idle)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_pg_scope_steered_needs_a_gated_reward(tiny_overrides):
    with pytest.raises(SafediffError, match="pg_scope 'steered' needs a reward with a gate"):
        make_trainer([*tiny_overrides, "grpo.pg_scope=steered"])  # config validation
    with pytest.raises(SafediffError, match="pg_scope 'steered' needs a reward with a gate"):
        make_trainer([*tiny_overrides, GATED, "grpo.pg_scope=steered"], reward=BrightnessReward())
    with pytest.raises(SafediffError, match="pg_scope must be"):
        load_config(None, [*tiny_overrides, "grpo.pg_scope=unsafe"])


def test_adv_scale_pooled_is_passed_to_the_advantages(tiny_overrides):
    from safediff.rl.grpo import group_advantages

    trainer, _, _ = make_trainer([*tiny_overrides, "grpo.adv_scale=pooled"])
    trainer.run_epoch(0)
    k = trainer.cfg.grpo.group_size
    ids = torch.arange(trainer.last_rewards.shape[0]) // k
    args = {"eps": trainer.cfg.grpo.adv_eps, "clip": trainer.cfg.grpo.adv_clip}
    pooled = group_advantages(trainer.last_rewards, ids, scale="pooled", **args).advantages
    per_group = group_advantages(trainer.last_rewards, ids, **args).advantages
    assert torch.equal(trainer.last_advantages, pooled)
    assert not torch.allclose(pooled, per_group)
    with pytest.raises(SafediffError, match="adv_scale must be"):
        load_config(None, [*tiny_overrides, "grpo.adv_scale=batch"])


def _write_csv(path, header: str, rows: list[str]):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_prompts_stratify_draws_the_kinds_in_their_shares(tiny_overrides, tmp_path):
    rows = [f"safe prompt {i},safe" for i in range(6)] + [
        f"unsafe prompt {i},unsafe" for i in range(2)
    ]
    csv = _write_csv(tmp_path / "kinds.csv", "prompt,kind", rows)
    over = [*tiny_overrides, f"prompts.file={csv}", "prompts.stratify=kind"]
    cfg = load_config(None, over)
    model = load_t2i_model(cfg.model, device="cpu")
    prompts, kinds = load_prompt_kinds(str(csv))
    trainer = GRPOTrainer(
        cfg, model, BrightnessReward(), prompts, Accelerator(cpu=True), kinds=kinds
    )
    k = cfg.grpo.group_size
    n_groups = trainer.total_samples // k
    drawn = []
    for epoch in range(4):
        per_sample = trainer.sample_prompt_indices(epoch)
        groups = per_sample[::k]
        assert all(per_sample[g * k : (g + 1) * k] == [groups[g]] * k for g in range(n_groups))
        drawn += [kinds[i] for i in groups]
    assert drawn.count("unsafe") == round(len(drawn) / 4)  # the list's share, 2 of 8
    with pytest.raises(SafediffError, match="prompts.stratify=kind needs prompt kinds"):
        make_trainer([*tiny_overrides, "prompts.stratify=kind"])


def test_prompts_stratify_kind_family_draws_each_family_its_share(tiny_overrides, tmp_path):
    rows = [f"safe prompt {i},safe," for i in range(4)] + [
        f"unsafe prompt {i},unsafe,{'violence' if i < 3 else 'sexual'}" for i in range(4)
    ]
    csv = _write_csv(tmp_path / "families.csv", "prompt,kind,categories", rows)
    over = [*tiny_overrides, f"prompts.file={csv}"]
    prompts, kinds, families = load_prompt_labels(str(csv))

    def unsafe_families(stratify: str) -> Counter:
        cfg = load_config(None, [*over, f"prompts.stratify={stratify}"])
        trainer = GRPOTrainer(
            cfg,
            load_t2i_model(cfg.model, device="cpu"),
            BrightnessReward(),
            prompts,
            Accelerator(cpu=True),
            kinds=kinds,
            families=families,
        )
        k = cfg.grpo.group_size
        groups = [i for e in range(8) for i in trainer.sample_prompt_indices(e)[::k]]
        assert sum(kinds[i] == "unsafe" for i in groups) == len(groups) // 2  # kind shares kept
        return Counter(families[i] for i in groups if kinds[i] == "unsafe")

    n_unsafe = sum(unsafe_families("kind").values())
    # the list's family shares within 'unsafe': 3 of 4 violence, 1 of 4 sexual, exactly
    assert unsafe_families("kind_family") == {
        "violence": n_unsafe * 3 // 4,
        "sexual": n_unsafe // 4,
    }
    with pytest.raises(SafediffError, match="stratify=kind_family needs prompt families"):
        GRPOTrainer(
            load_config(None, [*over, "prompts.stratify=kind_family"]),
            load_t2i_model(load_config(None, over).model, device="cpu"),
            BrightnessReward(),
            prompts,
            Accelerator(cpu=True),
            kinds=kinds,
        )
    with pytest.raises(SafediffError, match="stratify must be one of none, kind, kind_family"):
        load_config(None, [*over, "prompts.stratify=family"])


def test_resume_reads_the_old_stratify_spelling_of_a_saved_run(tmp_path):
    """A run saved before prompts.stratify became one option resumes under today's spelling."""
    import yaml

    from safediff.config import to_dict
    from safediff.rl.trainer import _check_saved_config

    saved = to_dict(load_config(None, ["prompts.stratify=kind_family"]))
    saved["prompts"].update(stratify=True, stratify_by="kind_family")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved), encoding="utf-8")
    _check_saved_config(path, load_config(None, ["prompts.stratify=kind_family"]), tmp_path)
    with pytest.raises(SafediffError, match="prompts.stratify was 'kind_family', now 'kind'"):
        _check_saved_config(path, load_config(None, ["prompts.stratify=kind"]), tmp_path)


def test_non_finite_loss_stops_training_before_any_update(tiny_overrides, monkeypatch):
    import safediff.rl.trainer as trainer_module

    trainer, _, _ = make_trainer(tiny_overrides)
    before = {n: p.detach().clone() for n, p in trainer.bare_unet().named_parameters()}
    real = trainer_module.clipped_policy_loss

    def nan_loss(*args, **kwargs):
        per, stats = real(*args, **kwargs)
        return per * float("nan"), stats

    monkeypatch.setattr(trainer_module, "clipped_policy_loss", nan_loss)
    with pytest.raises(SafediffError, match="GRPO loss is not finite at epoch 0"):
        trainer.run_epoch(0)
    changed = [
        n for n, p in trainer.bare_unet().named_parameters() if not torch.equal(p, before[n])
    ]
    assert changed == []


def _perf_free(lines):
    out = []
    for line in lines:
        m = json.loads(line)
        out.append({k: v for k, v in m.items() if not k.startswith("perf/")})
    return out


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_overrides, tmp_path):
    common = [
        o
        for o in tiny_overrides
        if not o.startswith("run.output_dir") and not o.startswith("run.epochs")
    ]
    common += ["run.epochs=4", "run.save_every=1", "run.keep_last=2"]
    full = load_config(None, [*common, f"run.output_dir={tmp_path / 'full'}"])
    train(full)
    part = load_config(
        None, [*common, f"run.output_dir={tmp_path / 'part'}", "run.stop_after_epochs=2"]
    )
    first = train(part)
    assert first["end_epoch"] == 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "part")] == [
        "checkpoint-00001",
        "checkpoint-00002",
    ]
    # an epoch logged after the last checkpoint (a crash mid-way) must be dropped on resume
    with (tmp_path / "part" / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"epoch": 2.0, "bogus": 1.0}) + "\n")
    resumed = load_config(None, [*common, f"run.output_dir={tmp_path / 'part'}"])
    second = train(resumed, resume="auto")
    assert second["start_epoch"] == 2 and second["end_epoch"] == 4
    w_full = (
        ckpt.checkpoint_dir(tmp_path / "full", 4) / "unet" / "diffusion_pytorch_model.safetensors"
    )
    w_part = (
        ckpt.checkpoint_dir(tmp_path / "part", 4) / "unet" / "diffusion_pytorch_model.safetensors"
    )
    from safetensors.torch import load_file

    a, b = load_file(str(w_full)), load_file(str(w_part))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = _perf_free((tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
    lb = _perf_free((tmp_path / "part" / "metrics.jsonl").read_text().splitlines())
    assert len(la) == len(lb) == 4
    for ma, mb in zip(la, lb, strict=True):
        assert ma.keys() == mb.keys()
        for k in ma:
            if math.isnan(ma[k]):
                assert math.isnan(mb[k])
            else:
                assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-7), k
    # a fresh run into a folder that has checkpoints is refused
    from safediff.errors import SafediffError

    with pytest.raises(SafediffError, match="already has checkpoints"):
        train(resumed)


@pytest.mark.slow
def test_resume_with_changed_settings_is_refused(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides)
    train(cfg)
    changed = load_config(None, [*tiny_overrides, "grpo.group_size=8"])
    from safediff.errors import SafediffError

    with pytest.raises(SafediffError, match="grpo.group_size was 4, now 8"):
        train(changed, resume="auto")
    # a copied run folder resumes from its own checkpoints (the saved output_dir is the old one)
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    moved = [o for o in tiny_overrides if not o.startswith("run.output_dir")]
    copy_cfg = load_config(None, [*moved, f"run.output_dir={tmp_path / 'copy'}", "run.epochs=2"])
    summary = train(copy_cfg, resume="auto")
    assert summary["start_epoch"] == 1 and summary["end_epoch"] == 2
    assert ckpt.list_checkpoints(tmp_path / "copy")[-1].name == "checkpoint-00002"
    assert ckpt.list_checkpoints(tmp_path / "run")[-1].name == "checkpoint-00001"


def test_lr_schedule_linear_sets_each_epochs_rate_and_logs_it(tiny_overrides):
    over = [*tiny_overrides, "run.epochs=4", "optim.lr_schedule=linear", "optim.lr_final=0"]
    trainer, _, _ = make_trainer(over)
    for epoch in range(4):
        metrics = trainer.run_epoch(epoch)
        want = 1e-3 * (1 - epoch / 4)  # tiny_overrides: optim.lr=1e-3
        assert metrics["train/lr"] == pytest.approx(want)
        assert all(g["lr"] == pytest.approx(want) for g in trainer.optimizer.param_groups)
    with pytest.raises(SafediffError, match="lr_schedule must be"):
        load_config(None, [*tiny_overrides, "optim.lr_schedule=step"])


@pytest.mark.slow
def test_a_scheduled_run_resumes_only_with_the_same_epochs(tiny_overrides, tmp_path):
    base = [o for o in tiny_overrides if not o.startswith("run.epochs")]
    sched = [*base, "optim.lr_schedule=linear", "run.save_every=1"]
    train(load_config(None, [*sched, "run.epochs=2", "run.stop_after_epochs=1"]))
    with pytest.raises(SafediffError, match=r"run.epochs was 2, now 3 \(optim.lr_schedule"):
        train(load_config(None, [*sched, "run.epochs=3"]), resume="auto")
    summary = train(load_config(None, [*sched, "run.epochs=2"]), resume="auto")
    assert summary["start_epoch"] == 1 and summary["end_epoch"] == 2
    assert [m["train/lr"] for m in summary["history"]] == pytest.approx([5e-4])


def _unet_state(trainer_or_module):
    module = getattr(trainer_or_module, "bare_unet", lambda: trainer_or_module)()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kl", ["0", "0.1"])  # base weights from a CPU copy / the KL reference
def test_merge_weight_interpolates_the_final_unet_with_the_base(tiny_overrides, kl):
    over = [*tiny_overrides, f"grpo.kl_coef={kl}"]
    plain, _, _ = make_trainer(over)
    merged, _, _ = make_trainer([*over, "run.merge_weight=0.25"])
    base = _unet_state(merged)
    plain.run_epoch(0)
    merged.run_epoch(0)
    trained = _unet_state(plain)
    assert torch.equal(
        torch.cat([v.flatten() for v in _unet_state(merged).values()]),
        torch.cat([v.flatten() for v in trained.values()]),
    )  # same training
    final = merged.final_unet()
    assert final is not merged.bare_unet() and plain.final_unet() is plain.bare_unet()
    moved = 0
    for name, value in final.state_dict().items():
        want = base[name] + 0.25 * (trained[name] - base[name])
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(trained[name], base[name])
    assert moved > 0
    assert torch.equal(_unet_state(merged)[name], trained[name])  # the trainer's UNet untouched


def test_merge_weight_with_lora_scales_the_adapter(tiny_overrides):
    over = [*tiny_overrides, "lora.enabled=true", "lora.rank=2", "run.merge_weight=0.5"]
    trainer, _, _ = make_trainer(over)
    trainer.run_epoch(0)
    import copy

    full = copy.deepcopy(trainer.bare_unet()).merge_and_unload().state_dict()
    base = copy.deepcopy(trainer.bare_unet()).unload().state_dict()
    final = trainer.final_unet().state_dict()
    assert final.keys() == full.keys()
    assert any(not torch.equal(full[k], base[k]) for k in full)
    for k in full:
        torch.testing.assert_close(final[k], base[k] + 0.5 * (full[k] - base[k]), msg=k)


@pytest.mark.slow
def test_a_finished_run_is_merged_again_on_resume_without_training(tiny_overrides, tmp_path):
    from diffusers import UNet2DConditionModel

    train(load_config(None, tiny_overrides))
    run_dir = tmp_path / "run"
    assert not (run_dir / "merged").exists()  # weight 1: nothing to write
    summary = train(load_config(None, [*tiny_overrides, "run.merge_weight=0.5"]), resume="auto")
    assert summary["start_epoch"] == summary["end_epoch"] == 1 and summary["history"] == []
    info = json.loads((run_dir / "merged" / "merge.json").read_text())
    assert info["merge_weight"] == 0.5 and info["epoch"] == 1
    loaded = UNet2DConditionModel.from_pretrained(run_dir / "merged" / "unet")
    trained = UNet2DConditionModel.from_pretrained(
        ckpt.checkpoint_dir(run_dir, 1) / "unet"
    ).state_dict()
    base = load_t2i_model(load_config(None, tiny_overrides).model, device="cpu").unet.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, base[k] + 0.5 * (trained[k] - base[k]), msg=k)
    with pytest.raises(SafediffError, match="merge_weight must be finite"):
        load_config(None, [*tiny_overrides, "run.merge_weight=-1"])


def test_gradient_checkpointing_gives_the_same_update(tiny_overrides):
    plain, _, _ = make_trainer(tiny_overrides)
    ckpt_on, _, _ = make_trainer([*tiny_overrides, "run.gradient_checkpointing=true"])
    assert ckpt_on.bare_unet().is_gradient_checkpointing
    plain.run_epoch(0)
    ckpt_on.run_epoch(0)
    for (n, p), (_, q) in zip(
        plain.bare_unet().named_parameters(), ckpt_on.bare_unet().named_parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.slow
def test_tensorboard_events_are_written(tiny_overrides, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config(None, [*tiny_overrides, "run.log_with=tensorboard"])
    train(cfg)
    events = list((tmp_path / "run").rglob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_grpo_epoch_with_the_steering_reward(tiny_overrides, tmp_path):
    from safediff.rewards.encoders.tiny import save_tiny_hf_clip

    folder = save_tiny_hf_clip(tmp_path / "clip")
    cfg = load_config(
        None,
        [
            *tiny_overrides,
            "reward.name=steering",
            f"reward.params.encoder=hf-clip:{folder}",
            "reward.params.anchors=compact",
            "reward.params.alpha=0.5",
        ],
    )
    summary = train(cfg)
    metrics = summary["history"][0]
    assert math.isfinite(metrics["reward_mean/all"]) and metrics["reward_std/all"] > 0
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0


@pytest.mark.slow
def test_grpo_epoch_on_a_sandbox_model_with_the_sandbox_steering_reward(tiny_overrides, tmp_path):
    # The sandbox chain end to end: a (smoke-trained) sandbox UNet as model.pretrained=sandbox:PATH,
    # MiniLM conditioning, the sandbox CLIP scoring the steering reward, GRPO updating the UNet.
    from safediff.sandbox.train_diffusion import train_diffusion

    result = train_diffusion(tmp_path / "diff", steps=2, batch_size=4, progress=False, save_every=2)
    overrides = [o for o in tiny_overrides if not o.startswith(("model.", "prompts."))]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a skull\na red circle\na photo of a knife\ntwo blue squares\n")
    cfg = load_config(
        None,
        [
            *overrides,
            f"model.pretrained=sandbox:{result['weights']}",
            f"prompts.file={prompts}",
            "reward.name=steering",
            "reward.params.encoder=sandbox:default",
            "reward.params.anchors=sandbox",
            "grpo.kl_coef=0.1",
        ],
    )
    summary = train(cfg)
    metrics = summary["history"][0]
    assert summary["trainer"].model.latent_shape == (3, 32, 32)
    assert math.isfinite(metrics["reward_mean/all"]) and metrics["train/grad_norm"] > 0
    # The sandbox scheduler sets alpha to one, so its last step is deterministic: it is not
    # trained (2 of the 3 steps per sample), and the KL term stays finite.
    assert metrics["train/transitions_per_inner_epoch"] == 8 * 2
    assert math.isfinite(metrics["train/kl"]) and math.isfinite(metrics["train/loss"])


def test_min_step_std_excludes_near_deterministic_steps(tiny_overrides):
    from safediff.sampling.ddim import step_std

    trainer, model, _ = make_trainer(tiny_overrides)
    t, t_prev = model.schedule.timesteps(3)
    std = step_std(model.schedule, t, t_prev, trainer.cfg.sampling.eta)
    assert bool((std > 0).all())  # tiny-sd: no deterministic step
    assert trainer.run_epoch(0)["train/transitions_per_inner_epoch"] == 8 * 3
    cut = float(std.min()) * 1.01  # the smallest-std step (the last) is left out
    trainer, _, _ = make_trainer([*tiny_overrides, f"grpo.min_step_std={cut}"])
    assert trainer.run_epoch(0)["train/transitions_per_inner_epoch"] == 8 * 2
    trainer, _, _ = make_trainer([*tiny_overrides, f"grpo.min_step_std={float(std.max())}"])
    with pytest.raises(SafediffError, match="no trainable denoising step"):
        trainer.run_epoch(0)


def test_rewards_are_logged_per_prompt_kind(tiny_overrides, tmp_path, caplog):
    prompts = tmp_path / "mixed.csv"
    prompts.write_text(
        "prompt,kind\na red apple,safe\na blue car,safe\na skull,unsafe\na knife,unsafe\n"
    )
    cfg = load_config(None, [*tiny_overrides, f"prompts.file={prompts}"])
    with caplog.at_level("INFO"):
        metrics = train(cfg)["history"][0]
    n_safe, n_unsafe = metrics["reward_count/safe"], metrics["reward_count/unsafe"]
    assert n_safe + n_unsafe == metrics["reward_count/all"] == 8
    assert n_safe % 4 == 0 and n_unsafe % 4 == 0  # whole groups of K=4 share a prompt
    if n_safe and n_unsafe:
        weighted = (
            metrics["reward_mean/safe"] * n_safe + metrics["reward_mean/unsafe"] * n_unsafe
        ) / 8
        assert weighted == pytest.approx(metrics["reward_mean/all"], rel=1e-6)
    assert "reward[all]=" in caplog.text


# ---------------------------------------------------------------------------------------------
# The reference's switches: shared x_T, prompt passes, unbiased std


def test_shared_noise_is_one_x_T_per_epoch_and_process_with_per_sample_step_noise(tiny_overrides):
    from safediff.seeding import derive_seed, generator

    trainer, model, _ = make_trainer([*tiny_overrides, "sampling.shared_noise=true"])
    traj, prompts, _, _ = trainer.rollout_epoch(0)
    x_T = torch.randn(
        (1, *model.latent_shape), generator=generator(derive_seed(0, "shared_x_T", 0, 0))
    )
    assert all(torch.equal(traj.latents[i, 0], x_T[0]) for i in range(len(prompts)))
    k = trainer.cfg.grpo.group_size
    for start in range(0, len(prompts), k):  # a group: one prompt, one x_T, different samples
        assert len(set(prompts[start : start + k])) == 1
        for i in range(start + 1, start + k):
            assert not torch.allclose(traj.latents[i, 1], traj.latents[start, 1])
    later, _, _, _ = trainer.rollout_epoch(1)
    assert not torch.equal(later.latents[0, 0], traj.latents[0, 0])  # a new x_T every epoch
    # the second process of two (as accelerate would set it up) draws its own x_T
    trainer.world, trainer.rank, trainer.total_samples = 2, 1, 2 * trainer.total_samples
    other, _, _, _ = trainer.rollout_epoch(0)
    x_T_1 = torch.randn(
        (1, *model.latent_shape), generator=generator(derive_seed(0, "shared_x_T", 0, 1))
    )
    assert torch.equal(other.latents[0, 0], x_T_1[0]) and not torch.equal(x_T_1, x_T)


def test_a_grpo_epoch_with_shared_noise_has_groups_with_reward_spread(tiny_overrides):
    """The old quirk shared every step's noise too: one prompt's K samples were the same image,
    every group had zero spread and nothing trained."""
    trainer, _, _ = make_trainer([*tiny_overrides, "sampling.shared_noise=true"])
    metrics = trainer.run_epoch(0)
    k = trainer.cfg.grpo.group_size
    spread = trainer.last_rewards.view(-1, k).std(dim=1)
    assert metrics["groups/zero_spread_skipped"] == 0 and bool((spread > 0).all())
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0


def test_prompts_order_pass_draws_each_prompt_once_per_pass(tiny_overrides):
    trainer, _, _ = make_trainer([*tiny_overrides, "prompts.order=pass"])
    k, n = trainer.cfg.grpo.group_size, len(trainer.prompts)
    per_epoch = trainer.total_samples // k
    epochs = n // per_epoch
    drawn = [trainer.sample_prompt_indices(e)[::k] for e in range(epochs)]
    assert sorted(i for ids in drawn for i in ids) == list(range(n))
    for e in range(epochs):  # every sample of a group has the group's prompt
        ids = trainer.sample_prompt_indices(e)
        assert all(ids[g] == ids[g - g % k] for g in range(len(ids)))
    assert trainer.sample_prompt_indices(epochs)[::k] != drawn[0]  # a new permutation


def test_prompts_order_pass_needs_enough_prompts_and_no_stratify(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "prompts.order=pass"])
    model = load_t2i_model(cfg.model, device="cpu")
    with pytest.raises(SafediffError, match="prompts.order=pass needs at least one epoch's 2"):
        GRPOTrainer(cfg, model, BrightnessReward(), ["only one prompt"], Accelerator(cpu=True))
    with pytest.raises(SafediffError, match="prompts.stratify=none"):
        load_config(None, [*tiny_overrides, "prompts.order=pass", "prompts.stratify=kind"])


def test_adv_std_unbiased_is_passed_to_the_advantages(tiny_overrides):
    from safediff.rl.grpo import group_advantages

    trainer, _, _ = make_trainer([*tiny_overrides, "grpo.adv_std=unbiased"])
    trainer.run_epoch(0)
    ids = torch.arange(trainer.total_samples) // trainer.cfg.grpo.group_size
    args = {"eps": trainer.cfg.grpo.adv_eps, "clip": trainer.cfg.grpo.adv_clip}
    want = group_advantages(trainer.last_rewards, ids, std="unbiased", **args).advantages
    torch.testing.assert_close(trainer.last_advantages, want)
