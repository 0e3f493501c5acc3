"""GRPO math against hand computation and independent (numpy / textbook-form) references."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from safediff.rl.grpo import (
    AdvantageResult,
    clipped_policy_loss,
    group_advantages,
    summarize_rewards,
)

# ---------------------------------------------------------------------------------------------
# group_advantages


def numpy_advantages(rewards: np.ndarray, ids: np.ndarray, eps: float, clip: float) -> np.ndarray:
    """Reference: per-group loop with numpy's default (population) std, as the paper's code."""
    out = np.zeros_like(rewards, dtype=np.float64)
    for g in np.unique(ids):
        m = ids == g
        r = rewards[m].astype(np.float64)
        if not np.all(np.isfinite(r)) or np.std(r) == 0:
            continue
        out[m] = np.clip((r - np.mean(r)) / (np.std(r) + eps), -clip, clip)
    return out


def test_hand_computed_group():
    # r = [1, 2, 3, 4]: mean 2.5, population var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25.
    res = group_advantages(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4, dtype=torch.int64), eps=0.0, clip=10.0
    )
    s = math.sqrt(1.25)
    expected = torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])
    torch.testing.assert_close(res.advantages, expected)
    assert res.advantages.dtype == torch.float32
    assert res.valid.all()
    assert (res.n_groups, res.n_zero_spread, res.n_nan_groups) == (1, 0, 0)


def test_population_not_sample_std():
    # Two values a, b: population std = |a - b| / 2, so advantages are exactly +-1 with eps = 0
    # (the unbiased std would give +-1/sqrt(2)).
    res = group_advantages(torch.tensor([0.3, 0.7]), torch.tensor([5, 5]), eps=0.0, clip=10.0)
    torch.testing.assert_close(res.advantages, torch.tensor([-1.0, 1.0]))


def test_unbiased_std_is_the_references_torch_std():
    # Two values: the unbiased std is |a - b| / sqrt(2), so advantages are +-1/sqrt(2).
    res = group_advantages(
        torch.tensor([0.3, 0.7]), torch.tensor([5, 5]), eps=0.0, clip=10.0, std="unbiased"
    )
    torch.testing.assert_close(res.advantages, torch.tensor([-1.0, 1.0]) / math.sqrt(2))
    # The reference's formula, group by group: (r - mean) / (r.std() + 1e-8), then clamp.
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(4 * 16, generator=gen) * 0.05
    ids = torch.arange(4).repeat_interleave(16)
    res = group_advantages(rewards, ids, eps=1e-8, clip=2.5, std="unbiased")
    for g in range(4):
        r = rewards[ids == g]
        want = ((r - r.mean()) / (r.std() + 1e-8)).clamp(-2.5, 2.5)
        torch.testing.assert_close(res.advantages[ids == g], want, rtol=1e-5, atol=1e-6)
    population = group_advantages(rewards, ids, eps=0.0, clip=1e9).advantages
    unbiased = group_advantages(rewards, ids, eps=0.0, clip=1e9, std="unbiased").advantages
    torch.testing.assert_close(unbiased, population * math.sqrt(15 / 16))


def test_unbiased_pooled_std_has_one_degree_of_freedom_per_group():
    # Deviations -1, +1 and -0.1, +0.1: sum of squares 2.02 over 4 - 2 = 2 degrees of freedom.
    r = torch.tensor([0.0, 2.0, 0.0, 0.2])
    ids = torch.tensor([0, 0, 1, 1])
    res = group_advantages(r, ids, eps=0.0, clip=10.0, scale="pooled", std="unbiased")
    s = math.sqrt(2.02 / 2)
    torch.testing.assert_close(res.advantages, torch.tensor([-1 / s, 1 / s, -0.1 / s, 0.1 / s]))
    with pytest.raises(ValueError, match="std"):
        group_advantages(r, ids, eps=0, clip=1, std="sample")


def test_matches_numpy_shuffled_ids_and_eps():
    gen = torch.Generator().manual_seed(0)
    n_groups, k = 7, 6
    ids = torch.arange(n_groups).repeat_interleave(k) * 13 + 100  # non-contiguous ids
    perm = torch.randperm(n_groups * k, generator=gen)
    ids = ids[perm]
    rewards = torch.randn(n_groups * k, generator=gen) * torch.rand(n_groups * k, generator=gen) * 3
    res = group_advantages(rewards, ids, eps=1e-4, clip=2.5)
    ref = numpy_advantages(rewards.numpy(), ids.numpy(), 1e-4, 2.5)
    np.testing.assert_allclose(res.advantages.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert res.n_groups == n_groups and res.valid.all()
    # Within each group the advantages sum to ~0 (when no clipping bites).
    unclipped = group_advantages(rewards, ids, eps=0.0, clip=1e9)
    for g in ids.unique():
        assert abs(float(unclipped.advantages[ids == g].sum())) < 1e-4


def test_advantages_are_clipped():
    # One outlier in a group of 10: its advantage is 3 (population std), clipped to 2.5.
    r = torch.zeros(10)
    r[0] = 1.0
    res = group_advantages(r, torch.zeros(10, dtype=torch.int64), eps=0.0, clip=2.5)
    assert res.advantages[0].item() == pytest.approx(2.5)
    # the others: (0 - 0.1) / 0.3 = -1/3, not clipped
    torch.testing.assert_close(res.advantages[1:], torch.full((9,), -1.0 / 3.0))
    loose = group_advantages(r, torch.zeros(10, dtype=torch.int64), eps=0.0, clip=10.0)
    assert loose.advantages[0].item() == pytest.approx(3.0)


def test_zero_spread_and_nan_groups_skipped_and_counted():
    rewards = torch.tensor(
        [
            1.0, 2.0, 3.0,  # group 0: fine
            0.5, 0.5, 0.5,  # group 1: zero spread
            1.0, float("nan"), 2.0,  # group 2: NaN
            4.0, float("inf"), 5.0,  # group 3: inf
            7.0, 7.0 + 1e-13, 7.0,  # group 4: spread below the tolerance
        ]
    )  # fmt: skip
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4])
    res = group_advantages(rewards, ids, eps=1e-4, clip=2.5)
    assert isinstance(res, AdvantageResult)
    assert (res.n_groups, res.n_zero_spread, res.n_nan_groups) == (5, 2, 2)
    assert res.valid.tolist() == [True] * 3 + [False] * 12
    assert torch.all(res.advantages[3:] == 0)
    assert torch.isfinite(res.advantages).all()
    ref = numpy_advantages(np.array([1.0, 2.0, 3.0]), np.zeros(3), 1e-4, 2.5)
    np.testing.assert_allclose(res.advantages[:3].numpy(), ref, rtol=1e-6)


def test_singleton_group_is_zero_spread_and_empty_input():
    res = group_advantages(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([0, 0, 1]), eps=0, clip=3)
    assert res.n_zero_spread == 1 and res.valid.tolist() == [True, True, False]
    empty = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.int64), eps=0, clip=1)
    assert empty.advantages.shape == (0,) and empty.n_groups == 0


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.int64), eps=0, clip=1)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(3), eps=0, clip=1)


def numpy_pooled_advantages(
    rewards: np.ndarray, ids: np.ndarray, eps: float, clip: float
) -> np.ndarray:
    """Reference for scale='pooled': deviations from each group's mean over one pooled std,
    the root-mean-square deviation of the valid groups' samples (written as a variance pool)."""
    devs, sizes, variances = {}, [], []
    for g in np.unique(ids):
        r = rewards[ids == g].astype(np.float64)
        if not np.all(np.isfinite(r)) or np.std(r) == 0:
            continue
        devs[g] = r - np.mean(r)
        sizes.append(len(r))
        variances.append(np.var(r))
    pooled = np.sqrt(np.dot(sizes, variances) / np.sum(sizes)) if sizes else 0.0
    out = np.zeros_like(rewards, dtype=np.float64)
    for g, d in devs.items():
        out[ids == g] = np.clip(d / (pooled + eps), -clip, clip)
    return out


