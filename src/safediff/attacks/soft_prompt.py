"""What the white-box prompt attacks share (UnlearnDiffAtk, P4D, textual inversion).

The three attacks optimise something continuous in front of the victim's text encoder and push
it through the defended UNet's denoising loss:

- the forward process q(x_t | x_0) of the model's own schedule (`forward_noise`) and the
  conversion of the UNet's output to an epsilon prediction (`epsilon_prediction`, so
  v-prediction models are attacked on the same loss);
- the projections from continuous to discrete tokens: the nearest allowed token by cosine
  similarity (P4D's PEZ-style projection, `nearest_allowed_tokens`) and the Euclidean projection
  onto the probability simplex over allowed tokens (UnlearnDiffAtk's, `project_to_simplex`);
- `PromptLayout`: a token row [BOS, pieces..., EOS, PAD...] in which some positions are
  learnable slots, turned into the [1, L, D] conditioning with gradient to the slots;
- the victim checks and the target latents x_0 from the undefended model.

White-box attacks differentiate through the victim's text encoder and UNet only. Sampler-level
defenses (SLD, the Safe Denoiser: `victim.defense["guidance"]`) are not differentiated; the
negative-prompt replacement (`victim.defense["negative_embeds"]`) is used where the attack's
paper uses classifier-free guidance.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from safediff.attacks.base import AttackTarget, Victim
from safediff.attacks.tokens import TokenEncoder, token_encoder_for
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.sampling.sample import SamplerSettings, sample
from safediff.sampling.schedule import DDIMSchedule

# ----------------------------------------------------------------------------- pure math


def forward_noise(schedule: DDIMSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, the forward process q(x_t | x_0) (DDPM eq. 4).

    x0, noise: [B, C, h, w]; t: [B] int64 in [0, num_train_timesteps). Returns [B, C, h, w] in
    x0's dtype (math in float32).
    """
    a = schedule.alpha_bar(t.to(x0.device)).to(torch.float32).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    out = a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()
    return out.to(x0.dtype)


