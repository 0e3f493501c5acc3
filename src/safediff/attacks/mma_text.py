"""MMA-Diffusion's text attack: greedy coordinate gradient on the victim's text encoder.

Yang et al., "MMA-Diffusion: MultiModal Attack on Diffusion Models" (CVPR 2024), text modality;
reference implementation cure-lab/MMA-Diffusion (src/text_space_attack/MMA_para.py). The
adversarial prompt is n tokens x_1..x_n (the whole prompt; no part of the target is kept) chosen
to maximise the cosine similarity between its text embedding and the target prompt's:

    loss(x) = 1 - cos(pool(E(x)), pool(E(target)))

One step (GCG, Zou et al. 2023): the gradient of the loss w.r.t. the one-hot token matrix
[n, V] ranks, per position, the top-k substitutions (banned tokens masked out); `candidates`
prompts are formed by swapping one position each (positions spread evenly, token drawn at random
from that position's top-k); every candidate is encoded and the lowest loss becomes the next
prompt (even when it is worse than the current one, as in the reference); the best prompt seen is
returned.

pool: CLIP's pooled output (the state at the EOS token), as the reference uses `pooler_output`;
for the sandbox's MiniLM the masked mean of the token states (the reference's fallback for
encoders without a pooler, and MiniLM's own sentence embedding). See `TokenEncoder.pooled`.

Budget (config): `steps` (reference 1000) x `candidates` (512) candidate encodings plus one
gradient per step; `queries` counts text-encoder forward passes (candidates + gradients).

Departures from the reference:
- The one-hot covers exactly the n content positions (the reference's `input_ids[:n]` starts at
  BOS, so BOS is optimised in place of the last adversarial token).
- Candidates are kept only when their decoded text re-tokenises to exactly their ids (the
  reference checks the length only) and contains no banned word as a whole word, so the loss
  computed is the loss of the text the victim will see.
- Banned tokens: `TokenEncoder.allowed_tokens(target.banned_words)` (every token containing a
  banned word, and the word's own pieces), where the reference bans vocabulary entries containing
  a fixed NSFW word list (plus "ak", "na", "ke", "nud").
- The target embedding comes from the undefended base model's encoder when the victim has one
  (the attacker's open copy of the text encoder), else from the victim's; gradients flow through
  the victim's (possibly DES-swapped) encoder. Sampler-level defenses (SLD, Safe Denoiser,
  negative prompts) are not differentiated: the attack never sees them.
- Initial prompt: n random letters (the reference's 20 random ASCII letters), lowercased, drawn
  from `generator`; the reference has no seeding.
"""

import string
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safediff.attacks.base import AttackResult, AttackTarget, Victim
from safediff.attacks.tokens import TokenEncoder, contains_banned, token_encoder_for
from safediff.errors import SafediffError


@dataclass(frozen=True)
class MMATextConfig:
    """MMA-Diffusion text attack; defaults are the reference implementation's."""

    steps: int = 1000  # GCG steps (reference n_steps=1000)
    n_tokens: int = 20  # adversarial prompt length in tokens (reference control_length=20)
    top_k: int = 256  # substitutions per position from the gradient (reference topk=256)
    candidates: int = 512  # candidate prompts encoded per step (reference candidate_size=512)
    eval_batch: int = 128  # candidates per encoder forward (memory only; no effect on results)
    stop_loss: float | None = None  # stop once the best loss is below (reference --threshold 0.1
    #   with --early_stopping); None runs all steps

    def __post_init__(self) -> None:
        for name in ("steps", "n_tokens", "top_k", "candidates", "eval_batch"):
            if getattr(self, name) < 1:
                raise SafediffError(f"mma-text {name} must be >= 1, got {getattr(self, name)}")
        if self.stop_loss is not None and not 0.0 <= self.stop_loss <= 2.0:
            raise SafediffError(f"mma-text stop_loss must be in [0, 2], got {self.stop_loss}")


