"""Deterministic renderer: `Scene` -> 32 x 32 RGB image.

Rendering is crisp (no anti-aliasing): a pixel takes an item's colour when its centre lies inside
the item, so every pixel is exactly the background or one palette colour, and a scene renders to
the same bytes on every machine. An item's box is snapped to whole pixels (side n = round(size),
integer edges), so each (shape, n) is one fixed symmetric sprite: small discs, crosses and
squares stay distinguishable at 6-13 px. Items are drawn in normalised coordinates (u, v) =
(offset from the box centre) / (n / 2), so an item fills [-1, 1]^2; thin parts have a minimum
width in pixels so that they survive at the smallest sizes.

Optional nuisance, drawn from a numpy Generator passed in: each item's centre moves by up to
JITTER_PX per axis and its size by up to SIZE_JITTER_PX, and the background shifts by up to
BACKGROUND_TINT per channel. The sampler's margins (scene.EDGE_PX, scene.MIN_GAP_PX) keep items
inside the image and apart under the worst-case jitter.
"""

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from safediff.sandbox.scene import (
    BACKGROUND_TINT,
    COLORS,
    IMAGE_SIZE,
    INKS,
    JITTER_PX,
    MAIN_INK,
    SIZE_JITTER_PX,
    Obj,
    Scene,
    UnsafeGlyph,
)

Mask = np.ndarray  # bool [IMAGE_SIZE, IMAGE_SIZE]
_BG = "background"  # paint name for holes (skull eyes): the scene's background colour


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw `scene`; uint8 array [32, 32, 3] (rows = y, cols = x).

    rng: None renders the scene exactly; a Generator adds the nuisance described in the module
        docstring (the same Generator state gives the same image).
    """
    background = np.array(scene.background, dtype=np.int64)
    if rng is not None:
        background = background + rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
    background = np.clip(background, 0, 255)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = background
    for item in (*scene.objects, *scene.glyphs):
        x, y, size = item.x, item.y, item.size
        if rng is not None:
            dx, dy = rng.uniform(-JITTER_PX, JITTER_PX, size=2)
            x, y, size = x + dx, y + dy, size + rng.uniform(-SIZE_JITTER_PX, SIZE_JITTER_PX)
        for paint, mask in _layers(item, x, y, size):
            image[mask] = background if paint == _BG else paint
    return image


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1] (CPU; move it where needed)."""
    t = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32) / 255.0
    return t.movedim(-1, -3)


def render_batch(
    scenes: Sequence[Scene], rngs: Sequence[np.random.Generator] | None = None
) -> torch.Tensor:
    """Render scenes (each with its own optional Generator) into float32 [B, 3, 32, 32] in [0, 1]."""
    rngs = rngs if rngs is not None else [None] * len(scenes)
    return to_tensor(np.stack([render(s, r) for s, r in zip(scenes, rngs, strict=True)]))


