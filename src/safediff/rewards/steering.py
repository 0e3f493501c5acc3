"""Steering math in CLIP space (SafeDiffusion-R1, section "steering reward"), as pure functions.

Notation (all embeddings are L2-normalised rows of a frozen text/image encoder E):

  v_safe = normalize( mean(E(safe anchors)) - mean(E(unsafe anchors)) )     the safety direction
           normalize( -mean(E(unsafe anchors)) )    when there are no safe anchors (ablation)
           normalize(  mean(E(safe anchors)) )      when there are no unsafe anchors
  s      = E(p) . v_safe                            text safety score; negative = unsafe side
  translation:  z* = normalize( E(p) + alpha * v_safe )
  projection:   z* = normalize( E(p) - s * v_safe + alpha * v_safe )
                   (the safety component s is replaced by alpha; the part of E(p) orthogonal to
                   v_safe, its "content", is kept)
  reward = cos(E(image), z*)

Gating picks how much each prompt is steered, as a weight w in [0, 1] per prompt:
  'all'        w = 1 (every prompt, safe ones too: the reference code)
  'threshold'  w = 1 if s < threshold else 0 (only unsafe-side prompts: the paper's text)
  'soft'       w = sigmoid((threshold - s) / temperature)
The weight scales the move along v_safe, so w = 0 leaves E(p) untouched and w = 1 is the formula
above, for both modes:
  translation:  z* = normalize( E(p) + w * alpha * v_safe )
  projection:   z* = normalize( E(p) + w * (alpha - s) * v_safe )
"""

import torch
import torch.nn.functional as F

from safediff.errors import SafediffError

STEER_MODES = ("translation", "projection")
GATING_MODES = ("all", "threshold", "soft")


def safety_direction(safe: torch.Tensor | None, unsafe: torch.Tensor | None) -> torch.Tensor:
    """v_safe [D] float32 from anchor embeddings safe [S, D] and unsafe [U, D] (rows unit-norm).

    S = 0 (or None) gives normalize(-mean(unsafe)); U = 0 gives normalize(mean(safe)); both empty
    is an error, as is a direction of (near) zero length (safe and unsafe means coincide).
    """
    has_safe = safe is not None and safe.shape[0] > 0
    has_unsafe = unsafe is not None and unsafe.shape[0] > 0
    if not has_safe and not has_unsafe:
        raise SafediffError("anchor set has no safe and no unsafe phrases; give at least one")
    if has_safe and has_unsafe:
        v = safe.float().mean(dim=0) - unsafe.float().mean(dim=0)
    elif has_safe:
        v = safe.float().mean(dim=0)
    else:
        v = -unsafe.float().mean(dim=0)
    norm = v.norm()
    if not torch.isfinite(norm) or norm < 1e-6:
        raise SafediffError(
            "safe and unsafe anchors have the same mean embedding; v_safe is undefined "
            "(use phrases the encoder tells apart)"
        )
    return v / norm


def safety_score(z: torch.Tensor, v_safe: torch.Tensor) -> torch.Tensor:
    """s = z . v_safe: z [B, D] unit rows, v_safe [D] unit -> [B] in [-1, 1]."""
    return z.float() @ v_safe.float()


def _weights(w: torch.Tensor | float | None, z: torch.Tensor) -> torch.Tensor:
    if w is None:
        return torch.ones(z.shape[0], dtype=torch.float32, device=z.device)
    if not isinstance(w, torch.Tensor):
        return torch.full((z.shape[0],), float(w), dtype=torch.float32, device=z.device)
    return w.to(device=z.device, dtype=torch.float32)


def steer_translation(
    z: torch.Tensor,
    v_safe: torch.Tensor,
    alpha: float,
    weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """z* = normalize(z + w * alpha * v_safe): z [B, D], v_safe [D], w [B] (default 1) -> [B, D]."""
    w = _weights(weight, z)
    return F.normalize(z.float() + (w * alpha)[:, None] * v_safe.float(), dim=-1)


def steer_projection(
    z: torch.Tensor,
    v_safe: torch.Tensor,
    alpha: float,
    weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """z* = normalize(z + w * (alpha - s) * v_safe), s = z . v_safe -> [B, D].

    With w = 1 this is normalize(z - s v_safe + alpha v_safe): the component of z along v_safe
    becomes alpha and the orthogonal component z - s v_safe is kept.
    """
    w = _weights(weight, z)
    s = safety_score(z, v_safe)
    return F.normalize(z.float() + (w * (alpha - s))[:, None] * v_safe.float(), dim=-1)


def gate_weights(
    s: torch.Tensor,
    gating: str = "all",
    threshold: float = 0.0,
    temperature: float = 0.05,
) -> torch.Tensor:
    """Steering weight per prompt, w [B] in [0, 1], from safety scores s [B] (see module doc)."""
    if gating == "all":
        return torch.ones_like(s, dtype=torch.float32)
    if gating == "threshold":
        return (s < threshold).to(torch.float32)
    if gating == "soft":
        if not temperature > 0:
            raise SafediffError(f"soft gating needs temperature > 0, got {temperature}")
        return torch.sigmoid((threshold - s.float()) / temperature)
    raise SafediffError(f"unknown gating {gating!r}; use one of {', '.join(GATING_MODES)}")


def steer(
    z: torch.Tensor,
    v_safe: torch.Tensor,
    alpha: float,
    mode: str = "translation",
    weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Dispatch to steer_translation or steer_projection by `mode`."""
    if mode == "translation":
        return steer_translation(z, v_safe, alpha, weight)
    if mode == "projection":
        return steer_projection(z, v_safe, alpha, weight)
    raise SafediffError(f"unknown steering mode {mode!r}; use one of {', '.join(STEER_MODES)}")
