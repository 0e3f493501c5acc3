"""Ring-A-Bell: a concept vector added to the target's embedding, inverted by a genetic search.

Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?"
(ICLR 2024); reference implementation chiayi-hsu/Ring-A-Bell (Get_Concept_Vector.ipynb,
InversePrompt.ipynb). Model-agnostic: it needs only a text encoder E (token states [L, D]), never
the UNet or the defense.

1. Concept vector: c = mean_i [E(p_i with the concept) - E(p_i without it)]  ([L, D], over
   paired prompts; `concept_vector`).
2. Problematic embedding: e* = E(target) + eta * c.
3. Genetic search over K-token prompts [BOS, x_1..x_K, EOS, pad...] minimising
   ||E(x) - e*||^2 (summed over all L positions and D): each generation keeps the best half of the
   population; every survivor stays and, with probability `crossover_rate`, is crossed with a
   random survivor at a random cut (both children join); then every individual (survivors
   included, as in the reference) has, with probability `mutation_rate`, one random position
   replaced by a random token. The last generation only selects. The best prompt is decoded.

Paired prompts: `config.pairs` ((with, without) pairs, e.g. the paper's 30 violence pairs) or, when
empty, one pair made from the target itself: (target, target with every banned word deleted as a
whole word). With one auto pair c points from the target's sanitised version to the target, so
e* = E(target) + eta (E(target) - E(sanitised target)) over-shoots the concept as the paper does
with its averaged vector, but from a single noisy difference. If the target contains none of its
banned words, c = 0 and the search just inverts E(target) (recorded as info["concept_pairs"] = 0).

Budget (config): `generations` (paper/reference 3000) x `population` (200) encodings; `queries`
counts encoded prompts.

Departures from the reference:
- Tokens are drawn from `TokenEncoder.allowed_tokens(target.banned_words)` (the reference draws
  any id in [1, 49405]: it can spell the concept's own words); individuals whose decoded text
  contains a banned word (spelt from smaller pieces) get infinite loss.
- The encoder: the undefended base model's when the victim has one (the paper attacks the
  public SD text encoder whatever the defense), else the victim's own; works for CLIP (K = 16 of 77
  positions, the paper's nudity setting) and the sandbox's MiniLM (K <= 18 of 20).
- The returned prompt is the decoded best individual; `loss` is recomputed on the text the
  victim will see (re-tokenised), which can differ where the tokenizer re-segments (tokens.py).
- All randomness comes from `generator` (the reference mixes python `random` and numpy).
"""

import re
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safediff.attacks.base import AttackResult, AttackTarget, Victim
from safediff.attacks.tokens import TokenEncoder, contains_banned, token_encoder_for
from safediff.errors import SafediffError


@dataclass(frozen=True)
class RingABellConfig:
    """Ring-A-Bell; defaults are the paper's nudity setting (reference InversePrompt.ipynb)."""

    eta: float = 3.0  # concept strength (paper: 3 for nudity, 5.5 for violence)
    n_tokens: int = 16  # K, tokens in the adversarial prompt (paper: 16; 75 fills CLIP's 77)
    population: int = 200  # individuals per generation (reference population_size=200)
    generations: int = 3000  # genetic iterations (reference generation=3000)
    mutation_rate: float = 0.25  # chance an individual gets one random token (reference 0.25)
    crossover_rate: float = 0.5  # chance a survivor is crossed with another (reference 0.5)
    pairs: tuple[tuple[str, str], ...] = ()  # (with concept, without) prompts for c; () = from the
    #   target by deleting its banned words
    eval_batch: int = 256  # prompts per encoder forward (memory only; no effect on results)

    def __post_init__(self) -> None:
        if not self.eta >= 0.0:
            raise SafediffError(f"ring-a-bell eta must be >= 0, got {self.eta}")
        for name in ("n_tokens", "generations", "eval_batch"):
            if getattr(self, name) < 1:
                raise SafediffError(f"ring-a-bell {name} must be >= 1, got {getattr(self, name)}")
        if self.population < 2:
            raise SafediffError(f"ring-a-bell population must be >= 2, got {self.population}")
        for name in ("mutation_rate", "crossover_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SafediffError(
                    f"ring-a-bell {name} must be in [0, 1], got {getattr(self, name)}"
                )
        pairs = tuple(tuple(p) if isinstance(p, list | tuple) else p for p in self.pairs)
        object.__setattr__(self, "pairs", pairs)  # YAML gives lists
        for pair in self.pairs:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(isinstance(p, str) for p in pair)
            ):
                raise SafediffError(
                    f"ring-a-bell pairs must be (with, without) strings, got {pair!r}"
                )


def concept_vector(with_states: Tensor, without_states: Tensor) -> Tensor:
    """c = mean over pairs of (with - without): [N, L, D] x 2 -> [L, D]."""
    if with_states.shape != without_states.shape or with_states.dim() != 3:
        raise SafediffError(
            f"concept states must both be [N, L, D], got {list(with_states.shape)} and "
            f"{list(without_states.shape)}"
        )
    return (with_states - without_states).mean(dim=0)


def delete_words(prompt: str, words: tuple[str, ...] | list[str]) -> str:
    """`prompt` with every word of `words` removed as a whole word (case-insensitive), spaces
    collapsed: the auto-generated "without" side of a concept pair."""
    out = prompt
    for w in words:
        if w.strip():
            out = re.sub(
                rf"(?<![A-Za-z0-9]){re.escape(w.strip())}(?![A-Za-z0-9])",
                " ",
                out,
                flags=re.IGNORECASE,
            )
    return " ".join(out.split())


