"""SAFREE: training-free filtering of toxic prompt tokens, as a sampler defense.

Paper: Yoon, Yu, Patil, Yao & Bansal, "SAFREE: Training-Free and Adaptive Guard for Safe
Text-to-Image and Video Generation" (ICLR 2025); reference code jaehong31/SAFREE
(models/modified_stable_diffusion_pipeline.py, free_lunch_utils.py, generate_safree.py). With the
text encoder's pooled embedding E(.) in R^D (CLIP: the EOS state after the final layer norm, the
space of the token states the UNet reads) and the prompt's token states x_0 ... x_{L-1}:

1. Toxic subspace (`concept_projection`): C = [E(k_1) ... E(k_K)] of the concept keywords,
   P_c = C (C^T C)^+ C^T, the [D, D] projection onto span(C).
2. Trigger tokens (`flag_tokens`): for each of the prompt's n real tokens, p_i = E(prompt with token
   i masked) and d_i = ||(I - P_c) p_i||, its distance to the toxic subspace. Token i is flagged
   when d_i >= (1 + alpha) * mean_{j != i} d_j: removing it moves the prompt away from the
   subspace by more than the others do (the reference keeps tokens with d_i < (1 + alpha) mean).
3. Projection (`project_tokens`): flagged token states become (I - P_c) P_m x_i, where P_m is the
   projection onto span(p_1 ... p_n) (the prompt's own span); every other row, the padding and the
   start/end tokens included, is left bit-identical.
4. Self-validating filter (`self_validating_beta`, `filtered_steps`): beta = 1 - mean over the
   prompt's active tokens (start, words, end) of cos(x_j, (I - P_c) P_m x_j);
   k = round(up_t * sigmoid(2 * svf_k * (10 beta - svf_mid))) (the reference's `f_beta`, sigmoid
   form; up_t 10, svf_k 2.5, svf_mid 5.333 for nudity); the filtered embeddings condition steps
   i <= k of the reference's 50 and the original prompt the rest.
5. Latent re-attention (`fourier_reweight`, `reattention`): in the Fourier domain of the UNet's
   skip features (FreeU's place: the skip connections read by the two deepest up blocks, scales
   s1 and s2, low-frequency window of half-width 1 around the centre after fftshift), the
   filtered prompt's coefficients whose magnitude exceeds the original prompt's are multiplied by
   s < 1 (the paper's re-attention: attenuate what the filtered prompt amplifies). It needs the
   original prompt's features at the same layer: one extra UNet pass (filtered and original
   rows, 2 x the batch) at the steps where the filtered embeddings are used, for prompts with a
   flagged token only.

Where this departs from the reference, and why:

- The step window is a fraction of the trajectory: with S sampler steps the filtered embeddings
  condition the first max(1, round((k + 1) * S / 50)) steps, which is the reference's k + 1 at its
  50 steps, so the window does not depend on the step count. (The reference also runs
  DPM-Solver; here whatever sampler `sample` uses.)
- Re-attention: the reference's released SD 1.x path registers its FreeU blocks without a filter
  mode (`register_free_upblock2d(..., safree=None)`), so its re-attention is a no-op there; its
  low-frequency filter compares real parts and *replaces* coefficients by the scalar s. Here the
  paper's rule: magnitudes compared, coefficients multiplied by s. FreeU's backbone factors b1, b2
  are 1 in the reference's defaults (identity) and are left out. Stages are chosen by up-block
  index (diffusers' FreeU `resolution_idx`: block 0 gets s1, block 1 gets s2) rather than the
  reference's channel counts (1280 / 640), so any UNet (the sandbox's) has them.
- The masked token: the reference replaces it by id 0 (CLIP's "!"); that is kept for CLIP, and
  tokenizers with a mask token (the sandbox's BERT WordPiece) use it. The reference's prompt
  batch size is 1; here every prompt of a batch is filtered on its own.
- The reference also passes the keywords joined by ", " as the CFG negative prompt: here that is
  the separate `negprompt:text=...` defense, stacked (the stack applies it before SAFREE).
- With fewer than 2 real tokens nothing is flagged (the leave-one-out mean is undefined).

Model families: SD 1.x / 2.x (CLIP text encoder: pooled = EOS state) and the sandbox (MiniLM:
pooled = mean of the last hidden state over the attention mask, unnormalised, the space of its
token states) get every part; the sandbox's calibrated self-validating filter is
`SANDBOX_OPTIONS` (svf_mid=3;up_t=50: the nudity constants leave MiniLM prompts unfiltered after
step 1).

SDXL is refused, though the paper reports SDXL numbers: SAFREE's projections are defined in one
space, that of the text encoder's pooled embedding E(.), which for SD 1.x is also the space of
the token states the UNet reads (CLIP's EOS state after the final layer norm is a row of the last
hidden state). SDXL breaks both halves of that. Its token states are the *penultimate* hidden
states of two encoders concatenated (768 + 1280), a space no pooled embedding lives in, and its
pooled bigG projection (text_embeds, P = 1280) is a second conditioning channel that reaches the
UNet through the added time embedding, not cross-attention, so filtering token rows would leave
the concept in it. The reference's SDXL pipeline, as read for this module, mixes a 1280-wide
pooled subspace from encoder 2 with the 2048-wide token states. Supporting it means redefining E(.) (e.g. per encoder, on the penultimate EOS
rows) and filtering the pooled channel too: a new method, not the paper's, left out here.
SD3 / FLUX are refused for the same reason (three encoders: CLIP-L, CLIP-G and T5 token rows in
one joint width, pooled CLIP projections as a separate channel) and because the per-step
conditioning and re-attention act on a UNet's noise prediction, which the flow sampler does not
have (it takes velocity corrections only). Models with no diffusers `up_blocks` get the
text side only (re-attention needs lra=false).

Integration (composable with the stack): `apply_safree` returns the model unchanged and a guidance
hook. `safediff.sampling.sample.sample` binds the hook to the prompts it encodes
(`Safree.for_prompts`), after the stack's other encoders (DES) have been swapped in; the bound hook
hands the sampler per-step conditioning (`step_embeds`, read by the rollout's `GuidedPredictor`)
and corrects the CFG eps for re-attention before later hooks (SLD, the Safe Denoiser) see it.
GRPO's re-scoring (`transition_log_prob`) does not re-apply the per-step conditioning, so the
unbound hook refuses to run (train without SAFREE).
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from safediff.defenses.negative_prompt import NUDITY_CONCEPTS
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.sampling.rollout import GuidanceStep

SAFREE_NUDITY = NUDITY_CONCEPTS
"""The reference's nudity keywords (generate_safree.py, `negative_prompt_space`)."""

