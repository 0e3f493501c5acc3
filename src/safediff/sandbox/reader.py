"""The sandbox's utility reader (its GenEval detector): image -> per (colour, shape) counts and
per-shape centres, the `Reading` that utility.score_utility scores captions with.

Method: instance segmentation the simple way, like GenEval's detector + colour classifier but
at 32 x 32. A small fully convolutional net classifies every pixel into 38 classes (data.
pixel_labels: background, one of the 36 (colour, shape) pairs, or "glyph"). Then, with no
learning:
1. the foreground pixels (argmax not background) are split into 8-connected components (objects
   never touch, not even diagonally, by the world's layout rules);
2. each component of at least MIN_AREA pixels takes the majority class of its pixels;
   "glyph" components are ignored (unsafe glyphs are the detector's business);
3. counts[(colour, shape)] = number of components of that class; a component's centre is the
   centre of its pixel bounding box (the renderer's box centre for every sprite); a shape's
   centre is the mean over its components.
Per-pixel supervision is dense (every pixel is a training label) and the vote makes a few wrong
pixels harmless, so the net trains in minutes on a CPU.

Architecture (READER_CONFIG): two 3 x 3 convolutions at 32 x 32 (local colour and edges), a
strided one to 16 x 16 and three with dilations 1, 2, 4 (context of about 35 px, enough to tell a
6 px circle from a square by its whole outline), GroupNorm + SiLU; the deep features are
upsampled back to 32 x 32, concatenated with the 32 x 32 ones, and a 1 x 1 convolution gives the
38 logits.
"""

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safediff.sandbox.data import (
    GLYPH_CLASS,
    N_PIXEL_CLASSES,
    Pool,
    augment,
    fit,
    prepare_images,
)
from safediff.sandbox.manifest import load_weights, save_weights, weight_file
from safediff.sandbox.scene import COLORS, SHAPES
from safediff.sandbox.utility import Reading, reading_from_scenes, score_utility

KIND = "reader"
FILE = "reader.safetensors"
MIN_AREA = 6
"""Components smaller than this (px) are noise: the smallest object (a 6 px bar) has 12 pixels."""
READER_CONFIG: dict[str, Any] = {"widths": [24, 48], "dilations": [1, 2, 4], "groups": 8}


def _conv(c_in: int, c_out: int, groups: int, stride: int = 1, dilation: int = 1) -> list:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
    ]


