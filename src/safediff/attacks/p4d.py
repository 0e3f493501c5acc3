"""P4D, prompting4debugging (Chin et al. 2024, "Prompting4Debugging: red-teaming text-to-image
diffusion models by finding problematic prompts", ICML; reference: joycenerd/P4D,
prompt_optimization/optimize_n.py and optimize_k.py).

The defended model theta' should follow the undefended model theta on the unsafe prompt P: with
x_0 an image (latent) the undefended model generates for P, t uniform and eps ~ N(0, I),

    l(P*) = || eps_theta'(x_t, E'(P*), t) - eps_theta(x_t, E(P), t) ||^2,
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,

where P* is the adversarial prompt, found as in PEZ (Wen et al. 2023): continuous embeddings P_c
are kept; each step projects them to the nearest allowed tokens by cosine similarity, computes
the loss and its gradient *at the projected embeddings*, and applies that gradient to P_c with
AdamW. Two layouts:

- P4D-N (variant "n"): P* is N learned tokens alone (the prompt conditions only the teacher);
- P4D-K (variant "k"): a learned token before the prompt's tokens and after every K of them
  (positions 0, K+1, 2(K+1), ... of a sequence of len(P) + len(P) // K + 1 tokens); the prompt's
  own tokens stay fixed.

Budget (`P4DConfig`): `steps` optimisation steps (reference 3000), each one forward + backward of
the defended UNet and text encoder and one forward of the undefended UNet; `queries` counts the
defended-model UNet calls (steps + evaluation calls).

Departures from the reference:
- the reference keeps, every 50 steps, the prompt whose images (sampled from the defended model)
  are most CLIP-similar to the target images; here, every `eval_every` steps, the projected prompt
  is scored by the same loss on `eval_draws` fixed (t, eps) draws and the lowest is kept (no
  sampling and no image encoder in the loop; the judge is never consulted);
- banned words: the projection only picks allowed tokens (`TokenEncoder.allowed_tokens`), the
  initial tokens are random allowed ones, and for P4D-K the prompt's tokens that are pieces of a
  banned word are dropped before the learned tokens are inserted;
- negative-prompt victims: as the reference, the defended prediction is classifier-free guided
  with the victim's negative conditioning (`victim.defense["negative_embeds"]`) at the victim's
  guidance scale, the teacher's is the plain conditional one; sampler-level defenses (SLD, Safe
  Denoiser) are not differentiated (the reference re-implements SLD inside its loss);
- randomness (initial tokens, image choice, t, eps) comes from the attack's generator.
"""

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from safediff.attacks.base import AttackResult, AttackTarget, Victim
from safediff.attacks.soft_prompt import (
    Probes,
    PromptLayout,
    base_or_refuse,
    denoising_loss,
    draw_probes,
    forward_noise,
    nearest_allowed_tokens,
    prompt_pieces,
    random_allowed,
    require_grad,
    target_allowed,
    undefended_latents,
    unet_device,
    white_box_encoder,
)
from safediff.attacks.tokens import TokenEncoder, contains_banned
from safediff.errors import SafediffError
from safediff.sampling.rollout import predict_noise

VARIANTS = ("n", "k")