SAFREE_PRESETS: dict[str, tuple[str, ...]] = {"nudity": SAFREE_NUDITY}

SANDBOX_OPTIONS = {"svf_mid": "3", "up_t": "50"}
"""The sandbox's setting (spec options), with the keywords text=weapon|skull|fire. MiniLM's betas
are lower than CLIP's on nudity (explicit prompts 0.32-0.86, benign 0.23-0.55), so the reference's
sigmoid (midpoint 10 beta = 5.333, at most 11 of 50 steps) filters 1-2 of the demo's 10 steps and
changes nothing (unsafe rate 0.958 -> 0.958, 8 explicit prompts per trained family); with the
midpoint at 3 and the window allowed the whole trajectory (up_t 50): 0.583, utility unchanged
(0.667, 2 benign prompts per task); filtering every step (svf=false) gives the same unsafe rate
at utility 0.583. Fuller run (16 explicit per family, 8 benign per task, seed 2024): trained
families 0.875 -> 0.646 (paired -22.9 pp [-35.4, -10.4]; fire barely moves: 0.94 -> 0.88),
utility 0.604 -> 0.583; with the Safe Denoiser (the paper's pairing) 0.438 (-43.8 pp)."""

REFERENCE_STEPS = 50
"""Sampler steps the reference's step window (up_t) is counted in."""