def crossover(parents: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """Ring-A-Bell's crossover: parents [P, K] -> [P + 2m, K]. Each parent is kept; with
    probability `rate` it is paired with a uniformly drawn parent j and a cut q in [0, K - 1] and
    both children a[:q] + b[q:] and b[:q] + a[q:] follow it."""
    p, k = parents.shape
    dev = generator.device
    hit = torch.rand(p, generator=generator, device=dev).cpu() < rate
    partner = torch.randint(0, p, (p,), generator=generator, device=dev).cpu()
    cut = torch.randint(0, k, (p,), generator=generator, device=dev).cpu()
    rows = []
    for i in range(p):
        rows.append(parents[i])
        if hit[i]:
            a, b, q = parents[i], parents[partner[i]], int(cut[i])
            rows.append(torch.cat([a[:q], b[q:]]))
            rows.append(torch.cat([b[:q], a[q:]]))
    return torch.stack(rows)


def mutate(
    population: Tensor, rate: float, token_pool: Tensor, generator: torch.Generator
) -> Tensor:
    """Each row of population [P, K], with probability `rate`, gets one uniformly drawn position
    set to a uniformly drawn token of `token_pool` [A]. Returns a new tensor."""
    p, k = population.shape
    dev = generator.device
    hit = torch.rand(p, generator=generator, device=dev).cpu() < rate
    pos = torch.randint(0, k, (p,), generator=generator, device=dev).cpu()
    tok = token_pool[torch.randint(0, len(token_pool), (p,), generator=generator, device=dev).cpu()]
    out = population.clone()
    rows = torch.nonzero(hit).flatten()
    out[rows, pos[rows]] = tok[rows]
    return out


class RingABell:
    """Ring-A-Bell (see the module docstring)."""

    name = "ring-a-bell"
    white_box = False

    def __init__(self, config: RingABellConfig | None = None) -> None:
        self.config = config or RingABellConfig()

    def target_embedding(self, enc: TokenEncoder, target: AttackTarget) -> tuple[Tensor, int]:
        """(e* = E(target) + eta * c [L, D], number of concept pairs used)."""
        pairs = list(self.config.pairs)
        if not pairs:
            without = delete_words(target.prompt, target.banned_words)
            pairs = [(target.prompt, without)] if without != " ".join(target.prompt.split()) else []
        with torch.no_grad():
            base = enc.states(enc.ids([target.prompt]))[0]
            if not pairs:
                return base, 0
            with_s = enc.states(enc.ids([p[0] for p in pairs]))
            without_s = enc.states(enc.ids([p[1] for p in pairs]))
        return base + self.config.eta * concept_vector(with_s, without_s), len(pairs)

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
        enc = token_encoder_for(victim.base if victim.base is not None else victim.model)
        if cfg.n_tokens > enc.max_length - 2:
            raise SafediffError(
                f"ring-a-bell n_tokens={cfg.n_tokens} does not fit the encoder's "
                f"{enc.max_length} positions (at most {enc.max_length - 2})"
            )
        token_pool = torch.nonzero(enc.allowed_tokens(target.banned_words)).flatten()
        if len(token_pool) == 0:
            raise SafediffError("no token is allowed: every token is special or banned")
        goal, n_pairs = self.target_embedding(enc, target)

        dev = generator.device
        pick = torch.randint(
            0, len(token_pool), (cfg.population, cfg.n_tokens), generator=generator, device=dev
        ).cpu()
        population = token_pool[pick]  # [P, K] token ids (CPU)
        banned_cache: dict[tuple[int, ...], bool] = {}
        best, best_loss = population[0].clone(), float("inf")
        history: list[float] = []
        queries = 0
        bar = tqdm(
            range(cfg.generations), desc=f"ring-a-bell {target.target_id}", disable=not progress
        )
        for gen in bar:
            fitness = self._fitness(enc, population, goal, target.banned_words, banned_cache)
            queries += population.shape[0]
            order = torch.argsort(fitness, stable=True)
            population = population[order][: cfg.population // 2]
            if float(fitness[order[0]]) < best_loss:
                best, best_loss = population[0].clone(), float(fitness[order[0]])
            history.append(best_loss)
            bar.set_postfix(loss=f"{best_loss:.4g}")
            if gen != cfg.generations - 1:
                population = crossover(population, cfg.crossover_rate, generator)
                population = mutate(population, cfg.mutation_rate, token_pool, generator)

        prompt = enc.decode(best)
        with torch.no_grad():  # the loss of the text itself, as the victim will tokenise it
            final = float(((enc.states(enc.ids([prompt]))[0] - goal) ** 2).sum())
        return AttackResult(
            target_id=target.target_id,
            adversarial_prompt=prompt,
            queries=queries,
            steps=cfg.generations,
            seconds=time.perf_counter() - start,
            loss=final,
            info={
                "search_loss": best_loss,
                "loss_history": history[:: max(1, len(history) // 100)],
                "concept_pairs": n_pairs,
                "eta": cfg.eta,
            },
        )

    def _fitness(
        self,
        enc: TokenEncoder,
        population: Tensor,
        goal: Tensor,
        banned: tuple[str, ...],
        cache: dict[tuple[int, ...], bool],
    ) -> Tensor:
        """||E(x) - e*||^2 per individual [P] (CPU float), inf where the decoded text contains a
        banned word."""
        out = []
        with torch.no_grad():
            for chunk in population.split(self.config.eval_batch):
                states = enc.states(enc.with_content(chunk.to(enc.device)))
                out.append(((states - goal) ** 2).sum(dim=(1, 2)).float().cpu())
        fit = torch.cat(out)
        if banned:
            for i, row in enumerate(population.tolist()):
                key = tuple(row)
                if key not in cache:
                    cache[key] = contains_banned(enc.decode(torch.tensor(row)), banned)
                if cache[key]:
                    fit[i] = float("inf")
        return fit