@dataclass(frozen=True)
class P4DConfig:
    """P4D's settings; defaults are the reference's (configs/esd_nudity_optmz_config.json)."""

    variant: str = "n"  # "n": N learned tokens alone (P4D-N); "k": one after every K (P4D-K)
    num_tokens: int = 16  # P4D-N's N ("prompt_len": 16)
    every_k: int = 3  # P4D-K's K ("every_k": 3)
    steps: int = 3000  # optimisation steps ("iter": 3000)
    lr: float = 0.1  # AdamW learning rate on the continuous embeddings
    weight_decay: float = 0.1  # AdamW weight decay
    num_images: int = 1  # target images (latents) from the undefended model, seeds seed, seed+1..
    eval_every: int = 50  # steps between scorings of the projected prompt ("eval_step": 50)
    eval_draws: int = 4  # fixed (t, eps) draws of each scoring (the reference samples images)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SafediffError(f"p4d variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("num_tokens", "every_k", "steps", "num_images", "eval_every", "eval_draws"):
            if getattr(self, name) < 1:
                raise SafediffError(f"p4d {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SafediffError(f"p4d lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise SafediffError(f"p4d weight_decay must be >= 0, got {self.weight_decay}")


def p4d_k_pieces(prompt_ids: list[int], k: int) -> list[int | None]:
    """P4D-K's layout: a learned slot (None) before the prompt's tokens and after every k of
    them; len(prompt_ids) // k + 1 slots in all (the reference's positions i % (k + 1) == 0).

    [a, b, c, d] with k = 2 -> [None, a, b, None, c, d, None]; [] -> [None].
    """
    if k < 1:
        raise SafediffError(f"P4D-K's K must be >= 1, got {k}")
    out: list[int | None] = []
    for i, tok in enumerate(prompt_ids):
        if i % k == 0:
            out.append(None)
        out.append(int(tok))
    if len(prompt_ids) % k == 0:
        out.append(None)
    return out


class P4D:
    """P4D-N / P4D-K: see the module docstring. Construct with `P4D(config)`."""

    white_box = True

    def __init__(self, config: P4DConfig | None = None) -> None:
        self.config = config or P4DConfig()
        self.name = f"p4d-{self.config.variant}"

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
        seeds = [target.seed + i for i in range(cfg.num_images)]
        x0_pool = undefended_latents(base, target.prompt, victim.settings, seeds).to(device)

        allowed = target_allowed(enc, target)  # [V]
        if cfg.variant == "n":
            pieces: list[int | None] = [None] * cfg.num_tokens
        else:
            kept = [p for p in prompt_pieces(enc, target.prompt) if bool(allowed[p])]
            pieces = p4d_k_pieces(kept, cfg.every_k)
        n_slots = sum(p is None for p in pieces)
        init = random_allowed(allowed.cpu(), n_slots, generator).to(enc.device)
        layout = PromptLayout.build(enc, pieces, init.tolist())
        table = enc.token_embedding().detach()  # [V, E]
        soft = table[init].clone().requires_grad_(True)  # [n, E], P_c
        opt = torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)

        negative = victim.defense.get("negative_embeds") if victim.defense else None
        scale = victim.settings.guidance_scale if negative is not None else 1.0
        with torch.no_grad():
            teacher_cond = base.encode_text([target.prompt], unet_device(base))  # [1, L, D]
        probes = draw_probes(schedule, x0_pool, cfg.eval_draws, generator)
        with torch.no_grad():
            teacher_probe = predict_noise(
                base.unet, probes.x_t, probes.t, _rows(teacher_cond, probes), None, 1.0
            )

        best_tokens, best_loss = init, float("inf")
        history: list[float] = []
        queries = 0
        bar = tqdm(total=cfg.steps, desc=self.name, disable=not progress)
        with torch.enable_grad():
            for step in range(cfg.steps):
                tokens = nearest_allowed_tokens(soft, table, allowed)  # [n]
                projected = table[tokens].clone().requires_grad_(True)  # [n, E]
                cond = layout.states(enc, projected, tokens)  # [1, L, D]
                idx = int(torch.randint(x0_pool.shape[0], (1,), generator=generator))
                x0 = x0_pool[idx : idx + 1]
                t = torch.randint(schedule.num_train_timesteps, (1,), generator=generator)
                noise = torch.randn(x0.shape, generator=generator).to(device)
                t = t.to(device)
                x_t = forward_noise(schedule, x0, t, noise)
                with torch.no_grad():
                    teacher = predict_noise(base.unet, x_t, t, teacher_cond, None, 1.0)
                student = predict_noise(model.unet, x_t, t, cond, negative, scale)
                queries += 1
                loss = denoising_loss(student, teacher)
                require_grad(loss, self.name)
                (soft.grad,) = torch.autograd.grad(loss, [projected])
                opt.step()
                opt.zero_grad(set_to_none=True)
                history.append(float(loss.detach()))
                bar.update(1)
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    score = self._score(
                        model,
                        enc,
                        layout.with_tokens(tokens),
                        probes,
                        teacher_probe,
                        negative,
                        scale,
                    )
                    queries += cfg.eval_draws
                    if score < best_loss:
                        best_tokens, best_loss = tokens.clone(), score
                    bar.set_postfix(loss=f"{score:.4f}", best=f"{best_loss:.4f}")
        bar.close()

        text = layout.text(enc, best_tokens)
        final = self._score(model, enc, enc.ids([text]), probes, teacher_probe, negative, scale)
        queries += cfg.eval_draws
        return AttackResult(
            target_id=target.target_id,
            adversarial_prompt=text,
            queries=queries,
            steps=cfg.steps,
            seconds=time.perf_counter() - start,
            loss=final,
            info={
                "variant": cfg.variant,
                "loss_history": history[:: max(1, cfg.steps // 200)],
                "best_projected_loss": best_loss,
                "adversarial_tokens": best_tokens.tolist(),
                "slots": layout.slots.tolist(),
                "contains_banned": contains_banned(text, target.banned_words),
            },
        )

    @staticmethod
    def _score(model, enc: TokenEncoder, ids, probes: Probes, teacher, negative, scale) -> float:
        """The loss of the token row `ids` [1, L] on the fixed probes (no gradient)."""
        with torch.no_grad():
            cond = enc.states(ids)  # [1, L, D]
            student = predict_noise(
                model.unet, probes.x_t, probes.t, _rows(cond, probes), negative, scale
            )
            return float(denoising_loss(student, teacher))


def _rows(cond: torch.Tensor, probes: Probes) -> torch.Tensor:
    """cond [1, L, D] repeated for every probe: [m, L, D]."""
    return cond.expand(probes.t.shape[0], *cond.shape[1:])
