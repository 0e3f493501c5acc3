"""Training and evaluation data for the sandbox's classifiers (detector, reader, CLIP).

A `Pool` is a set of rendered scenes with everything the three models learn from: the caption and
its metadata (grammar scenes), the unsafe families present, per (colour, shape) counts and each
object's true box centre. Two sources:

- grammar scenes: `make_split(split, ...)` examples, the distribution the models are used on;
- random scenes (`random_scene`): 0-4 benign objects and 0-2 glyphs of distinct families, glyphs
  sometimes recoloured in a benign colour (UnsafeGlyph.color), so the detector learns shapes, not
  only inks, and sees several families at once, and the reader learns to ignore glyphs.

Jitter: jitter="scene" moves/resizes the items and tints the background in the Scene itself
(`jitter_scene`, the renderer's nuisance distribution), then renders exactly, so the true box
centres are known; jitter="render" uses the renderer's own nuisance (render(scene, rng)), whose
centres are only known to +-JITTER_PX (used for held-out checks); jitter=None renders exactly.

`augment` adds the image-level nuisance that generated images have and renders do not (noise,
blur, colour gain), applied to training batches only.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from safediff.errors import SafediffError
from safediff.sandbox.captions import blank_example, make_split
from safediff.sandbox.render import render
from safediff.sandbox.scene import (
    BACKGROUND,
    BACKGROUND_TINT,
    COLORS,
    EDGE_PX,
    FAMILIES,
    FAMILY_VARIANTS,
    GLYPH_SIZE_RANGE,
    IMAGE_SIZE,
    JITTER_PX,
    MIN_GAP_PX,
    OBJECT_SIZE_RANGE,
    SHAPES,
    SIZE_JITTER_PX,
    Obj,
    Scene,
    UnsafeGlyph,
)
from safediff.sandbox.utility import COLOR_NAMES, box_centre
from safediff.seeding import derive_seed

MAX_OBJECTS = 4
"""No scene (grammar or random) has more benign objects than this."""
JITTER_MODES = (None, "scene", "render")


@dataclass
class Pool:
    """N rendered scenes and their targets.

    images: [N, 3, 32, 32] uint8.
    captions / metadata: per scene, the grammar caption and its metadata (None for random scenes).
    families: [N, 4] float32 multi-hot over FAMILIES.
    counts: [N, 6, 6] int64, objects per (colour in COLOR_NAMES, shape in SHAPES).
    objects: [N, MAX_OBJECTS, 4] float32 rows (colour index, shape index, x, y) of each object's
        true box centre in px; rows of -1 pad. With jitter="render" the centres are nominal.
    labels: [N, 32, 32] uint8 pixel classes (`pixel_labels`); with jitter="render" they follow
        the nominal boxes, so only jitter=None / "scene" pools are fit for training on them.
    scenes: the Scene of each image (before jitter).
    """

    images: torch.Tensor
    captions: list[str | None]
    metadata: list[dict[str, Any] | None]
    families: torch.Tensor
    counts: torch.Tensor
    objects: torch.Tensor
    labels: torch.Tensor
    scenes: list[Scene]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def float_images(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Images [n, 3, 32, 32] float32 in [0, 1]."""
        return self.images[idx].to(torch.float32) / 255.0


def jitter_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """`scene` with the renderer's nuisance applied to the scene itself: each item moved by up to
    JITTER_PX per axis and resized by up to SIZE_JITTER_PX (kept in its allowed size range), and
    the background tinted by up to BACKGROUND_TINT per channel."""
    tint = rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
    background = tuple(
        int(np.clip(c + t, 0, 255)) for c, t in zip(scene.background, tint, strict=True)
    )

    def move(item, bounds):
        dx, dy = rng.uniform(-JITTER_PX, JITTER_PX, size=2)
        size = float(np.clip(item.size + rng.uniform(-SIZE_JITTER_PX, SIZE_JITTER_PX), *bounds))
        return dataclasses.replace(item, x=item.x + dx, y=item.y + dy, size=size)

    return Scene(
        objects=tuple(move(o, OBJECT_SIZE_RANGE) for o in scene.objects),
        glyphs=tuple(move(g, GLYPH_SIZE_RANGE) for g in scene.glyphs),
        background=background,
    )


def _place(rng: np.random.Generator, sizes: list[float]) -> list[tuple[float, float]] | None:
    """Centres for square items of `sizes` (px), inside the image by EDGE_PX and pairwise at least
    MIN_GAP_PX apart (Chebyshev gap of the boxes): each item at the first valid one of 64 uniform
    candidates, starting over (up to 100 times) when none is; None when that fails."""
    for _ in range(100):
        centres: list[np.ndarray] = []
        for s in sizes:
            lo = EDGE_PX + s / 2
            cand = rng.uniform(lo, IMAGE_SIZE - lo, size=(64, 2))
            ok = np.ones(len(cand), dtype=bool)
            for c, t in zip(centres, sizes, strict=False):
                ok &= np.abs(cand - c).max(axis=1) - (s + t) / 2 >= MIN_GAP_PX
            if not ok.any():
                break
            centres.append(cand[int(ok.argmax())])
        if len(centres) == len(sizes):
            return [(float(x), float(y)) for x, y in centres]
    return None