def test_pooled_scale_hand_computed():
    # Group 0: [0, 2] (deviations -1, +1); group 1: [0, 0.2] (deviations -0.1, +0.1). Pooled
    # mean square = (1 + 1 + 0.01 + 0.01) / 4 = 0.505. Group scaling would give +-1 to both.
    r = torch.tensor([0.0, 2.0, 0.0, 0.2])
    ids = torch.tensor([0, 0, 1, 1])
    res = group_advantages(r, ids, eps=0.0, clip=10.0, scale="pooled")
    s = math.sqrt(0.505)
    torch.testing.assert_close(res.advantages, torch.tensor([-1 / s, 1 / s, -0.1 / s, 0.1 / s]))
    per_group = group_advantages(r, ids, eps=0.0, clip=10.0)
    torch.testing.assert_close(per_group.advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_pooled_scale_matches_numpy_and_skips_like_group_scale():
    gen = torch.Generator().manual_seed(3)
    n_groups, k = 9, 4
    ids = (torch.arange(n_groups).repeat_interleave(k) * 7)[
        torch.randperm(n_groups * k, generator=gen)
    ]
    spread = torch.rand(n_groups, generator=gen)[torch.div(ids, 7, rounding_mode="floor")] * 4
    rewards = torch.randn(n_groups * k, generator=gen) * spread
    rewards[ids == 14] = 0.25  # a zero-spread group
    rewards[(ids == 21).nonzero()[0]] = float("nan")  # a non-finite group
    res = group_advantages(rewards, ids, eps=1e-4, clip=2.5, scale="pooled")
    ref = numpy_pooled_advantages(rewards.numpy(), ids.numpy(), 1e-4, 2.5)
    np.testing.assert_allclose(res.advantages.numpy(), ref, rtol=1e-5, atol=1e-6)
    plain = group_advantages(rewards, ids, eps=1e-4, clip=2.5)
    assert res.valid.tolist() == plain.valid.tolist()
    assert (
        (res.n_zero_spread, res.n_nan_groups) == (plain.n_zero_spread, plain.n_nan_groups) == (1, 1)
    )
    # Unclipped, the valid samples' advantages have mean square 1 and sum to 0 in each group.
    loose = group_advantages(rewards, ids, eps=0.0, clip=1e9, scale="pooled")
    a = loose.advantages[loose.valid].double()
    assert float((a * a).mean()) == pytest.approx(1.0, rel=1e-6)
    for g in ids[loose.valid].unique():
        assert abs(float(loose.advantages[ids == g].sum())) < 1e-5


def test_pooled_scale_of_one_group_is_the_group_scale_and_bad_scale_rejected():
    r = torch.tensor([0.1, 0.4, 0.2, 0.9])
    ids = torch.zeros(4, dtype=torch.int64)
    torch.testing.assert_close(
        group_advantages(r, ids, eps=1e-4, clip=2.5, scale="pooled").advantages,
        group_advantages(r, ids, eps=1e-4, clip=2.5).advantages,
    )
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, ids, eps=0, clip=1, scale="batch")