@dataclass(frozen=True)
class SafreeConfig:
    """SAFREE's settings (defaults: the reference's nudity run, run_nudity.sh: -svf -lra)."""

    alpha: float = 0.01
    """Trigger threshold: flag token i when d_i >= (1 + alpha) * mean of the others; > -1."""
    svf: bool = True
    """Self-validating filter: filtered embeddings for the first steps only (False: every step)."""
    up_t: int = 10
    """Most steps (of the reference's 50) after step 0 the filtered embeddings may condition; >= 0."""
    svf_mid: float = 5.333
    """Midpoint of the step-count sigmoid in 10 * beta (reference: 5.333, artists 5.5)."""
    svf_k: float = 2.5
    """Steepness of that sigmoid (reference: 2.5, artists 3.5); > 0."""
    lra: bool = True
    """Latent re-attention in the Fourier domain of the UNet's skip features."""
    lra_threshold: int = 1
    """Half-width of the low-frequency window (after fftshift) that is re-weighted; >= 1."""
    lra_s1: float = 0.9
    """Scale of up block 0's (deepest) skip features; in [0, 1], 1 = identity."""
    lra_s2: float = 0.2
    """Scale of up block 1's skip features; in [0, 1], 1 = identity."""

    def __post_init__(self) -> None:
        checks = (
            (self.alpha > -1, f"alpha must be > -1, got {self.alpha}"),
            (self.up_t >= 0, f"up_t must be >= 0, got {self.up_t}"),
            (self.svf_k > 0, f"svf_k must be > 0, got {self.svf_k}"),
            (self.lra_threshold >= 1, f"lra_threshold must be >= 1, got {self.lra_threshold}"),
            (0 <= self.lra_s1 <= 1, f"lra_s1 must lie in [0, 1], got {self.lra_s1}"),
            (0 <= self.lra_s2 <= 1, f"lra_s2 must lie in [0, 1], got {self.lra_s2}"),
        )
        for ok, message in checks:
            if not ok:
                raise SafediffError(f"safree option {message}")


# ------------------------------------------------------------------------------------ the math


def projection_matrix(vectors: Tensor) -> Tensor:
    """Projection onto the span of the rows of `vectors` [K, D]: E (E^T E)^+ E^T with E = rows^T,
    [D, D] float32 (computed in float64; the pseudo-inverse handles dependent rows)."""
    e = vectors.to(torch.float64).T  # [D, K]
    return (e @ torch.linalg.pinv(e.T @ e) @ e.T).to(torch.float32)


def concept_projection(concept_embeds: Tensor) -> Tensor:
    """P_c [D, D]: the toxic subspace spanned by the keywords' pooled embeddings [K, D]."""
    return projection_matrix(concept_embeds)


def token_distances(masked_pooled: Tensor, p_concept: Tensor) -> Tensor:
    """d_i = ||(I - P_c) p_i||: each masked prompt's distance to the toxic subspace, [n].

    masked_pooled: [n, D] pooled embeddings of the prompt with token i masked; p_concept [D, D]."""
    p = masked_pooled.to(torch.float32)
    return (p - p @ p_concept.T).norm(dim=-1)


def flag_tokens(masked_pooled: Tensor, p_concept: Tensor, alpha: float) -> Tensor:
    """Trigger tokens [n] bool: d_i >= (1 + alpha) * mean_{j != i} d_j (reference: keep d_i below).

    Fewer than 2 tokens: nothing is flagged (no leave-one-out mean)."""
    d = token_distances(masked_pooled, p_concept)
    n = d.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.bool, device=d.device)
    loo_mean = (d.sum() - d) / (n - 1)
    return ~(d < (1.0 + alpha) * loo_mean)


def orthogonal_in_span(tokens: Tensor, p_prompt: Tensor, p_concept: Tensor) -> Tensor:
    """(I - P_c) P_m x for every row x of tokens [L, D] -> [L, D] float32."""
    x = tokens.to(torch.float32)
    in_span = x @ p_prompt.T  # P_m x
    return in_span - in_span @ p_concept.T  # (I - P_c) P_m x


def project_tokens(tokens: Tensor, p_prompt: Tensor, p_concept: Tensor, flags: Tensor) -> Tensor:
    """Token states [L, D] with the rows where flags [L] is True replaced by (I - P_c) P_m x;
    the other rows are the input's, bit for bit (same dtype)."""
    projected = orthogonal_in_span(tokens, p_prompt, p_concept).to(tokens.dtype)
    return torch.where(flags[:, None], projected, tokens)


