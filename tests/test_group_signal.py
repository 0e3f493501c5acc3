import pytest
import torch
from scipy.stats import spearmanr

from safediff.rl.group_signal import mixed_group_stats, within_group_spearman


def test_spearman_matches_scipy_per_row():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 9, generator=gen), torch.randn(6, 9, generator=gen)
    b[0] = 2 * a[0] + 1  # monotone: +1
    b[1] = -(a[1] ** 3)  # reversed: -1
    rho = within_group_spearman(a, b)
    expected = [spearmanr(a[g].numpy(), b[g].numpy()).statistic for g in range(6)]
    assert rho.tolist() == pytest.approx(expected, abs=1e-9)
    assert rho[0].item() == pytest.approx(1.0) and rho[1].item() == pytest.approx(-1.0)


def test_spearman_ties_and_constant_rows():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0, 5.0], [4.0, 1.0, 1.0, 1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 1.0, 0.0, 2.0], [3.0, 2.0, 3.0, 2.0, 1.0]])
    expected = [spearmanr(a[g].numpy(), b[g].numpy()).statistic for g in range(2)]
    assert within_group_spearman(a, b).tolist() == pytest.approx(expected, abs=1e-9)
    # a constant row has no ranking: 0, not a spurious correlation from the order of ties
    assert within_group_spearman(a[:1], torch.zeros(1, 5)).item() == 0.0
    with pytest.raises(ValueError):
        within_group_spearman(a, torch.zeros(3))


def test_mixed_group_stats_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 3.0], [5.0, 5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0]])
    flagged = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 1]])
    s = mixed_group_stats(rewards, flagged, eps=0.0, clip=100.0)
    assert s is not None and s["mixed_groups"] == 2  # row 1 is all flagged
    # pairs (free, flagged): row 0: 1>0, 1>0, 1<3 -> 2 of 3; row 2: 2>1, 2<4, 3>1, 3<4 -> 2 of 4
    assert s["pair_win"] == pytest.approx(4 / 7)
    adv = []
    for r in (rewards[0], rewards[2]):
        adv.append((r - r.mean()) / r.std(correction=0))
    free = torch.cat([adv[0][:1], adv[1][1:3]]).mean()
    hit = torch.cat([adv[0][1:], adv[1][[0, 3]]]).mean()
    assert s["adv_free"] == pytest.approx(free.item(), abs=1e-6)
    assert s["adv_flagged"] == pytest.approx(hit.item(), abs=1e-6)


def test_mixed_group_stats_none_without_mixed_groups():
    assert mixed_group_stats(torch.rand(3, 4), torch.ones(3, 4)) is None
    assert mixed_group_stats(torch.rand(3, 4), torch.zeros(3, 4)) is None