# ---------------------------------------------------------------------------------------------
# clipped_policy_loss


def ppo_reference(new, old, adv, c):
    """Textbook PPO: L = -min(ratio * A, clip(ratio, 1-c, 1+c) * A)."""
    ratio = torch.exp(new - old)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - c, 1 + c) * adv)


def test_on_policy_loss_is_minus_advantage():
    logp = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    adv = torch.linspace(-2, 2, 8, dtype=torch.float64)
    new = logp.clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(new, logp, adv, clip_range=1e-4)
    torch.testing.assert_close(loss.detach(), -adv)
    assert stats.floats() == dict(
        clip_fraction=0.0, approx_kl=0.0, ratio_mean=1.0, ratio_max_dev=0.0
    )
    assert all(v.ndim == 0 and not v.requires_grad for v in vars(stats).values())
    # On-policy gradient of mean loss wrt logp_new is -A / M (d ratio / d logp = ratio = 1).
    loss.mean().backward()
    torch.testing.assert_close(new.grad, -adv / 8)


def test_loss_matches_textbook_form_and_stats():
    gen = torch.Generator().manual_seed(2)
    m, c = 64, 0.1
    old = torch.randn(m, generator=gen)
    new = old + 0.3 * torch.randn(m, generator=gen)
    adv = torch.randn(m, generator=gen)
    loss, policy_stats = clipped_policy_loss(new, old, adv, clip_range=c)
    torch.testing.assert_close(loss, ppo_reference(new, old, adv, c))
    stats = SimpleNamespace(**policy_stats.floats())

    ratio = np.exp(new.numpy().astype(np.float64) - old.numpy())
    assert stats.clip_fraction == pytest.approx(np.mean(np.abs(ratio - 1) > c))
    assert 0 < stats.clip_fraction < 1
    assert stats.approx_kl == pytest.approx(
        np.mean(0.5 * (new.numpy() - old.numpy()) ** 2), rel=1e-5
    )
    assert stats.ratio_mean == pytest.approx(ratio.mean(), rel=1e-5)
    assert stats.ratio_max_dev == pytest.approx(np.abs(ratio - 1).max(), rel=1e-5)


