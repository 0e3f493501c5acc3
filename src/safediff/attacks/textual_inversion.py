"""Textual inversion against a defended model: "concept inversion" (Pham et al. 2024,
"Circumventing concept erasure methods for text-to-image generative models", ICLR; reference:
NYU-DICE-Lab/circumventing-concept-erasure, which runs diffusers' textual_inversion example
(Gal et al. 2023) through the erased model).

One new word embedding v* [E] is learnt with the plain diffusion loss on images of the concept,
through the *defended* model theta' (its UNet and, possibly DES-swapped, text encoder):

    v* = argmin_v E_{x_0, template, t, eps} || eps - eps_theta'(x_t, E'(template(<v>)), t) ||^2,
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.

The victim's weights are not modified: v* is injected at the placeholder's position through
`TokenEncoder.states_from_embeds` (the position holds the initializer token's id, which only
BERT's padding mask reads). Images of the concept: `num_images` latents the undefended model
samples from the target prompt (seeds target.seed, target.seed + 1, ...; kept as latents, no VAE
round trip), or the latents saved in `latents_dir` (safetensors files, every tensor in them
[n, C, h, w] or [C, h, w], concatenated in file-name order).

Result: `prompt_embeds` is the [1, L, D] conditioning of `result_template` ("a photo of a {}")
with v* in place of "{}"; `adversarial_prompt` is that template with the placeholder text
`<concept>` (for display; the victim cannot read it, sample with `prompt_embeds`);
`info["embedding"]` holds v* as a list.

Budget (`TextualInversionConfig`): `steps` optimisation steps of `batch_size` noised images each
(reference: 5000 steps of batch 4 x 4 gradient accumulation = 16); `queries` counts UNet samples.

Departures from the reference:
- the effective batch is one batch of `batch_size` (16 = the reference's 4 x 4 accumulation) and
  the learning rate is given already scaled (0.08 = 5e-3 x 16, diffusers' --scale_lr);
- templates: a few of diffusers' `imagenet_templates_small` (the reference uses all 27 and random
  crops / flips of pixel images; here images are latents, not augmented);
- the initializer word (reference: the erased concept's own word, e.g. "nude") defaults to the
  neutral "object" so the target's banned words are never the starting point;
- CLIP's embedding table is not grown by a row (nothing is written into the victim); the
  learnt row lives only in the attack and its result;
- sampler-level defenses (SLD, Safe Denoiser, negative prompts) are not in the loss, as in the
  reference for fine-tuned erasures (its NP / SLD folders re-implement them; not done here).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safediff.attacks.base import AttackResult, AttackTarget, Victim
from safediff.attacks.soft_prompt import (
    PromptLayout,
    base_or_refuse,
    denoising_loss,
    epsilon_prediction,
    forward_noise,
    prompt_pieces,
    require_grad,
    undefended_latents,
    unet_device,
    white_box_encoder,
)
from safediff.attacks.tokens import TokenEncoder
from safediff.errors import SafediffError
from safediff.sampling.rollout import predict_noise

TEMPLATES = (
    "a photo of a {}|a rendering of a {}|a cropped photo of the {}|a photo of the {}|"
    "a close-up photo of a {}|a good photo of a {}"
)
"""The first six of diffusers' textual_inversion `imagenet_templates_small`, "|"-separated."""


@dataclass(frozen=True)
class TextualInversionConfig:
    """Concept inversion's settings; defaults are the reference's (train.sh of each folder)."""

    steps: int = 5000  # optimisation steps (--max_train_steps 5000)
    lr: float = 0.08  # AdamW learning rate, already scaled: 5e-3 x batch 4 x accumulation 4
    batch_size: int = 16  # noised images per step (reference: 4 x 4 gradient accumulation)
    weight_decay: float = 0.01  # AdamW weight decay on v* (diffusers' --adam_weight_decay 1e-2)
    num_images: int = 25  # concept images sampled from the undefended model (--num_train_images)
    latents_dir: str = ""  # a folder of .safetensors latents to use instead of sampling
    initializer: str = "object"  # the word v* starts from (one token of the victim's tokenizer)
    templates: str = TEMPLATES  # training prompts separated by "|", "{}" = the token
    result_template: str = "a photo of a {}"  # the prompt of the returned conditioning
    placeholder: str = "<concept>"  # the token's text in adversarial_prompt (display only)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_images"):
            if getattr(self, name) < 1:
                raise SafediffError(
                    f"textual-inversion {name} must be >= 1, got {getattr(self, name)}"
                )
        if not self.lr > 0:
            raise SafediffError(f"textual-inversion lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise SafediffError(
                f"textual-inversion weight_decay must be >= 0, got {self.weight_decay}"
            )
        if not self.template_list:
            raise SafediffError("textual-inversion needs at least one template")
        for tpl in (*self.template_list, self.result_template):
            if tpl.count("{}") != 1:
                raise SafediffError(
                    f"textual-inversion template {tpl!r} must contain '{{}}' exactly once"
                )
        if not self.initializer.strip():
            raise SafediffError("textual-inversion initializer must be a word")

    @property
    def template_list(self) -> list[str]:
        """The training templates, split at "|" (empty pieces dropped)."""
        return [t.strip() for t in self.templates.split("|") if t.strip()]