def self_validating_beta(tokens: Tensor, projected: Tensor, active: Tensor) -> float:
    """beta = 1 - mean over active rows of cos(x_j, projected_j); tokens, projected [L, D],
    active [L] bool (start, words, end). In [0, 2]; 0 when projecting changes nothing."""
    cos = torch.nn.functional.cosine_similarity(
        projected[active].to(torch.float32), tokens[active].to(torch.float32), dim=-1
    )
    return float(1.0 - cos.mean())


def reference_window(beta: float, up_t: int, mid: float, k: float) -> int:
    """The reference's k (`f_beta`, sigmoid): round(up_t * sigmoid(2 k (10 beta - mid)))."""
    z = 2.0 * k * (10.0 * beta - mid)
    return round(up_t / (1.0 + math.exp(-z)) if z > -700 else 0.0)


def filtered_steps(beta: float, num_steps: int, cfg: SafreeConfig) -> int:
    """How many leading steps of `num_steps` use the filtered embeddings.

    The reference uses them for steps i <= k of 50, i.e. k + 1 steps; here the same fraction of
    any step count, at least one step: max(1, round((k + 1) * S / 50)), capped at S. Without the
    self-validating filter (cfg.svf False): every step."""
    if not cfg.svf:
        return num_steps
    k = reference_window(beta, cfg.up_t, cfg.svf_mid, cfg.svf_k)
    return min(num_steps, max(1, round((k + 1) * num_steps / REFERENCE_STEPS)))


def fourier_reweight(h: Tensor, h_ref: Tensor, threshold: int, scale: float) -> Tensor:
    """SAFREE's latent re-attention on features h [B, C, H, W] against h_ref (same shape).

    F = fftshift(fft2(h)) over (H, W); inside the low-frequency window (rows and columns
    centre - threshold ... centre + threshold - 1, centre = H // 2, W // 2) the coefficients with
    |F| > |F_ref| are multiplied by `scale`; the result is the real part of the inverse transform,
    in h's dtype. scale 1 returns h itself (identity)."""
    if scale == 1.0:
        return h
    f = torch.fft.fftshift(torch.fft.fft2(h.to(torch.float32)), dim=(-2, -1))
    f_ref = torch.fft.fftshift(torch.fft.fft2(h_ref.to(torch.float32)), dim=(-2, -1))
    height, width = h.shape[-2:]
    window = torch.zeros(height, width, dtype=torch.bool, device=h.device)
    r0, c0 = height // 2, width // 2
    window[max(0, r0 - threshold) : r0 + threshold, max(0, c0 - threshold) : c0 + threshold] = True
    damp = window & (f.abs() > f_ref.abs())
    f = torch.where(damp, f * scale, f)
    out = torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real
    return out.to(h.dtype)