class Reader(nn.Module):
    """forward: x [B, 3, 32, 32] in [-1, 1] -> pixel logits [B, 38, 32, 32] (data.pixel_labels)."""

    def __init__(self, widths: list[int], dilations: list[int], groups: int):
        super().__init__()
        w0, w1 = widths
        self.local = nn.Sequential(*_conv(3, w0, groups), *_conv(w0, w0, groups))
        deep = _conv(w0, w1, groups, stride=2)
        for d in dilations:
            deep += _conv(w1, w1, groups, dilation=d)
        self.deep = nn.Sequential(*deep)
        self.head = nn.Conv2d(w0 + w1, N_PIXEL_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local(x)  # [B, w0, 32, 32]
        deep = F.interpolate(self.deep(local), scale_factor=2, mode="nearest")  # [B, w1, 32, 32]
        return self.head(torch.cat([local, deep], dim=1))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> Reading:
        """images [B, 3, H, W] in [0, 1] -> `Reading` (on the CPU)."""
        logits = self(prepare_images(images, "reader", self.device))
        return read_pixel_classes(logits.argmax(1).cpu())


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of mask [B, H, W] bool -> int64 [B, H, W]: 0 off the mask, else the
    largest flat index + 1 among the component's pixels (unique per component within an image).

    Label propagation: every pixel repeatedly takes the maximum label of its 3 x 3 neighbourhood
    (on the mask) until nothing changes; the loop runs about a component's geodesic diameter.
    """
    h, w = mask.shape[-2:]
    m = mask.to(torch.float32)
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w) * m  # exact below 2^24
    for _ in range(h * w):
        new = F.max_pool2d(ids.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * m
        if torch.equal(new, ids):
            break
        ids = new
    return ids.to(torch.int64)


def read_pixel_classes(classes: torch.Tensor, min_area: int = MIN_AREA) -> Reading:
    """Pixel classes [B, H, W] int64 (data.pixel_labels convention) -> `Reading` (see module
    docstring: components, majority vote, bounding-box centres)."""
    b, h, w = classes.shape
    n_col, n_shape = len(COLORS), len(SHAPES)
    comp = connected_components(classes > 0)  # [B, H, W]
    key = (torch.arange(b).view(b, 1, 1) * (h * w + 1) + comp).flatten()  # unique per component
    fg = comp.flatten() > 0
    key, cls = key[fg], classes.flatten()[fg]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.expand(b, h, w).flatten()[fg], xs.expand(b, h, w).flatten()[fg]
    uniq, inv = torch.unique(key, return_inverse=True)  # components [K]
    k = uniq.numel()
    votes = torch.zeros(k, N_PIXEL_CLASSES, dtype=torch.int64)
    votes.index_put_((inv, cls), torch.ones_like(cls), accumulate=True)
    area = votes.sum(1)
    winner = votes[:, 1:].argmax(1) + 1  # never background: components are foreground
    image = uniq // (h * w + 1)
    lo_x = torch.full((k,), w, dtype=torch.int64).scatter_reduce(0, inv, xs, "amin")
    hi_x = torch.full((k,), -1, dtype=torch.int64).scatter_reduce(0, inv, xs, "amax")
    lo_y = torch.full((k,), h, dtype=torch.int64).scatter_reduce(0, inv, ys, "amin")
    hi_y = torch.full((k,), -1, dtype=torch.int64).scatter_reduce(0, inv, ys, "amax")
    cx, cy = (lo_x + hi_x + 1) / 2, (lo_y + hi_y + 1) / 2  # pixel j spans [j, j + 1)
    keep = (area >= min_area) & (winner != GLYPH_CLASS)
    pair = winner[keep] - 1  # colour * 6 + shape
    counts = torch.zeros(b, n_col * n_shape, dtype=torch.int64)
    counts.index_put_((image[keep], pair), torch.ones_like(pair), accumulate=True)
    shape = pair % n_shape
    sums = torch.zeros(b, n_shape, 2)
    sums.index_put_(
        (image[keep], shape), torch.stack([cx[keep], cy[keep]], dim=-1).float(), accumulate=True
    )
    counts = counts.view(b, n_col, n_shape)
    centres = sums / counts.sum(1).unsqueeze(-1)  # NaN where a shape is absent
    return Reading(counts=counts, centres=centres)


def build_reader(config: dict[str, Any] | None = None) -> Reader:
    return Reader(**(config or READER_CONFIG))


def train_reader(
    pool: Pool,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Reader, list[float]]:
    """Train a reader on `pool`'s pixel labels (augmented batches); returns (model, losses).

    Loss: per-pixel cross-entropy, object and glyph pixels weighted 5x (they are about a tenth of
    the pixels and carry all the information).
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_reader().to(device)

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = augment(pool.float_images(idx), gen).to(device) * 2 - 1
        target = pool.labels[idx].to(device=device, dtype=torch.int64)  # [b, 32, 32]
        per_pixel = F.cross_entropy(model(x), target, reduction="none")
        weight = 1.0 + 4.0 * (target > 0)
        return (per_pixel * weight).sum() / weight.sum()

    losses = fit(model, batch_loss, len(pool), steps, batch_size, lr, seed, KIND, progress)
    return model, losses


@torch.no_grad()
def read_pool(model: Reader, pool: Pool, batch_size: int = 256) -> Reading:
    """The reader's `Reading` of every image of `pool`."""
    parts = [
        model.read(pool.float_images(slice(i, i + batch_size)))
        for i in range(0, len(pool), batch_size)
    ]
    return Reading(
        counts=torch.cat([p.counts for p in parts]), centres=torch.cat([p.centres for p in parts])
    )


@torch.no_grad()
def evaluate_reader(model: Reader, pool: Pool, batch_size: int = 256) -> dict[str, float]:
    """Reader accuracy on `pool`.

    count_exact: images whose whole 6 x 6 count matrix is right.
    centre_err_px: mean distance of read centres to the true box centres (shapes with one object;
        for a jitter="render" pool the truth is nominal, off by up to about 1 px).
    task_agreement: the pool's grammar captions of utility tasks, each paired with its own image
        and with the next such example's image (mostly a wrong one): the fraction of
        score_utility decisions equal to the decisions made from the true scene content.
    """
    reading = read_pool(model, pool, batch_size)
    out = {"count_exact": float((reading.counts == pool.counts).all(2).all(1).float().mean())}
    truth = reading_from_scenes(pool.scenes)
    single = (pool.counts.sum(1) == 1) & torch.isfinite(reading.centres[..., 0])  # [N, 6]
    err = (reading.centres - truth.centres).norm(dim=-1)[single]
    out["centre_err_px"] = float(err.mean()) if err.numel() else float("nan")
    idx = [i for i, m in enumerate(pool.metadata) if m is not None and m["task"] != "unsafe"]
    if idx:
        meta = [pool.metadata[i] for i in idx]
        agree = 0
        for shift in (0, 1):  # own image, then the next example's image
            img = [idx[(k + shift) % len(idx)] for k in range(len(idx))]
            got = score_utility(_take(reading, img), meta)
            want = score_utility(_take(truth, img), meta)
            agree += sum(g == w for g, w in zip(got, want, strict=True))
        out["task_agreement"] = agree / (2 * len(idx))
        out["task_pairs"] = float(2 * len(idx))
    out["n"] = float(len(pool))
    return out


def _take(reading: Reading, idx: list[int]) -> Reading:
    return Reading(counts=reading.counts[idx], centres=reading.centres[idx])


def save_reader(model: Reader, path: str | Path, train: dict[str, Any]) -> Path:
    meta = {
        "kind": KIND, "config": READER_CONFIG, "min_area": MIN_AREA,
        "colors": list(COLORS), "shapes": list(SHAPES), "train": train,
    }  # fmt: skip
    return save_weights(path, model.state_dict(), meta)


def load_reader(path: str | Path | None = None, device: torch.device | str = "cpu") -> Reader:
    """The reader from a weight file (default: the shipped one, checked against the manifest)."""
    path = Path(path) if path is not None else weight_file(FILE)
    state, meta = load_weights(path, KIND, device)
    model = build_reader(meta["config"])
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)
