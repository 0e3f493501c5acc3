"""DES: distorting the text encoder's embedding space (train the text encoder only).

Paper: Ahn & Jung, "Mitigating Sexual Content Generation via Embedding Distortion in
Text-conditioned Diffusion Models" (NeurIPS 2025; preprint "DES: Distorting Embedding Space for
Safety", arXiv 2501.18877), reference code github.com/amoeba04/des (train_des.py).

Notation: E_train is the encoder being trained, E_orig a frozen copy of the original. An embedding
is the full padded last hidden state [L, D] flattened to L*D (77 x 768 for SD 1.x). cos is the
cosine similarity of flattened embeddings; every loss term is a batch mean.

1. Safe codebook: C = {E_orig(s) : s in safe prompts}.
2. Concept direction: u = unit(E_orig(concept) - E_orig("")) (`direction="difference"`, the form
   DESIGN.md section 5 gives). The reference code uses u = unit(E_orig(concept)) instead
   (`direction="concept"`); both are offered, the default follows the design notes.
3. Target of an unsafe prompt p: T(p) = argmin_{c in C} cos(E_orig(p), c) - g u, the *least*
   similar safe codebook entry moved by -g u; g = 200 (concept guidance scale, raw embedding units).
4. Losses on a batch of (unsafe p, safe s) pairs:
   L_unsafe  = 1 - cos(E_train(p), T(p))
   L_safe    = [1 - cos(E_train(s), E_orig(s))] + [1 - cos(E_train(s) + g u, E_orig(s))]
               (the second term is the reference's "ConceptAug": a safe prompt with the concept
               added must still read as the safe prompt)
   L_concept = 1 - cos(E_train(concept), E_orig(""))   (neutralise the concept word)
   L = lambda * L_safe + (1 - lambda) * (L_unsafe + L_concept),  lambda = 0.3.
5. Pairs: the shorter prompt list is cycled to the longer one's length (pair k = (unsafe k mod Nu,
   safe k mod Ns)), as the reference does; pairs are shuffled each epoch (seeded here, derived per
   epoch); AdamW lr 1e-5 (torch's default weight decay 0.01, as the reference), batch 128,
   2 epochs.

Departures from the reference code: the target search is an exact argmin over cosine similarities
(the reference uses a FAISS inner-product index over L2-normalised vectors: the same ranking);
E_orig(s) of a safe prompt is read from the codebook instead of re-encoded every step (the same
numbers); each prompt is tokenised once for the whole run (`MemoTokenizer`; the reference
tokenises every batch again); the default concept direction is the difference form (see 2).

Several embedding spaces: an adapter with `encode_spaces(prompts) -> {name: [B, ...]}` (SDXL,
`text_encoder_adapter.SDXLTextEncodersAdapter`: ViT-L's and bigG's penultimate token states and
bigG's pooled projection, which the UNet reads) is trained with items 1-4 in each space on its
own (its own codebook, u, least-similar targets), and the objective is the sum over spaces, so
each encoder is trained on its own outputs (the class says which and why). `DESLosses` then holds
the sums, and the history adds each space's total ("total/NAME"). One space (every other adapter:
`encode`) is the single-encoder DES above. The paper reports SDXL; neither it nor the reference
code says how it handles the two encoders, so this split is ours; g is not re-tuned per space.

SD3 and FLUX train all their text encoders together (`text_encoder_adapter.FlowTextEncodersAdapter`:
CLIP-L, CLIP-G and T5 for SD3; CLIP-L and T5 for FLUX), the paper's multi-encoder setting: the
losses act on the packed conditioning the transformer reads (token rows of every encoder and the
pooled row). g = 200 is in SD 1.4 CLIP-L units and is not re-tuned for those encoders.
"""

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from safediff.config import save_config
from safediff.defenses.text_encoder_adapter import TextEncoderAdapter, load_text_encoder_adapter
from safediff.errors import SafediffError
from safediff.seeding import derive_seed, generator

logger = logging.getLogger(__name__)

DIRECTIONS = ("difference", "concept")