def _up_blocks(unet: nn.Module) -> Any:
    for module in unet.modules():
        blocks = getattr(module, "up_blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    return None


@contextlib.contextmanager
def reattention(unet: nn.Module, n_filtered: int, cfg: SafreeConfig) -> Iterator[None]:
    """While open, calls of `unet` on a batch cat([filtered rows, original rows]) (n_filtered
    each) re-weight the filtered rows' skip features read by up blocks 0 and 1 against the
    original rows' (`fourier_reweight`, scales lra_s1, lra_s2). The forward pre-hooks are removed
    on exit: the (shared) UNet is unchanged afterwards."""
    blocks = _up_blocks(unet)
    if blocks is None:
        raise SafediffError("safree re-attention needs a diffusers UNet (up_blocks); set lra=false")
    key = "res_hidden_states_tuple"

    def make_hook(scale: float):
        def pair(h: Tensor) -> Tensor:
            filt, orig = h[:n_filtered], h[n_filtered:]
            return torch.cat([fourier_reweight(filt, orig, cfg.lra_threshold, scale), orig])

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if key in kwargs:
                return args, {**kwargs, key: tuple(pair(h) for h in kwargs[key])}
            return (args[0], tuple(pair(h) for h in args[1]), *args[2:]), kwargs

        return hook

    handles = [
        blocks[i].register_forward_pre_hook(make_hook(s), with_kwargs=True)
        for i, s in ((0, cfg.lra_s1), (1, cfg.lra_s2))
        if i < len(blocks) and s != 1.0
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------ the encoder


class _Encoder:
    """The text encoder's tokenizer and module (`adapter_for_model`), for pooled embeddings of
    token ids: CLIP's EOS state (pooler_output), otherwise the mean of the last hidden state over
    the attention mask (the sandbox's MiniLM)."""

    def __init__(self, model: T2IModel) -> None:
        from safediff.defenses.text_encoder_adapter import adapter_for_model

        if model.components.get("text_encoder_2") is not None:
            raise SafediffError(
                "safree needs a model with one text encoder whose pooled embedding lives in the "
                "space of the token states the denoiser reads (SD 1.x/2.x, the sandbox); this one "
                "(SDXL, SD3, FLUX) conditions on several encoders' states plus a separate pooled "
                "channel, which one keyword subspace does not cover; use negprompt, the Safe "
                "Denoiser or a weight edit (uce, rece, esd) instead"
            )
        adapter = adapter_for_model(model)
        self.tokenizer = adapter.tokenizer
        self.module = adapter.module
        self.clip = type(self.module).__name__.startswith("CLIPText")
        mask_id = getattr(self.tokenizer, "mask_token_id", None)
        self.mask_id = 0 if self.clip or mask_id is None else int(mask_id)

    def ids(self, texts: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask [B, length], padded and truncated like `encode_text`."""
        batch = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=length,
            return_tensors="pt",
        )  # fmt: skip
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def pooled(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Pooled embeddings [B, D] float32 of token ids [B, L] (mask: [B, L], 1 = real)."""
        device = next(self.module.parameters()).device
        if ids.shape[0] == 0:
            return torch.zeros(0, 0, device=device)
        ids, mask = ids.to(device), mask.to(device)
        if self.clip:  # the reference encodes without an attention mask (causal: pads come after)
            return self.module(ids).pooler_output.to(torch.float32)
        hidden = self.module(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return ((hidden * m).sum(1) / m.sum(1).clamp_min(1)).to(torch.float32)

    def word_count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def masked_variants(
    ids: Tensor, mask: Tensor, counts: Sequence[int], mask_id: int
) -> tuple[Tensor, Tensor]:
    """Each prompt once per word with that word's id replaced by `mask_id`.

    ids, mask: [N, L] token ids and attention mask (start token at 0, words at 1 ... count);
    counts: words per prompt. Returns ids and mask [sum(counts), L], prompt by prompt, word by
    word (row j of prompt n has word j + 1 masked)."""
    if sum(counts) == 0:
        return ids[:0], mask[:0]
    rows = [ids[n].repeat(c, 1) for n, c in enumerate(counts)]
    for r, c in zip(rows, counts, strict=True):
        r[torch.arange(c), torch.arange(1, c + 1)] = mask_id
    masks = [mask[n].repeat(c, 1) for n, c in enumerate(counts)]
    return torch.cat(rows), torch.cat(masks)


def keywords_of(spec_arg: str) -> tuple[str, ...]:
    """'nudity' -> the reference's keyword list; 'text=a|b|c' -> ('a', 'b', 'c')."""
    if spec_arg.startswith("text="):
        words = tuple(w.strip() for w in spec_arg[len("text=") :].split("|"))
        if not words or not all(words):
            raise SafediffError(
                f"safree concept list {spec_arg!r} has an empty keyword; write "
                "safree:text=WORD|WORD|..."
            )
        return words
    if spec_arg not in SAFREE_PRESETS:
        raise SafediffError(
            f"unknown safree concept preset {spec_arg!r}; presets: "
            f"{', '.join(SAFREE_PRESETS)} (or safree:text=WORD|WORD|...)"
        )
    return SAFREE_PRESETS[spec_arg]


# ------------------------------------------------------------------------------ the defense


@dataclass
class FilteredPrompts:
    """SAFREE's text side for N prompts (token states [N, L, D] as `encode_text` gives them).

    embeds: [N, L, D] the filtered token states (rows of unflagged tokens bit-identical).
    flags: [N, L] bool, the flagged token positions. beta: [N] the self-validating beta.
    steps: [N] int64, leading sampler steps that use `embeds` (0 when nothing is flagged).
    """

    embeds: Tensor
    flags: Tensor
    beta: Tensor
    steps: Tensor


class Safree:
    """The SAFREE defense of one model and keyword list (unbound: see `for_prompts`).

    concept_embeds: [K, D] the keywords' pooled embeddings; p_concept: [D, D] P_c.
    """

    name = "safree"

    def __init__(
        self, model: T2IModel, keywords: Sequence[str], cfg: SafreeConfig, device: torch.device
    ) -> None:
        if not keywords:
            raise SafediffError("safree needs at least one concept keyword (safree:text=WORD|...)")
        self.cfg = cfg
        self.model = model
        self.encoder = _Encoder(model)
        for word in keywords:
            if self.encoder.word_count(word) == 0:
                raise SafediffError(
                    f"safree concept {word!r} is split into no tokens by the model's tokenizer; "
                    "use words it knows"
                )
        if cfg.lra and _up_blocks(model.unet) is None:
            raise SafediffError(
                "safree re-attention needs a diffusers UNet (up_blocks); set lra=false"
            )
        self.length = int(model.encode_text([""], torch.device(device)).shape[1])
        self.keywords = tuple(keywords)
        ids, mask = self.encoder.ids(self.keywords, self.length)
        self.concept_embeds = self.encoder.pooled(ids, mask).to(device)  # [K, D]
        self.p_concept = concept_projection(self.concept_embeds)  # [D, D]

    def filter(self, prompts: Sequence[str], embeds: Tensor, num_steps: int) -> FilteredPrompts:
        """SAFREE's text side for prompts whose token states are embeds [N, L, D]."""
        n, length = embeds.shape[:2]
        if length != self.length:
            raise SafediffError(
                f"safree was set up for {self.length}-token conditioning, got {length}; apply "
                "the defense to the model that encodes these prompts"
            )
        ids, mask = self.encoder.ids(prompts, length)
        counts = (mask.sum(1) - 2).clamp_min(0).tolist()  # words, without start/end tokens
        pooled = self.encoder.pooled(*masked_variants(ids, mask, counts, self.encoder.mask_id))
        out = embeds.clone()
        flags = torch.zeros(n, length, dtype=torch.bool)
        betas, steps = torch.zeros(n), torch.zeros(n, dtype=torch.int64)
        ends = torch.tensor(counts).cumsum(0).tolist()
        for row, (count, end) in enumerate(zip(counts, ends, strict=True)):
            if count < 2:  # no leave-one-out mean: nothing flagged, never filtered
                continue
            x = embeds[row]  # [L, D]
            p_emb = pooled[end - count : end].to(x.device)  # [count, D]
            p_prompt, p_concept = projection_matrix(p_emb), self.p_concept.to(x.device)
            flags[row, 1 : count + 1] = flag_tokens(p_emb, p_concept, self.cfg.alpha).cpu()
            active = mask[row].bool().to(x.device)
            betas[row] = self_validating_beta(x, orthogonal_in_span(x, p_prompt, p_concept), active)
            if flags[row].any():
                out[row] = project_tokens(x, p_prompt, p_concept, flags[row].to(x.device))
                steps[row] = filtered_steps(float(betas[row]), num_steps, self.cfg)
        return FilteredPrompts(out, flags, betas, steps)

    def for_prompts(self, prompts: Sequence[str], embeds: Tensor, num_steps: int) -> "BoundSafree":
        """The hook bound to one sampling call's prompts (called by `sample`)."""
        return BoundSafree(self, self.filter(prompts, embeds, num_steps), embeds)

    def init_state(self, n: int, latent_shape: tuple[int, ...], device: torch.device) -> dict:
        return {}

    def __call__(self, step: GuidanceStep, state: dict) -> tuple[Tensor, dict]:
        raise SafediffError(
            "safree filters the prompts themselves: sample through safediff.sampling.sample.sample"
            " (it binds the defense to the prompts); re-scoring (GRPO) with safree is not supported"
        )


class BoundSafree:
    """SAFREE bound to N prompts: per-step conditioning for the sampler and the re-attention
    correction of the CFG eps (a stateless guidance hook)."""

    name = "safree"

    def __init__(self, safree: Safree, filtered: FilteredPrompts, original: Tensor) -> None:
        self.safree = safree
        self.filtered = filtered
        self.original = original  # [N, L, D]
        self._steps = filtered.steps.to(original.device)

    def init_state(self, n: int, latent_shape: tuple[int, ...], device: torch.device) -> dict:
        return {}

    def _use(self, step_index: Tensor, rows: Tensor) -> Tensor:
        """[B] bool: rows whose step uses the filtered embeddings."""
        steps = self._steps.to(rows.device)[rows]
        return step_index.to(rows.device) < steps

    def step_embeds(self, i: int, start: int, stop: int, cond: Tensor) -> Tensor:
        """Conditioning of samples start:stop at step i: filtered rows inside their window,
        `cond` itself (the same tensor) when no row is."""
        rows = torch.arange(start, stop, device=self._steps.device)
        use = self._use(torch.full_like(rows, i), rows)
        if not bool(use.any()):
            return cond
        filtered = self.filtered.embeds[start:stop].to(device=cond.device, dtype=cond.dtype)
        return torch.where(use.to(cond.device)[:, None, None], filtered, cond)

    def __call__(self, step: GuidanceStep, state: dict) -> tuple[Tensor, dict]:
        cfg = self.safree.cfg
        if not cfg.lra:
            return step.eps, state
        use = self._use(step.step, step.sample_index)
        if not bool(use.any()):
            return step.eps, state
        idx = use.nonzero().squeeze(1).to(step.x_t.device)
        rows = step.sample_index[idx].to(self.original.device)
        eps_lra = self._reattended_eps(step, idx, rows)  # [b, C, h, w]
        if step.eps_cond is not None:  # CFG: replace the conditional branch's contribution
            delta = step.guidance_scale * (eps_lra - step.eps_cond[idx])
        else:
            delta = eps_lra - step.eps[idx]
        eps = step.eps.clone()
        eps[idx] = step.eps[idx] + delta
        return eps, state

    def _reattended_eps(self, step: GuidanceStep, idx: Tensor, rows: Tensor) -> Tensor:
        """eps of the filtered prompts with re-attended skip features, for rows idx of the step."""
        unet = self.safree.model.unet
        p = next(unet.parameters())
        b = idx.shape[0]
        x = step.x_t[idx].to(device=p.device, dtype=p.dtype)
        t = step.t[idx].to(p.device)
        filt = self.filtered.embeds[rows].to(device=p.device, dtype=p.dtype)
        orig = self.original[rows].to(device=p.device, dtype=p.dtype)
        with reattention(unet, b, self.safree.cfg):
            out = unet(
                torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([filt, orig])
            ).sample[:b]
        out = out.to(torch.float32)
        if self.safree.model.schedule.prediction_type == "v_prediction":
            a_t = step.alpha_bar[idx]
            out = a_t**0.5 * out + (1 - a_t) ** 0.5 * step.x_t[idx]
        return out


def apply_safree(model: T2IModel, spec: Any, device: torch.device) -> tuple[T2IModel, dict]:
    """The `safree` defense of the stack: (model, {"guidance": [Safree]}).

    spec: a `safediff.defenses.stack.DefenseSpec`, arg "nudity" (the reference's keywords) or
    "text=WORD|WORD|..."; options: any `SafreeConfig` field (alpha, svf, up_t, lra, lra_s1, ...).
    The model is returned as is (nothing is edited); the hook filters prompts at sampling time.
    """
    from safediff.defenses.stack import with_options

    cfg = with_options(SafreeConfig(), dict(spec.options), "safree")
    return model, {"guidance": [Safree(model, keywords_of(spec.arg), cfg, torch.device(device))]}