def test_hand_cases_clipping_direction():
    c = 0.2
    old = torch.zeros(4)
    # ratios 1.5, 1.5, 0.5, 0.5 with A = +1, -1, +1, -1
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    new.requires_grad_(True)
    loss, policy_stats = clipped_policy_loss(new, old, adv, clip_range=c)
    stats = SimpleNamespace(**policy_stats.floats())
    # A>0, ratio>1+c: clipped -> -1.2 (no gradient); A<0, ratio>1+c: unclipped 1.5 (gradient)
    # A>0, ratio<1-c: unclipped -0.5 (gradient);    A<0, ratio<1-c: clipped 0.8 (no gradient)
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    loss.sum().backward()
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 1.5, -0.5, 0.0]))
    assert stats.clip_fraction == 1.0
    assert stats.ratio_max_dev == pytest.approx(0.5)


def test_policy_loss_bad_inputs():
    with pytest.raises(ValueError):
        clipped_policy_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), 0.1)
    with pytest.raises(ValueError):
        clipped_policy_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.1)
    with pytest.raises(ValueError):
        clipped_policy_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)


# ---------------------------------------------------------------------------------------------
# summarize_rewards


def test_summarize_rewards_per_kind():
    rewards = torch.tensor([1.0, 3.0, float("nan"), 2.0, 6.0, float("inf")])
    kinds = ["safe", "safe", "safe", "unsafe", "unsafe", "unsafe"]
    out = summarize_rewards(rewards, kinds)
    assert out["reward_mean/safe"] == pytest.approx(2.0)
    assert out["reward_std/safe"] == pytest.approx(np.std([1.0, 3.0]))
    assert out["reward_mean/unsafe"] == pytest.approx(4.0)
    assert out["reward_std/unsafe"] == pytest.approx(2.0)
    assert out["reward_mean/all"] == pytest.approx(np.mean([1, 3, 2, 6]))
    assert out["reward_std/all"] == pytest.approx(np.std([1, 3, 2, 6]))
    assert out["reward_count/all"] == 4 and out["reward_count/safe"] == 2
    assert out["reward_nonfinite"] == 2
    assert all(isinstance(v, float) for v in out.values())


def test_summarize_rewards_kind_without_finite_values():
    out = summarize_rewards(torch.tensor([float("nan"), 1.0]), ["a", "b"])
    assert math.isnan(out["reward_mean/a"]) and out["reward_count/a"] == 0
    assert out["reward_mean/b"] == 1.0 and out["reward_std/b"] == 0.0
    with pytest.raises(ValueError):
        summarize_rewards(torch.zeros(2), ["a"])