def random_scene(rng: np.random.Generator, recolor_p: float = 0.2) -> Scene:
    """0-2 glyphs of distinct families (each recoloured in a benign colour with prob. recolor_p)
    and benign objects, at most 4 items; in a third of the scenes all objects share shape and
    colour (counting-like)."""
    n_glyphs = int(rng.choice(3, p=[0.35, 0.45, 0.2]))
    n_objects = int(rng.integers(0, MAX_OBJECTS + 1 - n_glyphs))
    crowded = n_glyphs + n_objects >= 3
    families = [FAMILIES[i] for i in rng.choice(len(FAMILIES), size=n_glyphs, replace=False)]
    same = rng.random() < 0.33
    shape0, color0 = SHAPES[int(rng.integers(len(SHAPES)))], COLOR_NAMES[int(rng.integers(6))]
    obj_specs = []
    for _ in range(n_objects):
        shape = shape0 if same else SHAPES[int(rng.integers(len(SHAPES)))]
        color = color0 if same else COLOR_NAMES[int(rng.integers(6))]
        obj_specs.append((shape, color, float(rng.uniform(7.0, 9.0 if crowded else 12.0))))
    glyph_sizes = [float(rng.uniform(10.0, 11.5 if crowded else 13.0)) for _ in families]
    sizes = glyph_sizes + [s for _, _, s in obj_specs]
    centres = _place(rng, sizes)
    while centres is None:  # drop the last item until it fits
        sizes.pop()
        centres = _place(rng, sizes)
    glyphs = []
    for fam, s, (x, y) in zip(families, glyph_sizes, centres, strict=False):
        variants = FAMILY_VARIANTS[fam]
        color = COLOR_NAMES[int(rng.integers(6))] if rng.random() < recolor_p else None
        glyphs.append(
            UnsafeGlyph(
                fam, x, y, s, variant=variants[int(rng.integers(len(variants)))], color=color
            )
        )
    objects = [
        Obj(sh, c, x, y, s)
        for (sh, c, s), (x, y) in zip(obj_specs, centres[len(glyphs) :], strict=False)
    ]
    return Scene(objects=tuple(objects), glyphs=tuple(glyphs), background=BACKGROUND)


N_PIXEL_CLASSES = 2 + len(COLORS) * len(SHAPES)
GLYPH_CLASS = N_PIXEL_CLASSES - 1
"""Pixel classes: 0 background, 1 + colour * 6 + shape for a benign object's pixels (colour in
COLOR_NAMES, shape in SHAPES order), GLYPH_CLASS (37) for an unsafe glyph's pixels."""


def _box(item: Obj) -> tuple[int, int, int]:
    """(left, top, n) of the pixel box the renderer paints `item` in: columns left .. left + n - 1,
    rows top .. top + n - 1 (render._layers snaps to n = round(size) with integer edges)."""
    n = max(1, round(item.size))
    return int(np.floor(item.x - n / 2 + 0.5)), int(np.floor(item.y - n / 2 + 0.5)), n


def pixel_labels(scene: Scene, image: np.ndarray) -> np.ndarray:
    """Pixel classes [32, 32] uint8 of `image` (uint8 [32, 32, 3]), rendered from `scene` without
    further jitter. A pixel that differs from the background colour (read at pixel (0, 0),
    always background) is an object's when it lies in that object's pixel box (an object paints
    only inside its box), else a glyph's (glyphs may paint a pixel past their box corners: the
    syringe's cap does)."""
    fg = (image != image[0, 0]).any(-1)
    labels = np.where(fg, GLYPH_CLASS, 0).astype(np.uint8)
    for obj in scene.objects:
        left, top, n = _box(obj)
        cls = 1 + COLOR_NAMES.index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)
        ys, xs = slice(max(top, 0), top + n), slice(max(left, 0), left + n)
        labels[ys, xs] = np.where(fg[ys, xs], cls, labels[ys, xs])
    return labels


def _targets(scene: Scene) -> tuple[list[float], np.ndarray, np.ndarray]:
    families = [float(f in scene.families) for f in FAMILIES]
    counts = np.zeros((len(COLORS), len(SHAPES)), dtype=np.int64)
    objects = -np.ones((MAX_OBJECTS, 4), dtype=np.float32)
    for k, o in enumerate(scene.objects):
        c, s = COLOR_NAMES.index(o.color), SHAPES.index(o.shape)
        counts[c, s] += 1
        objects[k] = (c, s, *box_centre(o))
    return families, counts, objects


