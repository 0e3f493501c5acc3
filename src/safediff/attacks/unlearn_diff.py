"""UnlearnDiffAtk (Zhang et al. 2024, "To generate or not? Safety-driven unlearned diffusion
models are still easy to generate unsafe images ... for now", ECCV; reference:
OPTML-Group/Diffusion-MU-Attack, src/attackers/text_grad_.py and src/tasks/classifier_.py).

The diffusion model is its own classifier: an adversarial prompt that makes the defended model
denoise an image of the concept well makes it generate that concept. Given the target image's
latent x_0 (sampled from the undefended model with the target prompt and seed; the latent is kept,
no VAE round trip), k adversarial tokens are prepended to the prompt p and chosen to minimise

    l(adv) = E_{eps} || eps_theta'(x_t, E([adv; p]), t) - eps ||^2,
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps                         (q(x_t | x_0))

over the defended model theta' (its UNet and its, possibly DES-swapped, text encoder).

Optimisation, as the reference's `TextGrad`: each adversarial token is a distribution w_i over
the vocabulary (a point of the simplex, started uniform). Each step draws one token per row from
w (straight-through: forward one-hot, backward the gradient clipped to [-1, 1]), embeds it, takes
the loss with fresh noise, an Adam step (weight decay 0.1, as the reference's L2 in Adam) and the
projection of w back onto the simplex. Timesteps are visited in order, t = T/(2n), 3T/(2n), ...
(n = 50 for T = 1000: 10, 30, ..., 990), `steps_per_timestep` steps each. The result is the
argmax token of every row.

Budget (`UnlearnDiffConfig`): num_timesteps x steps_per_timestep optimisation steps, each one
forward + backward of the defended UNet and text encoder (reference: 50 x 40 = 2000); `queries`
counts these UNet calls.

Departures from the reference:
- the reference stops early at the first timestep whose generated image the judge flags; here
  the judge is never consulted (DESIGN.md section 10), all steps are run and the final argmax
  prompt is returned;
- banned words: the simplex is restricted to allowed tokens (`TokenEncoder.allowed_tokens`), and
  tokens of the prompt p that are pieces of a banned word are dropped from p (with no banned words
  this is the paper's [adv; p] exactly);
- the projection onto the simplex is the exact sort-based one (the reference bisects);
- noise is drawn from the attack's generator, not the global RNG;
- sampler-level defenses (SLD, Safe Denoiser) are not differentiated; the loss is the defended
  model's conditional prediction, as in the reference (no classifier-free guidance).
"""

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from safediff.attacks.base import AttackResult, AttackTarget, Victim
from safediff.attacks.soft_prompt import (
    PromptLayout,
    base_or_refuse,
    denoising_loss,
    draw_probes,
    epsilon_prediction,
    forward_noise,
    project_to_simplex,
    prompt_pieces,
    require_grad,
    sample_one_hot,
    target_allowed,
    undefended_latents,
    unet_device,
    white_box_encoder,
)
from safediff.attacks.tokens import contains_banned
from safediff.errors import SafediffError
from safediff.sampling.rollout import predict_noise


