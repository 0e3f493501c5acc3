"""The `sd15-paper` preset trains what the SafeDiffusion-R1 reference code trains.

The reference's numbers are written out here by hand from its code (fastvideo/train.py with
scripts/run_train.sh: 8 processes, `sample.batch_size=4` prompts per process, `num_generations=16`,
`train.batch_size=4`, `gradient_accumulation_steps=1`, 50 DDIM steps of which `[:, :-1]` are
trained); the preset's numbers are computed from the loaded config by the trainer's own functions.
A tiny-sd run then checks that the trainer takes exactly as many optimizer steps as those
functions say.
"""

import pytest
import torch
from accelerate import Accelerator

from safediff.config import load_config
from safediff.models.loading import load_t2i_model
from safediff.prompts import load_prompts
from safediff.rewards.brightness import BrightnessReward
from safediff.rl.trainer import (
    GRPOTrainer,
    optimizer_steps_per_epoch,
    prompt_pass_indices,
    update_plan,
    update_shape,
)
from safediff.sampling.schedule import DDIMSchedule

# Stable Diffusion 1.5's scheduler config (its scheduler/scheduler_config.json, the beta fields).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)

# The reference run, by hand.
REF_PROCESSES = 8
REF_PROMPTS_PER_PROCESS = 4  # config.sample.batch_size
REF_K = 16  # config.num_generations
REF_SAMPLES_PER_RANK = REF_PROMPTS_PER_PROCESS * REF_K  # 64 trajectories per process per epoch
REF_MINIBATCH = 4  # config.train.batch_size: 4 consecutive samples, one prompt's
REF_TRAINED_TIMESTEPS = 50 - 1  # samples["timesteps"] = timesteps[:, :-1]
REF_STEPS_PER_EPOCH = REF_SAMPLES_PER_RANK // REF_MINIBATCH  # one step per minibatch: 16
REF_EPOCHS = 300
REF_TOTAL_STEPS = 4_800


def sd15_schedule() -> DDIMSchedule:
    return DDIMSchedule.from_scheduler_config(SD15_SCHEDULER)


def test_reference_numbers_are_consistent():
    assert REF_SAMPLES_PER_RANK == 64 and REF_STEPS_PER_EPOCH == 16
    assert REF_STEPS_PER_EPOCH * REF_EPOCHS == REF_TOTAL_STEPS


def test_paper_preset_derives_the_reference_update_counts():
    cfg = load_config("sd15-paper")
    shape = update_shape(cfg, sd15_schedule())
    assert shape.samples_per_rank == REF_SAMPLES_PER_RANK
    assert shape.transitions_per_backward == REF_MINIBATCH  # one timestep of 4 samples
    assert shape.trained_steps == REF_TRAINED_TIMESTEPS  # 49 of 50: the last never trained
    assert shape.backwards_per_step == REF_TRAINED_TIMESTEPS  # 4 samples x 49 timesteps a step
    assert shape.optimizer_steps_per_epoch == REF_STEPS_PER_EPOCH
    assert optimizer_steps_per_epoch(cfg, sd15_schedule()) * cfg.run.epochs == REF_TOTAL_STEPS
    assert cfg.run.num_processes == REF_PROCESSES and cfg.run.epochs == REF_EPOCHS
    assert cfg.grpo.samples_per_process // cfg.grpo.group_size == REF_PROMPTS_PER_PROCESS


