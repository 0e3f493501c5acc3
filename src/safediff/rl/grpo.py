"""GRPO math as small pure functions (DESIGN.md section 3).

- `group_advantages`: rewards -> advantages normalised within each group of samples that share a
  prompt, with degenerate groups (zero spread, non-finite rewards) skipped and counted.
- `clipped_policy_loss`: the PPO clipped surrogate per transition, plus the statistics a person
  needs to trust a run (clip fraction, approximate KL, ratio drift).
- `summarize_rewards`: reward mean / std per prompt kind for logging.

Departures from the textbook GRPO (Shao et al., 2024), each deliberate:
- the group std is by default the *population* std (divide by K), so every group's advantages have
  unit root-mean-square before clipping; `std="unbiased"` divides by K - 1 instead, as the
  SafeDiffusion-R1 reference does (torch's `Tensor.std()`, with eps 1e-8): at K = 16 its advantages
  are sqrt(15/16), about 3%, smaller. `eps` is added to the std, not to the variance;
- advantages are clipped to [-clip, clip] (the reference's A_max = 2.5);
- optionally (`scale="pooled"`), one std pooled over the batch's groups replaces each group's own,
  so groups whose rewards differ only by noise do not get full-size advantages;
- a group whose rewards have zero spread carries no signal and is skipped (advantage 0, marked
  invalid) rather than given a 0 / eps advantage (the reference divides every group by its
  std + 1e-8, whatever the spread); a group with any NaN/inf reward is skipped whole.

All functions are device-agnostic: they return tensors on their inputs' device.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Groups whose finite rewards span at most this much (max - min) are treated as zero-spread: their
# std is rounding noise and dividing by it would amplify that noise into +-clip advantages.
ZERO_SPREAD_TOL = 1e-12

ADVANTAGE_SCALES = ("group", "pooled")
ADVANTAGE_STDS = ("population", "unbiased")


@dataclass(frozen=True)
class AdvantageResult:
    """Output of `group_advantages`.

    advantages: [N] float32, clipped normalised advantages; 0 where `valid` is False.
    valid: [N] bool, True for samples whose group carries a training signal.
    n_groups: number of distinct group ids.
    n_zero_spread: groups with only finite rewards whose spread is zero (skipped).
    n_nan_groups: groups containing at least one non-finite reward (skipped whole). Disjoint from
        `n_zero_spread`.
    """

    advantages: torch.Tensor
    valid: torch.Tensor
    n_groups: int
    n_zero_spread: int
    n_nan_groups: int


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float,
    clip: float,
    scale: str = "group",
    std: str = "population",
) -> AdvantageResult:
    """Group-normalised advantages A = clip((r - mean_g) / (s + eps), -clip, clip).

    rewards: [N] float (any float dtype); NaN/inf allowed (their whole group is skipped).
    group_ids: [N] int64, the group (prompt) of each sample, in any order; ids need not be
        contiguous. All samples of one group must be present (gather across ranks first).
    eps: >= 0, added to the std before dividing.
    clip: > 0, advantages are clipped to [-clip, clip].
    scale: what s is. 'group' (GRPO's): each group's own std, std_g, so every group's advantages
        have unit spread however small its reward differences. 'pooled': one s for the whole
        batch, the root-mean-square of r - mean_g over the samples of the valid groups (the
        pooled within-group std), so a group's advantages keep the size of its reward spread
        relative to the other groups': a group whose rewards differ by noise gets small
        advantages, one whose rewards differ by a lot gets large ones. Advantages still have
        mean 0 in every group and unit mean square over the batch (before clipping).

    std: 'population' (divide the squared deviations by the group size K: advantages of unit
        root-mean-square in every group) or 'unbiased' (divide by K - 1, torch's default and the
        SafeDiffusion-R1 reference's `group_rewards.std() + 1e-8`). With scale 'pooled' the
        pooled sum of squares is divided by N_valid or by N_valid - G_valid (one degree of
        freedom per valid group) accordingly.

    Statistics are computed in float64 (two-pass: mean, then squared deviations) and the result is
    returned as float32 on `rewards.device`.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if eps < 0 or clip <= 0:
        raise ValueError(f"need eps >= 0 and clip > 0; got eps={eps}, clip={clip}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}; got {scale!r}")
    if std not in ADVANTAGE_STDS:
        raise ValueError(f"std must be one of {ADVANTAGE_STDS}; got {std!r}")

    device = rewards.device
    n = rewards.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return AdvantageResult(empty, empty.bool(), 0, 0, 0)

    r = rewards.detach().to(torch.float64)
    # inverse[i] = dense index (0..G-1) of sample i's group.
    _, inverse = torch.unique(group_ids.to(device), return_inverse=True)
    n_groups = int(inverse.max().item()) + 1

    finite = torch.isfinite(r)
    r0 = torch.where(finite, r, torch.zeros_like(r))  # keep NaN out of the sums

    def group_sum(values: torch.Tensor) -> torch.Tensor:  # [N] -> [G]
        return torch.zeros(n_groups, dtype=values.dtype, device=device).index_add_(
            0, inverse, values
        )

    count = group_sum(torch.ones_like(r0))  # [G]
    n_bad = group_sum((~finite).to(torch.float64))  # [G]
    mean = group_sum(r0) / count  # [G]
    dev = r0 - mean[inverse]  # [N]
    dof = count if std == "population" else (count - 1).clamp(min=1)  # [G]
    group_std = (group_sum(dev * dev) / dof).sqrt()  # [G]

    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    r_max = torch.full((n_groups,), -inf, dtype=torch.float64, device=device)
    r_max = r_max.scatter_reduce(0, inverse, r0, reduce="amax")
    r_min = torch.full((n_groups,), inf, dtype=torch.float64, device=device)
    r_min = r_min.scatter_reduce(0, inverse, r0, reduce="amin")

    nan_group = n_bad > 0  # [G]
    zero_spread = ~nan_group & ((group_std == 0) | (r_max - r_min <= ZERO_SPREAD_TOL))  # [G]
    group_valid = ~nan_group & ~zero_spread  # [G]

    valid = group_valid[inverse]  # [N]
    if scale == "group":
        denom = group_std[inverse]  # [N]
    else:  # pooled within-group std over the valid groups' samples
        n_valid = valid.sum()
        if std == "unbiased":
            n_valid = n_valid - group_valid.sum()
        sq = torch.where(valid, dev * dev, torch.zeros_like(dev)).sum()
        denom = (sq / n_valid.clamp(min=1)).sqrt()  # scalar
    adv = (dev / (denom + eps)).clamp(-clip, clip)  # [N]
    adv = torch.where(valid, adv, torch.zeros_like(adv)).to(torch.float32)
    return AdvantageResult(
        advantages=adv,
        valid=valid,
        n_groups=n_groups,
        n_zero_spread=int(zero_spread.sum().item()),
        n_nan_groups=int(nan_group.sum().item()),
    )


@dataclass(frozen=True)
class PolicyStats:
    """Diagnostics of one `clipped_policy_loss` call: detached 0-d float32 tensors on the loss's
    device, so a training loop can gather them without a host sync per micro-batch (`floats()`
    brings them back in one transfer).

    clip_fraction: fraction of transitions with |ratio - 1| > clip_range.
    approx_kl: mean of 0.5 * (logp_new - logp_old)^2, a second-order estimate of KL(old || new).
    ratio_mean: mean importance ratio (1.0 exactly on-policy).
    ratio_max_dev: max |ratio - 1| (0.0 exactly on-policy; the drift to watch in bf16/fp16).
    """

    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max_dev: torch.Tensor

    def floats(self) -> dict[str, float]:
        """The four statistics as Python floats (one device-to-host transfer)."""
        names = ("clip_fraction", "approx_kl", "ratio_mean", "ratio_max_dev")
        values = torch.stack([getattr(self, n) for n in names]).cpu().tolist()
        return dict(zip(names, values, strict=True))


def clipped_policy_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, PolicyStats]:
    """PPO clipped surrogate, per transition; the caller averages (and adds any KL term).

    log_prob_new: [M] log-probs of the stored transitions under the current policy (with grad).
    log_prob_old: [M] log-probs recorded at sampling time (treated as constants).
    advantages: [M] advantages of each transition's sample (treated as constants).
    clip_range: c > 0; the ratio is clipped to [1 - c, 1 + c]. Its meaning follows the log-prob
        reduction: with per-element *mean* log-probs (the reference's) the ratio is a geometric-mean
        per-element ratio, which is why c is as small as 1e-4 there.

    Returns (loss [M], stats) with
        ratio = exp(new - old),
        loss  = max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)),
    i.e. the negative of PPO's min(ratio * A, clip(ratio) * A). At ratio == 1 the loss is -A.
    """
    if not (log_prob_new.shape == log_prob_old.shape == advantages.shape) or log_prob_new.ndim != 1:
        raise ValueError(
            "log_prob_new, log_prob_old and advantages must all be [M]; got "
            f"{tuple(log_prob_new.shape)}, {tuple(log_prob_old.shape)}, {tuple(advantages.shape)}"
        )
    if log_prob_new.shape[0] == 0:
        raise ValueError("clipped_policy_loss needs at least one transition")
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")

    old = log_prob_old.detach()
    adv = advantages.detach().to(log_prob_new.dtype)
    log_ratio = log_prob_new - old  # [M]
    ratio = torch.exp(log_ratio)  # [M]
    unclipped = -adv * ratio  # [M]
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [M]
    loss = torch.maximum(unclipped, clipped)  # [M], pessimistic bound

    with torch.no_grad():
        r = ratio.detach().float()
        lr = log_ratio.detach().float()
        dev = (r - 1.0).abs()
        stats = PolicyStats(
            clip_fraction=(dev > clip_range).float().mean(),
            approx_kl=(0.5 * lr * lr).mean(),
            ratio_mean=r.mean(),
            ratio_max_dev=dev.max(),
        )
    return loss, stats


def summarize_rewards(rewards: torch.Tensor, kinds: Sequence[str]) -> dict[str, float]:
    """Reward mean / std per prompt kind, for logging.

    rewards: [N] float, may contain NaN/inf (ignored in means and stds, counted).
    kinds: N labels (e.g. 'safe' / 'unsafe'). The label 'all' is reserved for the aggregate over
        every sample, which is always reported; samples labelled 'all' count only there.

    Returns keys `reward_mean/{kind}`, `reward_std/{kind}` (population std, 0 for a single value,
    NaN when a kind has no finite reward) and `reward_count/{kind}` (finite rewards) for every kind
    and 'all', plus `reward_nonfinite` (count of NaN/inf rewards).
    """
    if rewards.ndim != 1 or len(kinds) != rewards.shape[0]:
        raise ValueError(
            f"rewards must be [N] with N kinds; got {tuple(rewards.shape)} and {len(kinds)} kinds"
        )
    r = rewards.detach().to(torch.float64).cpu()
    finite = torch.isfinite(r)
    out: dict[str, float] = {}

    def add(kind: str, mask: torch.Tensor) -> None:
        vals = r[mask & finite]
        n = int(vals.numel())
        out[f"reward_mean/{kind}"] = float(vals.mean()) if n else float("nan")
        out[f"reward_std/{kind}"] = float(vals.std(correction=0)) if n else float("nan")
        out[f"reward_count/{kind}"] = float(n)

    add("all", torch.ones_like(finite))
    for kind in sorted(set(kinds) - {"all"}):
        add(kind, torch.tensor([k == kind for k in kinds], dtype=torch.bool))
    out["reward_nonfinite"] = float((~finite).sum())
    return out
