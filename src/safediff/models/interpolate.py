"""Weight interpolation between a base model and its post-trained version (WiSE-FT).

    theta(w) = theta_base + w * (theta_trained - theta_base)

w = 1 is the trained model, w = 0 the base; weights in between trade what post-training learnt
against what it disturbed. Averaging the weights of a model before and after fine-tuning is
known to keep much of the fine-tuning's gain while losing less of what the model could already
do (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models", for image classifiers; Lin
et al., 2024, "Mitigating the alignment tax of RLHF", for RL post-training). safediff applies it
after GRPO with `run.merge_weight`.
"""

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from safediff.errors import SafediffError


def interpolate_weights(
    base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """base + weight * (trained - base), tensor by tensor.

    base, trained: state dicts with the same keys and shapes (any float dtypes; integer buffers
        must be equal and are copied). weight: finite, >= 0 (above 1 extrapolates).
    Returns a new state dict in `trained`'s dtypes and devices; each sum is formed in float32 (or
    float64 where the trained tensor is), so bf16 weights do not lose the small differences.
    """
    if not math.isfinite(weight) or weight < 0:
        raise SafediffError(f"merge weight must be finite and >= 0, got {weight}")
    missing, extra = set(trained) - set(base), set(base) - set(trained)
    if missing or extra:
        raise SafediffError(
            f"cannot interpolate: the models' weights differ (only in the trained model: "
            f"{sorted(missing)[:3]}, only in the base: {sorted(extra)[:3]})"
        )
    out = {}
    for name, t in trained.items():
        b = base[name]
        if b.shape != t.shape:
            raise SafediffError(
                f"cannot interpolate {name}: shape {tuple(b.shape)} in the base, "
                f"{tuple(t.shape)} in the trained model"
            )
        if not t.is_floating_point():
            if not torch.equal(b.to(t.device), t):
                raise SafediffError(f"cannot interpolate {name}: integer buffers differ")
            out[name] = t.clone()
            continue
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        b32 = b.to(device=t.device, dtype=acc)
        out[name] = (b32 + weight * (t.to(acc) - b32)).to(t.dtype)
    return out


def interpolated_copy(
    base: Mapping[str, torch.Tensor], trained: nn.Module, weight: float
) -> nn.Module:
    """A copy of the module `trained` holding base + weight * (trained - base)
    (`interpolate_weights`), in eval mode; `trained` itself is untouched."""
    merged = copy.deepcopy(trained)
    merged.load_state_dict(interpolate_weights(base, trained.state_dict(), weight))
    return merged.eval()