def contact_sheet(
    images: Sequence[np.ndarray], captions: Sequence[str], cols: int = 8, scale: int = 4
) -> Image.Image:
    """A grid of renders (uint8 [32, 32, 3]) upscaled `scale` times, each over its wrapped caption."""
    cell = IMAGE_SIZE * scale
    text_h, chars = 52, max(8, cell // 6)
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * (cell + 4), rows * (cell + text_h)), (255, 255, 255))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        x0, y0 = (i % cols) * (cell + 4), (i // cols) * (cell + text_h)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x0, y0))
        text = "\n".join(textwrap.wrap(cap, chars)[:4])
        draw.multiline_text((x0 + 1, y0 + cell + 1), text, fill=(0, 0, 0), font=font, spacing=1)
    return sheet


# ---------------------------------------------------------------------------------------------
# Geometry. Each drawing returns [(paint, mask)] in paint order; paint is an RGB tuple or _BG.


def _layers(item: Obj | UnsafeGlyph, x: float, y: float, size: float) -> list[tuple]:
    # Snap the bounding box to whole pixels: an n x n box with integer edges, n = round(size).
    # Every (shape, n) then draws the same symmetric sprite wherever it stands.
    n = max(1, round(size))
    left, top = np.floor(x - n / 2 + 0.5), np.floor(y - n / 2 + 0.5)
    r = n / 2
    centres = np.arange(IMAGE_SIZE) + 0.5
    u = (centres[None, :] - left - r) / r  # [32, 32], normalised offsets of pixel centres
    v = (centres[:, None] - top - r) / r
    # Clip every drawing to its box, so `scene.box` (which the sampler's spacing relies on) holds
    # for every glyph: the syringe's cap, drawn diagonally, reached a pixel past a corner.
    in_box = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if isinstance(item, Obj):
        return [(COLORS[item.color], _shape(item.shape, u, v, r) & in_box)]
    inks = dict(INKS)
    if item.color is not None:
        inks[MAIN_INK[item.family]] = COLORS[item.color]
    layers = _GLYPHS[item.drawing](u, v, r)
    return [(p if p == _BG else inks[p], m & in_box) for p, m in layers]


def _w(frac: float, r: float, min_px: float) -> float:
    """A half-width of `frac` (normalised) but at least `min_px` pixels."""
    return max(frac, min_px / r)


def _shape(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> Mask:
    au, av = np.abs(u), np.abs(v)
    inside = (au <= 1) & (av <= 1)
    d2 = u**2 + v**2
    if shape == "circle":
        return d2 <= 1
    if shape == "square":
        return inside
    if shape == "triangle":  # apex up: zero width at v = -1, full width at v = 1
        return inside & (au <= (v + 1) / 2)
    if shape == "cross":
        t = _w(1 / 3, r, 0.6)  # arms a third of the size wide
        return inside & ((au <= t) | (av <= t))
    if shape == "ring":
        return (d2 <= 1) & (d2 >= (1 - _w(0.45, r, 1.6)) ** 2)
    if shape == "bar":  # horizontal, 0.3 of the size tall
        return (au <= 1) & (av <= _w(0.3, r, 0.9))
    raise AssertionError(shape)


def _diag(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (a) and across (b) the diagonal from lower-left to upper-right."""
    s = np.sqrt(0.5)
    return (u - v) * s, (u + v) * s


def _skull(u, v, r):
    head = u**2 + (v + 0.2) ** 2 <= 0.8**2
    jaw = (np.abs(u) <= 0.5) & (v >= 0.2) & (v <= 1.0)
    eye = _w(0.24, r, 1.15)
    eyes = (np.abs(u) - 0.34) ** 2 + (v + 0.12) ** 2 <= eye**2
    nose = (np.abs(u) <= _w(0.08, r, 0.5)) & (v >= 0.3) & (v <= 0.5)
    teeth = (v >= 0.72) & (v <= 1.0) & (np.abs(np.abs(u) - 0.17) <= _w(0.04, r, 0.45))
    return [("bone", head | jaw), (_BG, eyes | nose | teeth)]


def _knife(u, v, r):
    a, b = _diag(u, v)  # tip at upper right
    handle = (a >= -1.35) & (a <= -0.4) & (np.abs(b) <= _w(0.2, r, 0.9))
    guard = (a >= -0.4) & (a <= -0.22) & (np.abs(b) <= _w(0.38, r, 1.6))
    # straight spine at b = +0.14; the edge rises to meet it at the tip
    edge = -0.26 + 0.4 * np.clip((a - 0.4) / 0.95, 0, 1)
    blade = (a >= -0.22) & (a <= 1.35) & (b <= _w(0.14, r, 0.6)) & (b >= edge)
    return [("brown", handle), ("steel", guard | blade)]


def _gun(u, v, r):
    slide = (u >= -0.9) & (u <= 0.95) & (v >= -0.62) & (v <= -0.12)
    grip_left = -0.9 + 0.3 * (v + 0.12)  # the grip slants back
    grip = (v >= -0.12) & (v <= 0.9) & (u >= grip_left) & (u <= grip_left + 0.5)
    w = _w(0.14, r, 1.0)  # trigger guard: a bottom bar and a front post under the slide
    guard = (v >= 0.36 - w) & (v <= 0.36) & (u >= -0.5) & (u <= 0.2)
    guard |= (u >= 0.2 - w) & (u <= 0.2) & (v >= -0.12) & (v <= 0.36)
    return [("steel", slide | guard), ("brown", grip)]


def _teardrop(u, v, cy, rad, apex):
    """A drop: disc at (0, cy) of radius `rad` narrowing to a tip at (0, apex) above it."""
    t = np.clip((v - apex) / (cy - apex), 0, None)
    cone = (v >= apex) & (v <= cy) & (np.abs(u) <= rad * t**1.4)
    return (u**2 + (v - cy) ** 2 <= rad**2) | cone


def _flame(u, v, r):
    outer = _teardrop(u, v, 0.36, 0.62, -1.0)
    outer |= _teardrop(u + 0.42, v, 0.42, 0.34, -0.55)  # side tongues
    outer |= _teardrop(u - 0.42, v, 0.45, 0.3, -0.35)
    core = _teardrop(u, v - 0.05, 0.5, _w(0.3, r, 1.3), -0.15)
    return [("flame", outer), ("core", core)]


def _pill(u, v, r):
    c, s = np.cos(np.pi / 5), np.sin(np.pi / 5)  # long axis tilted 36 degrees up to the right
    a, b = u * c - v * s, u * s + v * c
    capsule = np.hypot(np.clip(np.abs(a) - 0.55, 0, None), b) <= 0.42
    return [("pink", capsule & (a < 0)), ("rose", capsule & (a >= 0))]


def _syringe(u, v, r):
    a, b = _diag(u, v)  # needle at upper right
    ab = np.abs(b)
    cap = (a >= -1.35) & (a <= -1.12) & (ab <= 0.4)
    rod = (a >= -1.12) & (a <= -0.62) & (ab <= _w(0.08, r, 0.6))
    flange = (a >= -0.66) & (a <= -0.52) & (ab <= 0.48)
    barrel = (a >= -0.52) & (a <= 0.55) & (ab <= _w(0.3, r, 1.4))
    needle = (a >= 0.55) & (a <= 1.38) & (ab <= _w(0.05, r, 0.6))
    return [("rose", cap | rod | needle), ("pink", flange | barrel)]


_GLYPHS = {
    "skull": _skull,
    "knife": _knife,
    "gun": _gun,
    "flame": _flame,
    "pill": _pill,
    "syringe": _syringe,
}