def make_pool(
    seed: int,
    n_grammar: int,
    n_random: int,
    split: str = "model_train",
    jitter: str | None = "scene",
    n_blank: int = 0,
) -> Pool:
    """Render `n_grammar` examples of `split`, `n_blank` empty scenes captioned as empty
    (`blank_example`) and `n_random` random scenes, in that order.

    A pure function of its arguments (seeds derived per source and index).
    """
    if jitter not in JITTER_MODES:
        raise SafediffError(f"jitter must be one of {JITTER_MODES}, got {jitter!r}")
    if min(n_grammar, n_random, n_blank) < 0 or n_grammar + n_random + n_blank == 0:
        raise SafediffError(
            f"a pool needs a non-negative number of each kind of scene and at least one scene, "
            f"got n_grammar={n_grammar}, n_blank={n_blank}, n_random={n_random}"
        )
    examples = make_split(split, n_grammar, seed=derive_seed(seed, "pool-grammar"))
    examples += [
        blank_example(np.random.default_rng(derive_seed(seed, "pool-blank", i)))
        for i in range(n_blank)
    ]
    scenes = [e.scene for e in examples]
    scenes += [
        random_scene(np.random.default_rng(derive_seed(seed, "pool-random", i)))
        for i in range(n_random)
    ]
    images, fams, counts, objs, labels = [], [], [], [], []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng(derive_seed(seed, "pool-jitter", i))
        if jitter == "scene":
            drawn = jitter_scene(scene, rng)
            images.append(render(drawn))
        else:
            drawn = scene
            images.append(render(scene, rng if jitter == "render" else None))
        labels.append(pixel_labels(drawn, images[-1]))
        f, c, o = _targets(drawn)
        fams.append(f)
        counts.append(c)
        objs.append(o)
    return Pool(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        captions=[e.caption for e in examples] + [None] * n_random,
        metadata=[e.metadata for e in examples] + [None] * n_random,
        families=torch.tensor(fams, dtype=torch.float32),
        counts=torch.from_numpy(np.stack(counts)),
        objects=torch.from_numpy(np.stack(objs)),
        labels=torch.from_numpy(np.stack(labels)),
        scenes=scenes,
    )


def concat_pools(*pools: Pool) -> Pool:
    """One Pool holding the scenes of `pools` in order."""
    return Pool(
        images=torch.cat([p.images for p in pools]),
        captions=[c for p in pools for c in p.captions],
        metadata=[m for p in pools for m in p.metadata],
        families=torch.cat([p.families for p in pools]),
        counts=torch.cat([p.counts for p in pools]),
        objects=torch.cat([p.objects for p in pools]),
        labels=torch.cat([p.labels for p in pools]),
        scenes=[s for p in pools for s in p.scenes],
    )


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    gain: float = 0.1,
    offset: float = 0.03,
    noise: float = 0.04,
) -> torch.Tensor:
    """Image-level nuisance for training batches: x [B, 3, H, W] in [0, 1] -> same shape.

    Per image: a channel gain in [1 - gain, 1 + gain] and offset in [-offset, offset]; with prob.
    0.3 a light 3 x 3 blur (weight of the centre pixel in [0.4, 1]); Gaussian noise with std in
    [0, noise]. Geometry is untouched (targets stay valid). Randomness from `gen` (CPU).
    """
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    x = x * ((1 - gain) + 2 * gain * u(b, 3, 1, 1)) + (u(b, 3, 1, 1) - 0.5) * (2 * offset)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = 0.4 + 0.6 * u(b, 1, 1, 1)
    w = torch.where(u(b, 1, 1, 1) < 0.3, w, torch.ones_like(w))
    x = w * x + (1 - w) * blurred
    x = x + torch.randn(x.shape, generator=gen) * (noise * u(b, 1, 1, 1))
    return x.clamp(0, 1)


def batch_indices(n: int, batch_size: int, step: int, seed: int, what: str) -> torch.Tensor:
    """Indices of training batch `step`: a per-step random sample without replacement (int64)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, what, "batch", step))
    return torch.randperm(n, generator=gen)[: min(batch_size, n)]


def fit(
    model: torch.nn.Module,
    batch_loss,
    n: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    name: str,
    progress: bool = False,
    weight_decay: float = 1e-4,
) -> list[float]:
    """The training loop the sandbox classifiers share: AdamW, 5% linear warm-up then cosine decay
    to 0, grad-norm clipping at 1.0. `batch_loss(idx [b] int64, gen) -> scalar loss` builds and
    scores batch `idx` of the training data (n items); batches are drawn per step from `seed`.
    Returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=name, unit="step")
    model.train()
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(derive_seed(seed, name, "aug", step))
        loss = batch_loss(batch_indices(n, batch_size, step, seed, name), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def prepare_images(images: torch.Tensor, who: str, device: torch.device) -> torch.Tensor:
    """images [B, 3, H, W] float in [0, 1] (any size) -> [B, 3, 32, 32] in [-1, 1] on `device`.

    Other sizes are resized to 32 x 32 (bilinear, antialiased), e.g. a real model's 512 px images.
    """
    from safediff.rewards.encoders.base import check_images

    check_images(images, who)
    x = images.to(device=device, dtype=torch.float32)
    if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return x.clamp(0, 1) * 2 - 1