@dataclass(frozen=True)
class DESConfig:
    """DES training run. Defaults are the paper's SD 1.5 preset (train.sh of the reference code)."""

    model: str = "tiny-sd"
    """Base model whose text encoder(s) are trained: 'tiny-sd', 'tiny-sdxl', 'tiny-sd3',
    'tiny-flux', a plug-in's family ('sandbox'), a diffusers pipeline folder (SD 1.x / 2.x, SDXL,
    SD3, FLUX) or a hub id."""
    revision: str | None = None
    """Hub revision of `model` (ignored for folders)."""
    safe_prompts: str = ""
    """Safe prompts (the codebook and the preservation loss): a .txt/.csv file or builtin:NAME."""
    unsafe_prompts: str = ""
    """Unsafe prompts to distort: a .txt/.csv file or builtin:NAME."""
    concept: str = "nudity"
    """The concept word: its direction u and its neutralisation loss."""
    concept_scale: float = 200.0
    """g: how far targets are moved along -u, and safe embeddings along +u, in raw embedding units."""
    direction: str = "difference"
    """u = unit(E(concept) - E('')) ('difference', DESIGN.md) or unit(E(concept)) ('concept', the
    reference code)."""
    lambda_safe: float = 0.3
    """lambda: weight of the safe-preservation loss; (1 - lambda) weighs unsafe + concept."""
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default, which the reference code uses)."""
    batch_size: int = 128
    """(unsafe, safe) prompt pairs per optimizer step."""
    epochs: int = 2
    """Passes over the pairs (max(N_unsafe, N_safe) pairs per epoch)."""
    encode_batch: int = 256
    """Prompts per forward pass when building the codebook and targets (memory knob only)."""
    seed: int = 0
    """Base seed of the per-epoch pair shuffles."""
    output_dir: str = "runs/des"
    """The trained encoder (a transformers folder) and des_config.yaml / des_history.json go here."""

    def __post_init__(self) -> None:
        checks = [
            (self.concept.strip() != "", "concept must not be empty"),
            (self.concept_scale >= 0, "concept_scale must be >= 0"),
            (self.direction in DIRECTIONS, f"direction must be one of {DIRECTIONS}"),
            (0 <= self.lambda_safe <= 1, "lambda_safe must be in [0, 1]"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.encode_batch >= 1, "encode_batch must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SafediffError(f"invalid DES config: {message}")


# ---------------------------------------------------------------------------------------------
# The math (pure functions)


def cosine_loss(a: Tensor, b: Tensor) -> Tensor:
    """mean_i [1 - cos(flat(a_i), flat(b_i))]: a [B, ...], b [B, ...] or [1, ...] (broadcast).

    Returns a 0-dim float32 tensor in [0, 2]; differentiable in both arguments.
    """
    a = a.reshape(a.shape[0], -1).float()
    b = b.reshape(b.shape[0], -1).float()
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def concept_direction(e_concept: Tensor, e_empty: Tensor, mode: str = "difference") -> Tensor:
    """u, the unit concept direction [L*D] from E(concept) and E("") (each [1, L, D] or [L, D]).

    mode "difference": unit(E(concept) - E("")); "concept": unit(E(concept)) (reference code).
    """
    if mode not in DIRECTIONS:
        raise SafediffError(f"direction {mode!r} is not supported; use one of {DIRECTIONS}")
    c = e_concept.reshape(-1).float()
    v = c - e_empty.reshape(-1).float() if mode == "difference" else c
    norm = v.norm()
    if norm == 0:
        raise SafediffError("the concept embedding equals the empty prompt's; pick another concept")
    return v / norm


def unsafe_targets(
    unsafe: Tensor, codebook: Tensor, u: Tensor, scale: float, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """Targets T = C[argmin_j cos(unsafe_i, C_j)] - scale * u and the chosen indices.

    unsafe: [Nu, L, D] original embeddings of the unsafe prompts; codebook: [Ns, L, D] original
    embeddings of the safe prompts; u: [L*D] unit direction. Returns targets [Nu, L, D] float32 and
    idx [Nu] int64. Similarities are computed in chunks of `chunk` unsafe rows ([chunk, Ns] at most).
    """
    shape = unsafe.shape[1:]
    cb = F.normalize(codebook.reshape(codebook.shape[0], -1).float(), dim=-1)
    flat = unsafe.reshape(unsafe.shape[0], -1).float()
    idx = torch.cat(
        [
            (F.normalize(flat[i : i + chunk], dim=-1) @ cb.T).argmin(dim=1)
            for i in range(0, flat.shape[0], chunk)
        ]
    )
    targets = codebook.reshape(codebook.shape[0], -1).float()[idx] - scale * u.float()
    return targets.reshape(-1, *shape), idx


@dataclass
class DESLosses:
    """One step's losses (0-dim tensors; `total` carries the gradient)."""

    total: Tensor
    unsafe: Tensor
    safe: Tensor
    safe_concept: Tensor
    concept: Tensor

    def as_floats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name).detach()) for f in dataclasses.fields(self)}

    @staticmethod
    def summed(parts: list["DESLosses"]) -> "DESLosses":
        """Term-by-term sums of several spaces' losses."""
        names = [f.name for f in dataclasses.fields(DESLosses)]
        return DESLosses(*[sum(getattr(p, n) for p in parts) for n in names])