def epsilon_prediction(schedule: DDIMSchedule, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The UNet's output at (x_t, t) as an epsilon prediction: itself for epsilon models, and
    eps = sqrt(a_t) v + sqrt(1 - a_t) x_t for v-prediction models (Salimans & Ho 2022).

    output, x_t: [B, C, h, w]; t: [B] int64. Returns float32 [B, C, h, w].
    """
    if schedule.prediction_type == "epsilon":
        return output.float()
    a = schedule.alpha_bar(t.to(x_t.device)).to(torch.float32).view(-1, 1, 1, 1)
    return a.sqrt() * output.float() + (1 - a).sqrt() * x_t.float()


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element (torch's MSELoss, as both references use):
    mean((prediction - target)^2), a scalar float32."""
    if prediction.shape != target.shape:
        raise SafediffError(
            f"prediction {list(prediction.shape)} and target {list(target.shape)} differ in shape"
        )
    return ((prediction.float() - target.float()) ** 2).mean()


def project_to_simplex(weights: Tensor, allowed: Tensor) -> Tensor:
    """Euclidean projection of each row onto the probability simplex over the allowed entries.

    weights: [n, V] float; allowed: [V] bool (at least one True). Returns [n, V]: rows >= 0 that
    sum to 1, zero on every entry not allowed, argmin ||w - v||_2 over that set.

    UnlearnDiffAtk's reference finds the same point by bisection on the shift mu of
    clip(v - mu, 0, 1) with sum 1; this is the exact sort-based solution (Duchi et al. 2008,
    "Efficient projections onto the l1-ball", fig. 1).
    """
    if weights.dim() != 2 or allowed.shape != weights.shape[1:]:
        raise SafediffError(
            f"weights must be [n, V] and allowed [V], got {list(weights.shape)} and "
            f"{list(allowed.shape)}"
        )
    idx = allowed.to(weights.device).nonzero().squeeze(1)  # [A]
    if idx.numel() == 0:
        raise SafediffError("no token is allowed; ban fewer words")
    v = weights[:, idx].float()  # [n, A]
    u, _ = torch.sort(v, dim=1, descending=True)  # [n, A]
    css = u.cumsum(dim=1) - 1  # [n, A]
    k = torch.arange(1, u.shape[1] + 1, device=v.device, dtype=v.dtype)  # [A]
    support = (u - css / k) > 0  # [n, A], True on a prefix
    rho = support.sum(dim=1, keepdim=True)  # [n, 1] >= 1
    theta = css.gather(1, rho - 1) / rho.to(v.dtype)  # [n, 1]
    out = torch.zeros_like(weights)
    out[:, idx] = (v - theta).clamp(min=0).to(weights.dtype)
    return out


def nearest_allowed_tokens(embeds: Tensor, table: Tensor, allowed: Tensor) -> Tensor:
    """The allowed token whose input embedding is closest in cosine similarity to each row.

    embeds: [n, E]; table: [V, E] (the encoder's input embedding matrix); allowed: [V] bool.
    Returns LongTensor [n] of token ids (never a disallowed id). This is PEZ's projection, which
    P4D's reference uses (normalised dot product, top-1).
    """
    if not bool(allowed.any()):
        raise SafediffError("no token is allowed; ban fewer words")
    q = torch.nn.functional.normalize(embeds.detach().float(), dim=-1)  # [n, E]
    k = torch.nn.functional.normalize(table.detach().float(), dim=-1)  # [V, E]
    sim = q @ k.T  # [n, V]
    sim = sim.masked_fill(~allowed.to(sim.device), float("-inf"))
    return sim.argmax(dim=-1)


class _SampleOneHot(torch.autograd.Function):
    """Forward: one token per row drawn from the row's distribution, as a one-hot [n, V].
    Backward: the incoming gradient clipped to [-1, 1] (hardtanh), passed straight through to
    the distribution; UnlearnDiffAtk's `STERandSelect`."""

    @staticmethod
    def forward(ctx, probs: Tensor, generator: torch.Generator) -> Tensor:
        draws = torch.multinomial(probs.detach().float().cpu(), 1, generator=generator)  # [n, 1]
        out = torch.zeros_like(probs)
        out.scatter_(1, draws.to(probs.device), 1.0)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return torch.nn.functional.hardtanh(grad), None


def sample_one_hot(probs: Tensor, generator: torch.Generator) -> Tensor:
    """probs [n, V] (rows on the simplex) -> one-hot [n, V] drawn from them, straight-through
    gradient (see `_SampleOneHot`). The draw uses `generator` (a CPU generator)."""
    return _SampleOneHot.apply(probs, generator)


# ----------------------------------------------------------------------------- prompt layout


@dataclass
class PromptLayout:
    """A token row with learnable slots.

    ids: LongTensor [1, L], BOS, the pieces, EOS, padding; slot positions hold the slot's current
        token (updated by `with_tokens`), so the encoder's padding mask never masks a slot.
    slots: LongTensor [n], the positions of the learnable tokens (increasing).
    """

    ids: Tensor
    slots: Tensor

    @classmethod
    def build(
        cls, encoder: TokenEncoder, pieces: Sequence[int | None], fill: Sequence[int]
    ) -> "PromptLayout":
        """pieces: token ids of the content, None where a learnable slot goes; fill: the initial
        token of each slot (one per None). Content longer than L - 2 is an error naming the
        lengths (slots must not be cut off silently)."""
        n_slots = sum(p is None for p in pieces)
        if n_slots != len(fill):
            raise SafediffError(f"{n_slots} slots but {len(fill)} initial tokens")
        room = encoder.max_length - 2
        if len(pieces) > room:
            raise SafediffError(
                f"the adversarial prompt needs {len(pieces)} tokens but the text encoder takes "
                f"{room} between its begin and end tokens; use fewer adversarial tokens or a "
                "shorter prompt"
            )
        it = iter(fill)
        content = [next(it) if p is None else int(p) for p in pieces]
        row = [encoder.bos_id, *content, encoder.eos_id]
        row += [encoder.pad_id] * (encoder.max_length - len(row))
        slots = [1 + i for i, p in enumerate(pieces) if p is None]
        device = encoder.device
        return cls(
            ids=torch.tensor([row], dtype=torch.long, device=device),
            slots=torch.tensor(slots, dtype=torch.long, device=device),
        )

    def with_tokens(self, tokens: Tensor) -> Tensor:
        """ids [1, L] with the slots set to `tokens` [n]."""
        ids = self.ids.clone()
        ids[0, self.slots] = tokens.to(ids.device)
        return ids

    def embeds(self, encoder: TokenEncoder, slot_embeds: Tensor) -> Tensor:
        """[1, L, E] input embeddings: the table's rows for fixed positions, `slot_embeds` [n, E]
        (with their gradient) at the slots."""
        table = encoder.token_embedding()
        base = table[self.ids[0]].detach()  # [L, E]
        mask = torch.zeros(base.shape[0], 1, dtype=torch.bool, device=base.device)
        mask[self.slots] = True
        scattered = torch.zeros_like(base).index_copy(0, self.slots, slot_embeds.to(base.dtype))
        return torch.where(mask, scattered, base).unsqueeze(0)  # [1, L, E]

    def states(self, encoder: TokenEncoder, slot_embeds: Tensor, tokens: Tensor) -> Tensor:
        """The conditioning [1, L, D] with `slot_embeds` [n, E] at the slots; `tokens` [n] are the
        ids written at the slots (they decide BERT's padding mask, nothing else)."""
        return encoder.states_from_embeds(
            self.embeds(encoder, slot_embeds), self.with_tokens(tokens)
        )

    def text(self, encoder: TokenEncoder, tokens: Tensor) -> str:
        """The row with `tokens` at the slots, decoded to text (special tokens dropped)."""
        return encoder.decode(self.with_tokens(tokens)[0])


def prompt_pieces(encoder: TokenEncoder, prompt: str) -> list[int]:
    """The content token ids of `prompt` as the victim tokenizes it (no BOS/EOS/padding)."""
    ids = encoder.ids([prompt])
    return [int(i) for i in ids[0, encoder.content_slots(ids)[0]].tolist()]


@dataclass
class Probes:
    """Fixed draws to compare candidate prompts on the same noise: x0 [m, C, h, w], t [m] int64,
    noise [m, C, h, w] and the noised x_t [m, C, h, w]."""

    x0: Tensor
    t: Tensor
    noise: Tensor
    x_t: Tensor


def draw_probes(
    schedule: DDIMSchedule, x0_pool: Tensor, m: int, generator: torch.Generator
) -> Probes:
    """m draws of (an x0 of the pool, t uniform in [0, T), eps ~ N(0, I)) and their x_t."""
    idx = torch.randint(x0_pool.shape[0], (m,), generator=generator)
    t = torch.randint(schedule.num_train_timesteps, (m,), generator=generator)
    noise = torch.randn((m, *x0_pool.shape[1:]), generator=generator)
    x0 = x0_pool[idx.to(x0_pool.device)]
    noise = noise.to(x0.device)
    t = t.to(x0.device)
    return Probes(x0, t, noise, forward_noise(schedule, x0, t, noise))


def random_allowed(allowed: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n token ids drawn uniformly from the allowed ones: LongTensor [n] on the CPU."""
    idx = allowed.nonzero().squeeze(1)
    if idx.numel() == 0:
        raise SafediffError("no token is allowed; ban fewer words")
    return idx[torch.randint(idx.numel(), (n,), generator=generator)]


# ----------------------------------------------------------------------------- victims


def white_box_encoder(victim: Victim, attack: str) -> TokenEncoder:
    """The victim's text encoder at token level, or a one-line SafediffError when a white-box
    attack cannot differentiate through it."""
    try:
        return token_encoder_for(victim.model)
    except SafediffError as err:
        raise SafediffError(f"{attack} is a white-box attack and needs gradients: {err}") from None


def require_grad(loss: Tensor, attack: str) -> None:
    """A one-line SafediffError when the loss does not depend differentiably on the attack's
    variables (a non-differentiable UNet or text encoder, e.g. one run under no_grad)."""
    if not loss.requires_grad:
        raise SafediffError(
            f"{attack} is a white-box attack, but the victim's UNet or text encoder gives no "
            "gradient to the prompt; attack it with a black-box attack (ring-a-bell, "
            "sneaky-prompt, mma-text) instead"
        )


def unet_device(model: T2IModel) -> torch.device:
    try:
        return next(model.unet.parameters()).device
    except StopIteration:
        raise SafediffError("the victim's UNet has no parameters; cannot tell its device") from None


def undefended_latents(
    model: T2IModel, prompt: str, settings: SamplerSettings, seeds: Sequence[int]
) -> Tensor:
    """x_0 latents [n, C, h, w] of `prompt` from the undefended `model`, one per seed, sampled
    with `settings` and kept as latents (no VAE round trip)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        traj = sample(model, [prompt] * len(gens), gens, settings, decode=False).trajectory
    return traj.latents[:, -1].detach()


def base_or_refuse(victim: Victim, attack: str) -> T2IModel:
    """victim.base, or a one-line SafediffError (the attack needs the undefended model)."""
    if victim.base is None:
        raise SafediffError(
            f"{attack} needs the undefended model (Victim.base) for its target images; pass it"
        )
    return victim.base


def target_allowed(encoder: TokenEncoder, target: AttackTarget) -> Tensor:
    """allowed_tokens of the target's banned words, on the encoder's device: BoolTensor [V]."""
    return encoder.allowed_tokens(target.banned_words).to(encoder.device)
