"""The sandbox's CLIP: a small CNN image encoder trained into the frozen MiniLM sentence space.

The text side is all-MiniLM-L6-v2's pooled, L2-normalised sentence embedding (text_encoder.py),
frozen; the image side is a CNN mapping a 32 x 32 render to the same 384-d space. Together they
implement the `ImageTextEncoder` interface of rewards/encoders/base.py, so the steering reward
scores sandbox images exactly as it scores real ones with HPSv2 or OpenCLIP.

Training (`train_clip`): grammar renders and their captions. Loss per batch:
- symmetric InfoNCE (CLIP's loss) with a learnable temperature; captions that describe the same
  content (`meaning_key`: the same family or task, objects and relation; synonyms, "a photo of"
  prefixes and negation suffixes do not change what is drawn) count as positives of each other,
  so a batch holding "a skull" twice or "fire" and "flames" does not push true pairs apart;
- plus (1 - cos(image, caption)): pulls images onto their captions' embeddings, closing the
  "modality gap" so absolute cosines (what the steering reward reads) are meaningful.

Architecture (CLIP_CONFIG): 3 x 3 convolutions (GroupNorm, SiLU) at 32, 16, 8 and 4 px, then the
4 x 4 map is flattened (keeping where things are, for position captions) into a linear layer.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safediff.rewards.encoders.base import l2_normalize
from safediff.sandbox.data import Pool, augment, fit, prepare_images
from safediff.sandbox.manifest import load_weights, save_weights, weight_file
from safediff.sandbox.text_encoder import HIDDEN_SIZE, SandboxTextEncoder, load_text_encoder
from safediff.seeding import derive_seed

KIND = "clip"
FILE = "clip.safetensors"
CLIP_CONFIG: dict[str, Any] = {"widths": [24, 48, 96, 96], "groups": 8, "embed_dim": HIDDEN_SIZE}


def _conv(c_in: int, c_out: int, groups: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
    ]


class ImageTower(nn.Module):
    """forward: x [B, 3, 32, 32] in [-1, 1] -> unnormalised embeddings [B, embed_dim]."""

    def __init__(self, widths: list[int], groups: int, embed_dim: int):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_conv(3, w0, groups), *_conv(w0, w0, groups),  # 32 x 32
            *_conv(w0, w1, groups, 2), *_conv(w1, w1, groups),  # 16 x 16
            *_conv(w1, w2, groups, 2), *_conv(w2, w2, groups),  # 8 x 8
            *_conv(w2, w3, groups, 2),  # 4 x 4
        )  # fmt: skip
        self.proj = nn.Linear(w3 * 16, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x).flatten(1))


class SandboxClip:
    """The sandbox's image/text encoder behind the `ImageTextEncoder` interface.

    encode_images: images [B, 3, H, W] in [0, 1] (resized to 32 x 32 if needed) -> [B, 384]
    unit rows; encode_text: pooled MiniLM [B, 384] unit rows. float32 only.
    """

    def __init__(self, tower: ImageTower, text_encoder: SandboxTextEncoder, name: str = "sandbox"):
        self.tower = tower.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.embed_dim = int(tower.proj.out_features)
        self.dtype = torch.float32
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    def to(self, device: torch.device | str) -> "SandboxClip":
        self.tower.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = prepare_images(images, "sandbox clip", self.device)
        return l2_normalize(self.tower(x))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder.pooled(list(texts), device=self.device)


def meaning_key(meta: dict[str, Any]) -> str:
    """What a caption asks to be drawn, ignoring wording: unsafe family or utility task, the
    named objects and the relation. Captions with equal keys describe the same renders."""
    what = meta["family"] if meta["task"] == "unsafe" else meta["task"]
    return json.dumps([what, meta["objects"], meta["relation"]], sort_keys=True)


def positives(keys: Sequence[str]) -> torch.Tensor:
    """[B, B] float32 soft targets: row i spreads 1 evenly over the items with i's key."""
    codes = {k: j for j, k in enumerate(dict.fromkeys(keys))}
    c = torch.tensor([codes[k] for k in keys])
    same = (c[:, None] == c[None, :]).float()
    return same / same.sum(1, keepdim=True)


def clip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, targets: torch.Tensor,
    cos_weight: float,
) -> torch.Tensor:  # fmt: skip
    """img [B, D] (unnormalised), txt [B, D] (unit rows), targets [B, B] soft positives ->
    symmetric InfoNCE + cos_weight * mean(1 - cos(img, txt))."""
    img = F.normalize(img, dim=-1)
    logits = logit_scale.clamp(max=4.6052).exp() * img @ txt.T  # scale at most 100, as CLIP
    nce = F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)
    return nce / 2 + cos_weight * (1 - (img * txt).sum(-1)).mean()