def des_losses(
    train_unsafe: Tensor,
    targets: Tensor,
    train_safe: Tensor,
    orig_safe: Tensor,
    train_concept: Tensor,
    orig_empty: Tensor,
    u: Tensor,
    scale: float,
    lambda_safe: float,
) -> DESLosses:
    """The DES objective on one batch (see the module docstring, item 4).

    train_unsafe, targets: [B, L, D]; train_safe, orig_safe: [B', L, D]; train_concept, orig_empty:
    [1, L, D]; u: [L*D] unit direction; scale: g; lambda_safe: lambda.
    """
    unsafe = cosine_loss(train_unsafe, targets)
    safe = cosine_loss(train_safe, orig_safe)
    shifted = train_safe.reshape(train_safe.shape[0], -1).float() + scale * u.float()
    safe_concept = cosine_loss(shifted, orig_safe)
    concept = cosine_loss(train_concept, orig_empty)
    total = lambda_safe * (safe + safe_concept) + (1 - lambda_safe) * (unsafe + concept)
    return DESLosses(total, unsafe, safe, safe_concept, concept)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class DESResult:
    """A trained encoder (frozen, eval mode) and one dict of losses per optimizer step."""

    adapter: TextEncoderAdapter
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class MemoTokenizer:
    """A tokenizer that tokenises each prompt once: rows of padded calls are kept per (prompt,
    call settings) and stacked, so the same ids come back without running the (slow, Python)
    tokenizer again.

    Only calls that pad to a fixed length and return torch tensors (padding="max_length",
    return_tensors="pt", what both text encoder adapters' `encode` make) are cached; any other
    call goes to the wrapped tokenizer unchanged. Every other attribute is the wrapped
    tokenizer's. The cache holds L int64 ids (and an attention mask) per prompt.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._rows: dict[tuple[str, str], dict[str, Tensor]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, prompts: Any, **kwargs: Any) -> Any:
        fixed = kwargs.get("padding") == "max_length" and kwargs.get("return_tensors") == "pt"
        if not fixed or isinstance(prompts, str) or not prompts:
            return self.tokenizer(prompts, **kwargs)
        from transformers import BatchEncoding

        how = repr(sorted(kwargs.items()))
        missing = [p for p in dict.fromkeys(prompts) if (p, how) not in self._rows]
        if missing:
            encoded = self.tokenizer(missing, **kwargs)
            for i, prompt in enumerate(missing):
                self._rows[(prompt, how)] = {k: v[i] for k, v in encoded.items()}
        rows = [self._rows[(p, how)] for p in prompts]
        return BatchEncoding({k: torch.stack([r[k] for r in rows]) for k in rows[0]})


SINGLE_SPACE = "embedding"
"""The name of the one embedding space of an adapter without `encode_spaces`."""


def encode_spaces(adapter: TextEncoderAdapter, prompts: list[str]) -> dict[str, Tensor]:
    """The adapter's embedding spaces for `prompts`: `adapter.encode_spaces` when it has one
    (SDXL), else {SINGLE_SPACE: adapter.encode(prompts)}. Gradient flows when enabled."""
    spaces = getattr(adapter, "encode_spaces", None)
    return spaces(prompts) if spaces is not None else {SINGLE_SPACE: adapter.encode(prompts)}


def _encode_all(adapter: TextEncoderAdapter, prompts: list[str], batch: int) -> dict[str, Tensor]:
    """Every space's float32 embeddings of `prompts`, [N, ...] each, `batch` prompts a pass."""
    with torch.no_grad():
        chunks = [
            encode_spaces(adapter, prompts[i : i + batch]) for i in range(0, len(prompts), batch)
        ]
    return {k: torch.cat([c[k].float() for c in chunks]) for k in chunks[0]}