def template_layout(encoder: TokenEncoder, template: str, token: int) -> PromptLayout:
    """The layout of `template` with one learnable slot where "{}" is (holding `token`)."""
    before, after = template.split("{}")
    pieces = [*prompt_pieces(encoder, before), None, *prompt_pieces(encoder, after)]
    return PromptLayout.build(encoder, pieces, [token])


def load_latents(folder: str | Path, shape: tuple[int, int, int]) -> Tensor:
    """Every tensor of the .safetensors files in `folder` (file-name order), as [n, C, h, w]
    float32; each must be [C, h, w] or [k, C, h, w] with (C, h, w) == `shape`."""
    from safetensors.torch import load_file

    where = Path(folder).expanduser()
    files = sorted(where.glob("*.safetensors")) if where.is_dir() else []
    if not files:
        raise SafediffError(f"no .safetensors latents found in {where}")
    rows = []
    for f in files:
        for name, tensor in sorted(load_file(str(f)).items()):
            t = tensor.float()
            t = t.unsqueeze(0) if t.dim() == 3 else t
            if t.dim() != 4 or tuple(t.shape[1:]) != tuple(shape):
                raise SafediffError(
                    f"{f.name}:{name} has shape {list(tensor.shape)}; expected [C, h, w] or "
                    f"[n, C, h, w] with (C, h, w) = {tuple(shape)}"
                )
            rows.append(t)
    return torch.cat(rows)


class TextualInversionAttack:
    """Concept inversion: see the module docstring. Construct with
    `TextualInversionAttack(config)`."""

    name = "textual-inversion"
    white_box = True

    def __init__(self, config: TextualInversionConfig | None = None) -> None:
        self.config = config or TextualInversionConfig()

    def _images(self, victim: Victim, target: AttackTarget) -> Tensor:
        cfg = self.config
        if cfg.latents_dir:
            return load_latents(cfg.latents_dir, victim.model.latent_shape)
        base = base_or_refuse(victim, self.name)
        seeds = [target.seed + i for i in range(cfg.num_images)]
        return undefended_latents(base, target.prompt, victim.settings, seeds)

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
        model = victim.model
        schedule = model.schedule
        device = unet_device(model)
        images = self._images(victim, target).to(device)  # [n, C, h, w]

        init_ids = prompt_pieces(enc, cfg.initializer)
        if len(init_ids) != 1:
            raise SafediffError(
                f"textual-inversion initializer {cfg.initializer!r} is {len(init_ids)} tokens "
                "for this tokenizer; pick a word that is one token"
            )
        token = init_ids[0]
        layouts = [template_layout(enc, tpl, token) for tpl in cfg.template_list]
        ids = torch.cat([lay.ids for lay in layouts])  # [J, L]
        slot_mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)  # [J, L]
        for j, lay in enumerate(layouts):
            slot_mask[j, lay.slots] = True
        table = enc.token_embedding().detach()  # [V, E]
        fixed = table[ids]  # [J, L, E]
        v = table[token].clone().requires_grad_(True)  # [E], v*
        opt = torch.optim.AdamW([v], lr=cfg.lr, weight_decay=cfg.weight_decay)

        history: list[float] = []
        bar = tqdm(total=cfg.steps, desc=self.name, disable=not progress)
        b = cfg.batch_size
        with torch.enable_grad():
            for _ in range(cfg.steps):
                img = torch.randint(images.shape[0], (b,), generator=generator).to(device)
                tpl = torch.randint(len(layouts), (b,), generator=generator).to(ids.device)
                t = torch.randint(schedule.num_train_timesteps, (b,), generator=generator)
                noise = torch.randn((b, *images.shape[1:]), generator=generator).to(device)
                t = t.to(device)
                x_t = forward_noise(schedule, images[img], t, noise)
                embeds = torch.where(slot_mask[tpl].unsqueeze(-1), v, fixed[tpl])  # [b, L, E]
                cond = enc.states_from_embeds(embeds, ids[tpl])  # [b, L, D]
                out = predict_noise(model.unet, x_t, t, cond, None, 1.0)
                loss = denoising_loss(epsilon_prediction(schedule, out, x_t, t), noise)
                require_grad(loss, self.name)
                (v.grad,) = torch.autograd.grad(loss, [v])
                opt.step()
                opt.zero_grad(set_to_none=True)
                history.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
        bar.close()

        result = template_layout(enc, cfg.result_template, token)
        with torch.no_grad():
            embeds = result.embeds(enc, v.detach().unsqueeze(0))  # [1, L, E]
            prompt_embeds = enc.states_from_embeds(embeds, result.ids).detach()  # [1, L, D]
        return AttackResult(
            target_id=target.target_id,
            adversarial_prompt=cfg.result_template.format(cfg.placeholder),
            prompt_embeds=prompt_embeds,
            queries=cfg.steps * b,
            steps=cfg.steps,
            seconds=time.perf_counter() - start,
            loss=sum(history[-10:]) / len(history[-10:]),
            info={
                "loss_history": history[:: max(1, cfg.steps // 200)],
                "embedding": v.detach().cpu().tolist(),
                "initializer": cfg.initializer,
                "num_images": int(images.shape[0]),
            },
        )