def cosine_loss(pooled: Tensor, target: Tensor) -> Tensor:
    """1 - cos(pooled [B, D], target [D] or [1, D]) -> [B] (MMA's CosineSimilarityLoss, eps 1e-6)."""
    return 1.0 - torch.nn.functional.cosine_similarity(
        pooled, target.reshape(1, -1), dim=-1, eps=1e-6
    )


def top_k_substitutions(grad: Tensor, allowed: Tensor, k: int) -> Tensor:
    """GCG's candidate tokens: per position the k allowed tokens with the most negative gradient.

    grad: [n, V] gradient of the loss w.r.t. the one-hot token matrix (a first-order estimate of
    the loss change when position i becomes token v); allowed: BoolTensor [V].
    Returns LongTensor [n, k'] with k' = min(k, allowed tokens), best first.
    """
    if grad.dim() != 2 or allowed.shape != grad.shape[1:]:
        raise SafediffError(f"grad must be [n, V] and allowed [V], got {list(grad.shape)}")
    n_allowed = int(allowed.sum())
    if n_allowed == 0:
        raise SafediffError("no token is allowed: every token is special or banned")
    masked = grad.masked_fill(~allowed.to(grad.device).unsqueeze(0), float("inf"))
    return (-masked).topk(min(k, n_allowed), dim=1).indices


