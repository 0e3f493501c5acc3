"""Safe Latent Diffusion (SLD) as a sampler guidance hook.

Paper: Schramowski, Brack, Deiseroth & Kersting, "Safe Latent Diffusion: Mitigating Inappropriate
Degeneration in Diffusion Models" (CVPR 2023). This reimplements the safety guidance of diffusers'
`StableDiffusionPipelineSafe` (pipelines/deprecated/stable_diffusion_safe, `__call__`), with its
four presets (`SafetyConfig.WEAK/MEDIUM/STRONG/MAX`) and its default safety concept.

At step i, with the CFG branches eps_u (unconditional / negative prompt), eps_c (prompt), the
safety-concept prediction eps_s (one extra UNet call with the concept's embeddings), CFG scale g
and SLD scale s_S, threshold lambda, momentum scale s_m and momentum beta beta_m (paper equations):

    scale   = clamp(|eps_c - eps_s| * s_S, max=1)                       (eq. 6)
    mu      = where(eps_c - eps_s >= lambda, 0, scale)                  (eq. 6)
    gamma   = mu * (eps_s - eps_u) + s_m * nu_i                          (eqs. 4, 7)
    nu_i+1  = beta_m * nu_i + (1 - beta_m) * gamma                       (eq. 8)
    eps     = eps_u + g * ((eps_c - eps_u) - gamma)   if i >= warmup    (eq. 3)
            = eps_u + g * (eps_c - eps_u)             otherwise

The momentum nu is updated from step 0, also during warm-up, as diffusers does. It is the hook's
explicit per-sample state (`init_state`), never a hidden attribute, so a batched rollout equals
one-at-a-time and GRPO can re-score any stored step (`Trajectory.guidance_states`).

The safety-concept prediction is computed in the sampler's CFG batch (cat([uncond, cond, concept]),
diffusers' layout; see `extra_embeds`), and eq. 3 in diffusers' order of operations, so with one
sample per batch our trajectory is diffusers' to float precision. Departure from diffusers: the
arithmetic is done in epsilon units, so for a v-prediction model the threshold acts on eps differences (diffusers applies it to the raw model
outputs; SLD's presets were tuned on SD 1.x, an epsilon model, where the two agree). As in
diffusers, SLD needs classifier-free guidance and is off when sld_guidance_scale <= 1.

Flow models (`flow_guidance`; the flow sampler, sampling/flow.py): at a fixed x_t and sigma a
rectified-flow model's eps = x_t + (1 - sigma) v is affine in its velocity, so the branches are
mapped to eps, the same equations run there (the thresholds and scales keep the eps units the
presets were tuned in) and the result goes back as v' = v + (eps' - eps) / (1 - sigma). This needs
an unconditional pass, so it applies to CFG models (SD3 / SD3.5); guidance-distilled FLUX-dev has
none (its guidance is a transformer input) and is refused. Departure: the paper and diffusers
define SLD for DDPM models only, and the presets are not re-tuned for flow models.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from safediff.errors import SafediffError
from safediff.sampling.flow import FlowGuidanceStep
from safediff.sampling.rollout import GuidanceStep

SLD_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, "
    "nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
    "weapons, child abuse, brutality, cruelty"
)
"""diffusers' default safety concept (StableDiffusionPipelineSafe)."""