def caption_embeddings(
    text_encoder: SandboxTextEncoder, captions: Sequence[str], chunk: int = 256
) -> dict[str, torch.Tensor]:
    """Pooled MiniLM embedding [384] (CPU) of each distinct caption."""
    uniq = list(dict.fromkeys(captions))
    out: dict[str, torch.Tensor] = {}
    for i in range(0, len(uniq), chunk):
        part = uniq[i : i + chunk]
        for c, e in zip(part, text_encoder.pooled(part, device="cpu"), strict=True):
            out[c] = e
    return out


def train_clip(
    pool: Pool,
    text_encoder: SandboxTextEncoder,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    cos_weight: float = 1.0,
    progress: bool = False,
) -> tuple[ImageTower, list[float]]:
    """Train the image tower on `pool`'s grammar scenes; returns (tower in eval mode, losses)."""
    device = torch.device(device)
    rows = [i for i, c in enumerate(pool.captions) if c is not None]
    caps = [pool.captions[i] for i in rows]
    keys = [meaning_key(pool.metadata[i]) for i in rows]
    emb = caption_embeddings(text_encoder, caps)
    txt_all = torch.stack([emb[c] for c in caps])  # [M, 384]
    rows_t = torch.tensor(rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = ImageTower(**CLIP_CONFIG).to(device)

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = augment(pool.float_images(rows_t[idx]), gen).to(device) * 2 - 1
        targets = positives([keys[i] for i in idx.tolist()]).to(device)
        return clip_loss(tower(x), txt_all[idx].to(device), tower.logit_scale, targets, cos_weight)

    losses = fit(tower, batch_loss, len(rows), steps, batch_size, lr, seed, KIND, progress)
    return tower, losses


@torch.no_grad()
def evaluate_clip(
    clip: SandboxClip, pool: Pool, n_way: int = 10, seed: int = 0
) -> dict[str, float]:
    """Retrieval on `pool`'s grammar scenes.

    top1_{n_way}way: for each render, its caption against n_way - 1 captions of other examples
        whose meaning_key differs (drawn with `seed`): fraction where its own caption scores
        highest (chance 1 / n_way).
    top1_all: each render against every distinct meaning in the pool (a meaning scores as its
        best-matching caption): fraction where its own meaning ranks first. Strict: captions of
        other meanings can also be true of a render ("a circle" of a red circle).
    mean_cos: mean cosine of a render with its own caption.
    """
    rows = [i for i, c in enumerate(pool.captions) if c is not None]
    caps = [pool.captions[i] for i in rows]
    keys = [meaning_key(pool.metadata[i]) for i in rows]
    img = torch.cat(
        [clip.encode_images(pool.float_images(torch.tensor(rows[i : i + 256])))
         for i in range(0, len(rows), 256)]
    ).cpu()  # fmt: skip
    txt = clip.encode_text(caps).cpu()
    sim = img @ txt.T  # [M, M]
    m = len(rows)
    gen = torch.Generator().manual_seed(derive_seed(seed, "clip-eval"))
    wins = 0
    key_arr = keys
    for i in range(m):
        others = [j for j in torch.randperm(m, generator=gen).tolist() if key_arr[j] != key_arr[i]]
        wins += int(sim[i, i] > sim[i, others[: n_way - 1]].max())
    uniq = list(dict.fromkeys(keys))
    code = torch.tensor([uniq.index(k) for k in keys])
    per_key = torch.full((m, len(uniq)), -2.0).scatter_reduce(
        1, code.expand(m, m), sim, "amax", include_self=True
    )
    top_all = float((per_key.argmax(1) == code).float().mean())
    return {
        f"top1_{n_way}way": wins / m,
        "top1_all": top_all,
        "mean_cos": float(sim.diagonal().mean()),
        "n": float(m),
    }


def save_clip(tower: ImageTower, path: str | Path, train: dict[str, Any]) -> Path:
    meta = {"kind": KIND, "config": CLIP_CONFIG, "text": "all-MiniLM-L6-v2 pooled", "train": train}
    return save_weights(path, tower.state_dict(), meta)


def load_sandbox_clip(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    text_encoder: SandboxTextEncoder | None = None,
) -> SandboxClip:
    """The sandbox CLIP from a weight file (default: the shipped one, hash-checked)."""
    path = Path(path) if path is not None else weight_file(FILE)
    state, meta = load_weights(path, KIND, device)
    tower = ImageTower(**meta["config"])
    tower.load_state_dict(state)
    text_encoder = (text_encoder or load_text_encoder(device)).to(device)
    return SandboxClip(tower.to(device), text_encoder, name=f"sandbox-clip ({path.name})")


def sandbox_encoder_loader(
    arg: str, device: torch.device, dtype: torch.dtype, precision: str | None
) -> SandboxClip:
    """Loader for `rewards.encoders.register_encoder_kind("sandbox", ...)`: spec "sandbox:default"
    (the shipped weights) or "sandbox:/path/clip.safetensors". float32 only."""
    from safediff.errors import SafediffError

    if dtype != torch.float32 or precision is not None:
        raise SafediffError("the sandbox encoder runs in float32; drop dtype/precision")
    return load_sandbox_clip(None if arg == "default" else arg, device=device)