@dataclass(frozen=True)
class UnlearnDiffConfig:
    """UnlearnDiffAtk's settings; defaults are the reference's (configs/*/text_grad_*.json)."""

    num_tokens: int = 5  # k adversarial tokens prepended to the prompt ("prefix_k", k = 5)
    num_timesteps: int = 50  # timesteps visited in order, T/(2n) + i T/n ("n_samples": 50)
    steps_per_timestep: int = 40  # optimisation steps at each timestep ("iteration": 40)
    lr: float = 0.01  # Adam learning rate on the token distributions
    weight_decay: float = 0.1  # Adam's L2 weight decay (the reference's)
    random_init: bool = False  # start from random points of the simplex instead of uniform
    eval_draws: int = 4  # fixed (t, eps) draws on which the final prompt's loss is reported

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_timesteps", "steps_per_timestep", "eval_draws"):
            if getattr(self, name) < 1:
                raise SafediffError(f"unlearndiff {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SafediffError(f"unlearndiff lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise SafediffError(f"unlearndiff weight_decay must be >= 0, got {self.weight_decay}")

    @property
    def steps(self) -> int:
        return self.num_timesteps * self.steps_per_timestep


def attack_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """The reference's timesteps: start = T // n // 2, then every T // n, the first n of them
    (T = 1000, n = 50: 10, 30, ..., 990). Clamped to at least a stride of 1 when n > T."""
    stride = max(num_train_timesteps // n, 1)
    start = num_train_timesteps // n // 2
    return list(range(start, num_train_timesteps, stride))[:n]


class UnlearnDiffAtk:
    """UnlearnDiffAtk: see the module docstring. Construct with `UnlearnDiffAtk(config)`."""

    name = "unlearndiff"
    white_box = True

    def __init__(self, config: UnlearnDiffConfig | None = None) -> None:
        self.config = config or UnlearnDiffConfig()

    def run(
        self,
        victim: Victim,
        target: AttackTarget,
        generator: torch.Generator,
        progress: bool = False,
    ) -> AttackResult:
        cfg = self.config
        start = time.perf_counter()
        enc = white_box_encoder(victim, self.name)
        base = base_or_refuse(victim, self.name)
        model = victim.model
        schedule = model.schedule
        device = unet_device(model)
        x0 = undefended_latents(base, target.prompt, victim.settings, [target.seed]).to(device)

        allowed = target_allowed(enc, target)  # [V]
        kept = [p for p in prompt_pieces(enc, target.prompt) if bool(allowed[p])]
        first_allowed = int(allowed.nonzero()[0]) if bool(allowed.any()) else 0
        fill = [first_allowed] * cfg.num_tokens  # placeholders until the first draw
        layout = PromptLayout.build(enc, [None] * cfg.num_tokens + kept, fill)
        table = enc.token_embedding().detach()  # [V, E]

        # w: [k, V] token distributions on the simplex over allowed tokens.
        if cfg.random_init:
            init = torch.rand((cfg.num_tokens, enc.vocab_size), generator=generator)
        else:
            init = torch.full((cfg.num_tokens, enc.vocab_size), 1.0 / enc.vocab_size)
        w = project_to_simplex(init.to(table.device), allowed).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=cfg.lr, weight_decay=cfg.weight_decay)

        history: list[float] = []
        ts = attack_timesteps(schedule.num_train_timesteps, cfg.num_timesteps)
        bar = tqdm(total=len(ts) * cfg.steps_per_timestep, desc=self.name, disable=not progress)
        with torch.enable_grad():
            for t_int in ts:
                t = torch.full((1,), t_int, dtype=torch.long, device=device)
                total = 0.0
                for _ in range(cfg.steps_per_timestep):
                    one_hot = sample_one_hot(w, generator)  # [k, V]
                    tokens = one_hot.detach().argmax(dim=-1)  # [k]
                    cond = layout.states(enc, one_hot @ table, tokens)  # [1, L, D]
                    noise = torch.randn(x0.shape, generator=generator).to(device)
                    x_t = forward_noise(schedule, x0, t, noise)
                    out = predict_noise(model.unet, x_t, t, cond, None, 1.0)
                    loss = denoising_loss(epsilon_prediction(schedule, out, x_t, t), noise)
                    require_grad(loss, self.name)
                    (w.grad,) = torch.autograd.grad(loss, [w])
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        w.copy_(project_to_simplex(w, allowed))
                    total += float(loss.detach())
                    bar.update(1)
                history.append(total / cfg.steps_per_timestep)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
        bar.close()

        tokens = w.detach().argmax(dim=-1)  # [k]
        text = layout.text(enc, tokens)
        final = self._final_loss(victim, enc, text, x0, generator)
        return AttackResult(
            target_id=target.target_id,
            adversarial_prompt=text,
            queries=cfg.steps + cfg.eval_draws,
            steps=cfg.steps,
            seconds=time.perf_counter() - start,
            loss=final,
            info={
                "loss_per_timestep": history,
                "timesteps": ts,
                "adversarial_tokens": tokens.tolist(),
                "contains_banned": contains_banned(text, target.banned_words),
            },
        )

    def _final_loss(self, victim: Victim, enc, text: str, x0, generator) -> float:
        """The attack loss of the decoded text, re-encoded as the victim will see it, on
        `eval_draws` fixed (t, eps) draws."""
        model = victim.model
        probes = draw_probes(model.schedule, x0, self.config.eval_draws, generator)
        with torch.no_grad():
            cond = enc.states(enc.ids([text]))  # [1, L, D]
            cond = cond.expand(probes.t.shape[0], *cond.shape[1:])
            out = predict_noise(model.unet, probes.x_t, probes.t, cond, None, 1.0)
            eps = epsilon_prediction(model.schedule, out, probes.x_t, probes.t)
            return float(denoising_loss(eps, probes.noise))