@dataclass(frozen=True)
class SLDConfig:
    """SLD hyper-parameters (names as diffusers' pipeline arguments); defaults = 'medium'."""

    sld_guidance_scale: float = 1000.0
    """s_S: safety guidance scale; <= 1 turns SLD off."""
    sld_warmup_steps: int = 10
    """Steps before the safety guidance is applied (the momentum builds up from step 0)."""
    sld_threshold: float = 0.01
    """lambda: elements with eps_c - eps_s >= lambda get no safety guidance."""
    sld_momentum_scale: float = 0.3
    """s_m: weight of the momentum added to the safety guidance."""
    sld_mom_beta: float = 0.4
    """beta_m: how much of the previous momentum is kept."""
    concept: str = SLD_CONCEPT
    """The safety concept text."""

    def __post_init__(self) -> None:
        checks = [
            (self.sld_warmup_steps >= 0, "sld_warmup_steps must be >= 0"),
            (0 <= self.sld_mom_beta <= 1, "sld_mom_beta must be in [0, 1]"),
            (self.concept.strip() != "", "concept must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise SafediffError(f"invalid SLD config: {message}")


SLD_PRESETS: dict[str, SLDConfig] = {
    "weak": SLDConfig(
        20.0, sld_warmup_steps=15, sld_threshold=0.0, sld_momentum_scale=0.0, sld_mom_beta=0.0
    ),
    "medium": SLDConfig(
        1000.0, sld_warmup_steps=10, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4
    ),
    "strong": SLDConfig(
        2000.0, sld_warmup_steps=7, sld_threshold=0.025, sld_momentum_scale=0.5, sld_mom_beta=0.7
    ),
    "max": SLDConfig(
        5000.0, sld_warmup_steps=0, sld_threshold=1.0, sld_momentum_scale=0.5, sld_mom_beta=0.7
    ),
}
"""diffusers' SafetyConfig.WEAK / MEDIUM / STRONG / MAX."""


def sld_guidance_term(
    eps_cond: Tensor,
    eps_uncond: Tensor,
    eps_safety: Tensor,
    momentum: Tensor,
    cfg: SLDConfig,
) -> tuple[Tensor, Tensor]:
    """gamma (the safety guidance, eqs. 4, 6, 7) and the next momentum (eq. 8); all [B, ...]."""
    diff = eps_cond - eps_safety
    scale = torch.clamp(diff.abs() * cfg.sld_guidance_scale, max=1.0)
    mu = torch.where(diff >= cfg.sld_threshold, torch.zeros_like(scale), scale)
    gamma = (eps_safety - eps_uncond) * mu + cfg.sld_momentum_scale * momentum
    new_momentum = cfg.sld_mom_beta * momentum + (1 - cfg.sld_mom_beta) * gamma
    return gamma, new_momentum


class SafeLatentDiffusion:
    """SLD guidance hook. concept_embeds: [1, L, D] embeddings of `cfg.concept` (encoded with the
    model's own text encoder, e.g. by `DefenseStack`); cfg: the settings (a preset)."""

    name = "sld"

    def __init__(self, concept_embeds: Tensor, cfg: SLDConfig | None = None) -> None:
        if concept_embeds.ndim != 3 or concept_embeds.shape[0] != 1:
            raise SafediffError(
                f"SLD concept embeddings must be [1, L, D], got {tuple(concept_embeds.shape)}"
            )
        self.cfg = cfg or SLDConfig()
        self.concept_embeds = concept_embeds

    @property
    def enabled(self) -> bool:
        return self.cfg.sld_guidance_scale > 1.0

    @property
    def extra_embeds(self) -> Tensor | None:
        """The safety concept, evaluated by the sampler in the CFG batch (None when off)."""
        return self.concept_embeds if self.enabled else None

    def init_state(
        self, n: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> dict[str, Tensor]:
        return {"momentum": torch.zeros((n, *latent_shape), dtype=torch.float32, device=device)}

    def __call__(
        self, step: GuidanceStep, state: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.enabled:
            return step.eps, state
        if step.eps_uncond is None or step.eps_cond is None:
            raise SafediffError(
                "SLD needs classifier-free guidance: sample with guidance_scale > 1 and a "
                "negative (or empty) prompt"
            )
        eps_safety = step.extra.get(self.name)
        if eps_safety is None:
            eps_safety = step.predict(self.concept_embeds)
        return sld_guided_eps(
            step.eps,
            step.eps_uncond,
            step.eps_cond,
            eps_safety,
            step.guidance_scale,
            step.step,
            state["momentum"],
            self.cfg,
        )

    def flow_guidance(
        self, step: FlowGuidanceStep, state: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """SLD on a flow model with a CFG pass (SD3): the velocity after SLD, and the new state.

        At a fixed x_t and sigma, eps = x_t + (1 - sigma) v is affine in v (x_t = (1 - sigma) x0
        + sigma eps, v = eps - x0), so the CFG branches, the safety concept's prediction and the
        guided prediction are mapped to eps, SLD runs there unchanged (its threshold, scales and
        momentum keep their eps units), and the result is mapped back:
        v' = v + (eps' - eps) / (1 - sigma). At sigma = 1 (the first step) eps = x_t for every
        branch, so every eps difference, and with it SLD's term, is 0: v is returned as it is.
        """
        if not self.enabled:
            return step.velocity, state
        if step.v_uncond is None or step.v_cond is None:
            raise SafediffError(
                "SLD needs classifier-free guidance: sample with guidance_scale > 1 and a "
                "negative (or empty) prompt (guidance-distilled FLUX models have no "
                "unconditional pass)"
            )
        v_safety = step.extra.get(self.name)
        if v_safety is None:
            raise SafediffError("SLD on a flow model needs its concept in the sampler's batch")
        to_eps = step.eps_from_velocity
        eps = to_eps(step.velocity)
        guided, new_state = sld_guided_eps(
            eps,
            to_eps(step.v_uncond),
            to_eps(step.v_cond),
            to_eps(v_safety),
            step.guidance_scale,
            step.step,
            state["momentum"],
            self.cfg,
        )
        return step.velocity_from_eps_change(guided - eps), new_state


def sld_guided_eps(
    eps: Tensor,
    eps_uncond: Tensor,
    eps_cond: Tensor,
    eps_safety: Tensor,
    guidance_scale: float,
    step: Tensor,
    momentum: Tensor,
    cfg: SLDConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """eps after SLD (eq. 3) and the new state {"momentum"}.

    eps: [B, C, h, w] the prediction after CFG and earlier hooks; eps_uncond, eps_cond,
    eps_safety: [B, C, h, w] the branches; step: [B] int64 step indices (warm-up per sample);
    momentum: [B, C, h, w] nu_i. Rows before warm-up get `eps` back (the same tensor when none
    is past it), their momentum still updated.
    """
    u, c, g = eps_uncond, eps_cond, guidance_scale
    gamma, new_momentum = sld_guidance_term(c, u, eps_safety, momentum, cfg)
    # eq. 3 in diffusers' order of operations; + (eps - CFG) carries the changes of earlier
    # hooks (it is exactly 0 when there are none, so the sum is diffusers' number exactly).
    guided = (u + g * ((c - u) - gamma)) + (eps - (u + g * (c - u)))
    apply = (step >= cfg.sld_warmup_steps).reshape(-1, *([1] * (gamma.ndim - 1)))
    if not bool(apply.any()):
        return eps, {"momentum": new_momentum}
    return torch.where(apply, guided, eps), {"momentum": new_momentum}