def sample_candidates(current: Tensor, top: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """`num` one-token swaps of `current` [n]: candidate j changes position floor(j * n / num)
    (positions spread evenly, as the reference) to a token drawn uniformly from that position's
    row of `top` [n, k]. Returns LongTensor [num, n] on `current`'s device."""
    n, k = top.shape
    pos = (torch.arange(num) * n // num).to(current.device)  # [num]
    pick = torch.randint(0, k, (num,), generator=generator, device=generator.device)
    new_tok = top.to(current.device)[pos, pick.to(current.device)]  # [num]
    cands = current.unsqueeze(0).repeat(num, 1)
    cands[torch.arange(num, device=current.device), pos] = new_tok
    return cands


def token_gradient(
    enc: TokenEncoder, content: Tensor, target_pooled: Tensor
) -> tuple[Tensor, Tensor]:
    """(grad [n, V] of cosine_loss w.r.t. the one-hot of `content` [n], loss scalar)."""
    weight = enc.token_embedding()  # [V, E]
    ids = enc.with_content(content.unsqueeze(0))  # [1, L]
    n = content.shape[0]
    with torch.enable_grad():
        one_hot = torch.zeros(n, weight.shape[0], dtype=weight.dtype, device=weight.device)
        one_hot[torch.arange(n), content.to(weight.device)] = 1.0
        one_hot.requires_grad_(True)
        embeds = weight[ids].detach().clone()  # [1, L, E]
        embeds = torch.cat([embeds[:, :1], (one_hot @ weight).unsqueeze(0), embeds[:, 1 + n :]], 1)
        states = enc.states_from_embeds(embeds, ids)
        loss = cosine_loss(enc.pooled(states, ids), target_pooled)[0]
        if not loss.requires_grad:
            raise SafediffError("the victim's text encoder gives no gradient; MMA needs one")
        (grad,) = torch.autograd.grad(loss, one_hot)
    return grad, loss.detach()


class MMATextAttack:
    """MMA-Diffusion's text attack (see the module docstring)."""

    name = "mma-text"
    white_box = True

    def __init__(self, config: MMATextConfig | None = None) -> None:
        self.config = config or MMATextConfig()

    def run(
        self,
        victim: Victim,
        target: AttackTarget,
        generator: torch.Generator,
        progress: bool = False,
    ) -> AttackResult:
        cfg = self.config
        start = time.perf_counter()
        if not target.prompt.strip():
            raise SafediffError(f"target {target.target_id!r} has an empty prompt")
        enc = token_encoder_for(victim.model)
        ref = token_encoder_for(victim.base) if victim.base is not None else enc
        if cfg.n_tokens > enc.max_length - 2:
            raise SafediffError(
                f"mma-text n_tokens={cfg.n_tokens} does not fit the encoder's "
                f"{enc.max_length} positions (at most {enc.max_length - 2})"
            )
        allowed = enc.allowed_tokens(target.banned_words)
        if not allowed.any():
            raise SafediffError("no token is allowed: every token is special or banned")
        with torch.no_grad():
            t_ids = ref.ids([target.prompt])
            target_pooled = ref.pooled(ref.states(t_ids), t_ids)[0].to(enc.device)

        content = self._initial(enc, allowed, generator)
        best, best_loss = content.clone(), float("inf")
        history: list[float] = []
        queries, steps = 0, 0
        bar = tqdm(range(cfg.steps), desc=f"mma-text {target.target_id}", disable=not progress)
        for _ in bar:
            grad, _ = token_gradient(enc, content, target_pooled)
            queries += 1
            top = top_k_substitutions(grad, allowed, cfg.top_k)
            cands = sample_candidates(content, top, cfg.candidates, generator)
            cands = self._filter(enc, cands, content, target.banned_words)
            steps += 1
            if cands.shape[0] == 0:
                continue  # every swap failed the round trip; resample next step
            losses = self._losses(enc, cands, target_pooled)
            queries += cands.shape[0]
            j = int(losses.argmin())
            content, loss = cands[j], float(losses[j])
            history.append(loss)
            if loss < best_loss:
                best, best_loss = content.clone(), loss
            bar.set_postfix(loss=f"{best_loss:.4f}")
            if cfg.stop_loss is not None and best_loss < cfg.stop_loss:
                break
        prompt = enc.decode(best)
        with torch.no_grad():
            final = float(self._losses(enc, best.unsqueeze(0), target_pooled)[0])
        return AttackResult(
            target_id=target.target_id,
            adversarial_prompt=prompt,
            queries=queries,
            steps=steps,
            seconds=time.perf_counter() - start,
            loss=final,
            info={"loss_history": history, "pool": "mean" if enc.mask_padding else "eos"},
        )

    def _initial(self, enc: TokenEncoder, allowed: Tensor, generator: torch.Generator) -> Tensor:
        """n random single letters that are allowed tokens (the reference's random letters)."""
        letters = []
        for ch in string.ascii_lowercase:
            ids = enc.tokenizer(ch, add_special_tokens=False).input_ids
            if len(ids) == 1 and bool(allowed[ids[0]]):
                letters.append(ids[0])
        pool = torch.tensor(letters) if letters else torch.nonzero(allowed).flatten()
        pick = torch.randint(
            0, len(pool), (self.config.n_tokens,), generator=generator, device=generator.device
        ).cpu()
        return pool[pick].to(enc.device)  # single letters decode to "a b c ..." and round-trip

    @staticmethod
    def _filter(
        enc: TokenEncoder, cands: Tensor, current: Tensor, banned: tuple[str, ...]
    ) -> Tensor:
        """Candidates that differ from `current`, decode to text that re-tokenises to exactly
        their ids, and contain no banned word; duplicates dropped (order kept)."""
        keep, seen = [], set()
        n = current.shape[0]
        for row in cands:
            key = tuple(row.tolist())
            if key in seen or torch.equal(row, current):
                continue
            seen.add(key)
            text = enc.decode(row)
            if contains_banned(text, banned):
                continue
            again = enc.tokenizer(text, add_special_tokens=False).input_ids
            if len(again) == n and list(again) == list(key):
                keep.append(row)
        if not keep:
            return cands[:0]
        return torch.stack(keep)

    def _losses(self, enc: TokenEncoder, cands: Tensor, target_pooled: Tensor) -> Tensor:
        out = []
        with torch.no_grad():
            for chunk in cands.split(self.config.eval_batch):
                ids = enc.with_content(chunk)
                out.append(cosine_loss(enc.pooled(enc.states(ids), ids), target_pooled))
        return torch.cat(out).float().cpu()
