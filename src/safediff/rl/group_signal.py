"""What a GRPO group can teach: statistics of rewards inside groups of rollouts of one prompt.

GRPO learns only from differences within a group (advantages are normalised per group), so a
reward meant to remove a concept gives signal only if, inside a group, it ranks images with less
of the concept higher: either some images lack it (mixed groups) or the reward follows its
degree. These functions measure both, on [G, K] tensors (G groups of K rollouts).
"""

import torch

from safediff.rl.grpo import group_advantages


def within_group_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of a[g] with b[g] for every row of two [G, K] tensors -> [G].

    Tied values share their average rank (as scipy.stats.spearmanr); a constant row gives 0
    (scipy: NaN).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"expected two [G, K] tensors of one shape, got {a.shape} and {b.shape}")

    def centred_ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        less = (x.unsqueeze(2) > x.unsqueeze(1)).sum(2)  # [G, K]: how many of the row are below
        equal = (x.unsqueeze(2) == x.unsqueeze(1)).sum(2)
        r = less.to(torch.float64) + (equal - 1).to(torch.float64) / 2
        return r - r.mean(1, keepdim=True)

    ra, rb = centred_ranks(a), centred_ranks(b)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def mixed_group_stats(
    rewards: torch.Tensor, flagged: torch.Tensor, *, eps: float = 1e-4, clip: float = 2.5
) -> dict[str, float] | None:
    """How the rewards of mixed groups treat unflagged vs flagged images.

    rewards: [G, K]; flagged: [G, K] 0/1 (1: the image shows the concept). A group is mixed when
    it holds both. Advantages are the trainer's (`safediff.rl.grpo.group_advantages` with `eps`
    and `clip`; the defaults are the sandbox preset's). Returns None when no group is mixed, else
    {"mixed_groups": their count, "adv_free" / "adv_flagged": the mean advantage of the unflagged /
    flagged images of mixed groups, "pair_win": the share of (unflagged, flagged) pairs of one
    group in which the unflagged image scores strictly higher (0.5: no preference)}.
    """
    if rewards.shape != flagged.shape or rewards.dim() != 2:
        raise ValueError(f"expected [G, K] rewards and flags, got {rewards.shape}, {flagged.shape}")
    flagged = flagged.bool()
    n = flagged.sum(1)
    mixed = (n > 0) & (n < flagged.shape[1])
    if not mixed.any():
        return None
    groups = torch.arange(rewards.shape[0]).repeat_interleave(rewards.shape[1])
    adv = group_advantages(rewards.flatten(), groups, eps=eps, clip=clip).advantages
    adv = adv.view_as(rewards)
    r, f = rewards[mixed], flagged[mixed]
    wins = (r.unsqueeze(2) > r.unsqueeze(1)) & ~f.unsqueeze(2) & f.unsqueeze(1)  # [M, free, hit]
    pairs = ((~f).sum(1) * f.sum(1)).sum()
    return {
        "mixed_groups": int(mixed.sum()),
        "adv_free": float(adv[mixed][~f].mean()),
        "adv_flagged": float(adv[mixed][f].mean()),
        "pair_win": float(wins.sum() / pairs),
    }