def test_paper_preset_plan_minibatches_hold_one_prompts_consecutive_samples():
    """The plan the trainer follows, on the preset: each optimizer step is 4 consecutive samples
    of one group, backpropagated one timestep each, every trained timestep once."""
    cfg = load_config("sd15-paper")
    steps = list(range(REF_TRAINED_TIMESTEPS))
    gen = torch.Generator().manual_seed(0)
    orders = [torch.randperm(len(steps), generator=gen).tolist() for _ in range(64)]
    plan = update_plan(orders, cfg.grpo.micro_batch, cfg.grpo.grad_accum, cfg.grpo.batching, gen)
    assert len(plan) == REF_STEPS_PER_EPOCH
    for b, passes in enumerate(plan):
        assert len(passes) == REF_TRAINED_TIMESTEPS
        rows = list(range(REF_MINIBATCH * b, REF_MINIBATCH * (b + 1)))
        assert len({j // cfg.grpo.group_size for j in rows}) == 1  # one prompt's samples
        for k, transitions in enumerate(passes):
            assert [j for j, _ in transitions] == rows
            assert [s for _, s in transitions] == [orders[j][k] for j in rows]


def test_paper_preset_matches_the_reference_elsewhere():
    cfg = load_config("sd15-paper")
    g = cfg.grpo
    assert (g.adv_std, g.adv_eps, g.adv_clip) == ("unbiased", 1e-8, 2.5)
    assert (g.clip_range, g.logprob_reduction, g.max_grad_norm) == (1e-4, "mean", 1.0)
    assert g.train_last_step is False and g.inner_epochs == 1 and g.kl_coef == 0
    assert cfg.sampling.shared_noise is True
    assert cfg.prompts.order == "pass"
    assert cfg.run.save_every == 20  # the reference's save_freq
    assert cfg.run.keep_last * cfg.run.save_every >= cfg.run.epochs  # it deletes none
    params = cfg.reward.params
    assert (params["jpeg_parity"], params["jpeg_quality"], params["jpeg_resize"]) == (
        True,
        75,
        512,
    )


def test_recommended_preset_differs_only_by_the_departures():
    paper, rec = load_config("sd15-paper"), load_config("sd15-recommended")
    assert update_shape(rec, sd15_schedule()).optimizer_steps_per_epoch == REF_STEPS_PER_EPOCH
    assert rec.grpo.batching == "transitions" and rec.grpo.train_last_step is True
    assert rec.sampling.shared_noise is False and rec.prompts.order == "random"
    assert rec.grpo.adv_std == "population" and rec.reward.params["jpeg_parity"] is False
    same = ("model", "optim", "lora")
    for section in same:
        assert getattr(paper, section) == getattr(rec, section), section
    assert (rec.sampling.num_steps, rec.grpo.group_size, rec.grpo.samples_per_process) == (
        50,
        16,
        64,
    )


def test_prompt_pass_draws_each_prompt_once_per_pass():
    n_prompts, n_groups = 10, 3  # 3 epochs per pass, one prompt left over each pass
    first = [i for e in range(3) for i in prompt_pass_indices(n_prompts, n_groups, e, seed=1)]
    assert len(first) == len(set(first)) == 9
    second = [i for e in range(3, 6) for i in prompt_pass_indices(n_prompts, n_groups, e, seed=1)]
    assert len(set(second)) == 9 and second != first  # a new permutation per pass
    assert prompt_pass_indices(n_prompts, n_groups, 4, seed=1) == second[3:6]
    with pytest.raises(Exception, match="prompts.order=pass needs at least one epoch's 11 groups"):
        prompt_pass_indices(n_prompts, 11, 0, seed=1)


# ---------------------------------------------------------------------------------------------
# The trainer takes the steps the formula says


def counting_trainer(overrides):
    cfg = load_config(None, overrides)
    model = load_t2i_model(cfg.model, device="cpu")
    trainer = GRPOTrainer(
        cfg, model, BrightnessReward(), load_prompts(cfg.prompts.file), Accelerator(cpu=True)
    )
    calls = {"step": 0, "backward": []}
    step, micro = trainer.optimizer.step, trainer._micro_step

    def counted_step(*args, **kwargs):
        calls["step"] += 1
        return step(*args, **kwargs)

    def counted_micro(mb, *args, **kwargs):
        calls["backward"].append(list(mb))
        return micro(mb, *args, **kwargs)

    trainer.optimizer.step = counted_step
    trainer._micro_step = counted_micro
    return trainer, model, calls


@pytest.mark.parametrize(
    "extra",
    [
        ["grpo.batching=samples", "grpo.micro_batch=2", "grpo.grad_accum=1"],
        ["grpo.batching=samples", "grpo.micro_batch=2", "grpo.grad_accum=3"],
        ["grpo.batching=transitions", "grpo.micro_batch=3", "grpo.grad_accum=2"],
        ["grpo.batching=transitions", "grpo.grad_accum=0", "grpo.inner_epochs=2"],
    ],
)
def test_tiny_run_takes_the_optimizer_steps_of_the_formula(tiny_overrides, extra):
    trainer, model, calls = counting_trainer(
        [*tiny_overrides, "grpo.train_last_step=false", *extra]
    )
    shape = update_shape(trainer.cfg, model.schedule)
    metrics = trainer.run_epoch(0)
    assert metrics["groups/zero_spread_skipped"] == 0
    assert calls["step"] == shape.optimizer_steps_per_epoch
    assert calls["step"] == optimizer_steps_per_epoch(trainer.cfg, model.schedule)
    g = trainer.cfg.grpo
    assert max(len(mb) for mb in calls["backward"]) == shape.transitions_per_backward
    n_transitions = g.samples_per_process * shape.trained_steps * g.inner_epochs
    assert sum(len(mb) for mb in calls["backward"]) == n_transitions
    last = trainer.cfg.sampling.num_steps - 1
    assert all(s != last for mb in calls["backward"] for _, s in mb)  # last step never trained
    if g.batching == "samples":  # each backward: one timestep of consecutive samples
        for mb in calls["backward"]:
            rows = [j for j, _ in mb]
            assert rows == list(range(rows[0], rows[0] + len(rows)))