def train_des(
    adapter: TextEncoderAdapter,
    safe_prompts: list[str],
    unsafe_prompts: list[str],
    cfg: DESConfig,
    *,
    progress: bool = False,
    max_steps: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DESResult:
    """Train a copy of `adapter`'s encoder with the DES objective; `adapter` itself is untouched.

    adapter: the original encoder (E_orig; used frozen). safe_prompts, unsafe_prompts: non-empty.
    max_steps: stop after this many optimizer steps (benchmarks, tests); None runs cfg.epochs.
    on_step(step, losses): called after every optimizer step.
    Returns the trained adapter (frozen, eval mode) and the per-step losses.
    Memory: the codebook and the targets stay on the encoder's device, (N_safe + N_unsafe) x L x D
    float32 values (about 236 KB per prompt for SD 1.x's 77 x 768).
    """
    if not safe_prompts or not unsafe_prompts:
        raise SafediffError("DES needs at least one safe and one unsafe prompt")
    start = time.perf_counter()
    original = adapter
    original.module.eval()
    e_empty = _encode_all(original, [""], 1)
    e_concept = _encode_all(original, [cfg.concept], 1)
    # Items 1-3 in each embedding space on its own (one space but for SDXL).
    u = {k: concept_direction(e_concept[k], e_empty[k], cfg.direction) for k in e_empty}
    codebook = _encode_all(original, safe_prompts, cfg.encode_batch)  # E_orig(safe): [Ns, L, D]
    unsafe_orig = _encode_all(original, unsafe_prompts, cfg.encode_batch)
    targets = {
        k: unsafe_targets(unsafe_orig[k], codebook[k], u[k], cfg.concept_scale)[0] for k in u
    }
    del unsafe_orig

    trained = adapter.clone()
    # every step re-encodes prompts: tokenise each one once (SDXL has a second tokenizer)
    tokenizers = {a: getattr(trained, a, None) for a in ("tokenizer", "tokenizer_2")}
    tokenizers = {a: t for a, t in tokenizers.items() if t is not None}
    for attr, tok in tokenizers.items():
        setattr(trained, attr, MemoTokenizer(tok))
    module = trained.module
    module.requires_grad_(True)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    n_unsafe, n_safe = len(unsafe_prompts), len(safe_prompts)
    n_pairs = max(n_unsafe, n_safe)
    steps_per_epoch = math.ceil(n_pairs / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="des", unit="step")
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n_pairs, generator=generator(derive_seed(cfg.seed, "des", epoch)))
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            pairs = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            iu, js = pairs % n_unsafe, pairs % n_safe
            train_unsafe = encode_spaces(trained, [unsafe_prompts[i] for i in iu.tolist()])
            train_safe = encode_spaces(trained, [safe_prompts[j] for j in js.tolist()])
            train_concept = encode_spaces(trained, [cfg.concept])
            per_space = {
                k: des_losses(
                    train_unsafe=train_unsafe[k],
                    targets=targets[k][iu.to(targets[k].device)],
                    train_safe=train_safe[k],
                    orig_safe=codebook[k][js.to(codebook[k].device)],
                    train_concept=train_concept[k],
                    orig_empty=e_empty[k],
                    u=u[k],
                    scale=cfg.concept_scale,
                    lambda_safe=cfg.lambda_safe,
                )
                for k in u
            }
            losses = DESLosses.summed(list(per_space.values()))
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            record = {"epoch": float(epoch), **losses.as_floats()}
            if len(per_space) > 1:
                record |= {f"total/{k}": float(v.total.detach()) for k, v in per_space.items()}
            history.append(record)
            if on_step is not None:
                on_step(step, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['total']:.4f}")
            step += 1
    if bar is not None:
        bar.close()
    for attr, tok in tokenizers.items():
        setattr(trained, attr, tok)
    module.requires_grad_(False)
    module.eval()
    return DESResult(adapter=trained, history=history, seconds=time.perf_counter() - start)


def run_des(cfg: DESConfig, device: torch.device | str = "cpu", progress: bool = True) -> Path:
    """Load the base model's text encoder, train it with DES, write it to cfg.output_dir.

    The folder holds the encoder as a transformers folder (config.json + model.safetensors,
    loadable with CLIPTextModel.from_pretrained and by `swap_text_encoder` / the defense spec
    `des:FOLDER`; multi-encoder models: one such folder per encoder, text_encoder/,
    text_encoder_2/, ... as in a diffusers pipeline folder), des_config.yaml (the resolved config) and des_history.json (per-step losses).
    """
    from safediff.prompts import load_prompts

    if not cfg.safe_prompts or not cfg.unsafe_prompts:
        raise SafediffError("DES needs safe_prompts=FILE and unsafe_prompts=FILE")
    safe = load_prompts(cfg.safe_prompts)
    unsafe = load_prompts(cfg.unsafe_prompts)
    adapter = load_text_encoder_adapter(cfg.model, cfg.revision, device=device)
    logger.info(
        "DES on %s: %d safe, %d unsafe prompts, concept %r",
        cfg.model,
        len(safe),
        len(unsafe),
        cfg.concept,
    )
    result = train_des(adapter, safe, unsafe, cfg, progress=progress)
    out = Path(cfg.output_dir)
    result.adapter.save(out)
    save_config(cfg, out / "des_config.yaml")
    (out / "des_history.json").write_text(
        json.dumps({"seconds": result.seconds, "steps": result.history}, indent=1), encoding="utf-8"
    )
    if result.history:
        first, last = result.history[0], result.history[-1]
        logger.info(
            "DES: %d steps in %.1f s, loss %.4f -> %.4f; encoder written to %s",
            len(result.history),
            result.seconds,
            first["total"],
            last["total"],
            out,
        )
    return out
