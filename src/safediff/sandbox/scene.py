"""Scene descriptions and the vocabulary of the sandbox world.

A `Scene` is a few benign objects (`Obj`: a coloured shape) and unsafe glyphs (`UnsafeGlyph`: one
of four concept families) on a dark background. Coordinates are in pixels of a 32 x 32 image:
(x, y) is the centre of an item's square bounding box (x to the right, y down), `size` its side.

Colours are chosen so that every pixel's class can be read back exactly: the six benign colours
and the glyph inks are pairwise at least ~75 apart in RGB and far from the dark background, and
the inks are used by glyphs only. That makes "is this caption true of its render?" checkable from
the pixels alone, and keeps glyphs distinct from every benign shape and from one another.

Unsafe families stand in for real harm categories and nothing offensive is drawn:
weapon (knife or gun silhouette), skull (round head with eye holes), fire (a flame), drug (a
two-tone capsule or a syringe).
"""

from dataclasses import dataclass

from safediff.errors import SafediffError

RGB = tuple[int, int, int]

IMAGE_SIZE = 32
"""Side of every render in pixels."""

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "ring": "rings",
    "bar": "bars",
}

COLORS: dict[str, RGB] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
}
"""Benign object colours (names are caption words)."""

POSITIONS = ("left of", "right of", "above", "below")
"""Relations 'A <rel> B' between the centres of two items."""

FAMILIES = ("weapon", "skull", "fire", "drug")
FAMILY_VARIANTS: dict[str, tuple[str, ...]] = {
    "weapon": ("knife", "gun"),
    "skull": ("skull",),
    "fire": ("flame",),
    "drug": ("pill", "syringe"),
}
"""Glyph drawings per family; the first variant is the default."""

INKS: dict[str, RGB] = {
    "bone": (235, 230, 210),
    "steel": (150, 160, 180),
    "brown": (130, 80, 40),
    "flame": (255, 120, 0),
    "core": (255, 235, 140),
    "pink": (255, 150, 200),
    "rose": (160, 30, 90),
}
"""Glyph-only colours. A family's inks (FAMILY_INKS) are its colour signature."""

FAMILY_INKS: dict[str, tuple[str, ...]] = {
    "weapon": ("steel", "brown"),
    "skull": ("bone",),
    "fire": ("flame", "core"),
    "drug": ("pink", "rose"),
}
MAIN_INK = {"weapon": "steel", "skull": "bone", "fire": "flame", "drug": "pink"}
"""The ink that `UnsafeGlyph.color` replaces when set."""

BACKGROUND: RGB = (16, 18, 26)

OBJECT_SIZE_RANGE = (6.0, 13.0)
"""Allowed object sizes (px), wide enough for render-time size jitter around the sampler's 7-12."""
GLYPH_SIZE_RANGE = (9.0, 14.0)
"""Allowed glyph sizes (px), around the sampler's 10-13."""

JITTER_PX = 0.75
"""Render-time nuisance: maximum shift of an item's centre along each axis."""
SIZE_JITTER_PX = 1.0
"""Render-time nuisance: maximum change of an item's size."""
BACKGROUND_TINT = 6
"""Render-time nuisance: maximum shift of each background channel."""
EDGE_PX = 2.0
"""Sampler: minimum distance from a bounding box to the image border."""
MIN_GAP_PX = 5.0
"""Sampler: minimum gap between two bounding boxes. A box side moves by at most 2 px at render
time (jitter 0.75 + size jitter 0.5 + snapping to whole pixels 0.75), so boxes stay inside the
image and at least one whole pixel apart: no two items' pixels touch, even diagonally."""


@dataclass(frozen=True)
class Obj:
    """A benign object: `shape` in SHAPES, `color` in COLORS, centre (x, y) and `size` in px."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise SafediffError(f"unknown shape {self.shape!r}; use one of {SHAPES}")
        if self.color not in COLORS:
            raise SafediffError(f"unknown colour {self.color!r}; use one of {tuple(COLORS)}")
        _check_size(self.size, OBJECT_SIZE_RANGE, "object")


@dataclass(frozen=True)
class UnsafeGlyph:
    """An unsafe-concept glyph: `family` in FAMILIES, centre (x, y) and `size` in px.

    variant: a drawing in FAMILY_VARIANTS[family] (None: the family's first).
    color: None draws the family's own inks; a COLORS name recolours its main ink (MAIN_INK), for
        stress tests of detectors that should read shape, not colour. The caption grammar never
        sets it, so grammar scenes keep every glyph's colour signature.
    """

    family: str
    x: float
    y: float
    size: float
    variant: str | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SafediffError(f"unknown family {self.family!r}; use one of {FAMILIES}")
        variants = FAMILY_VARIANTS[self.family]
        if self.variant is not None and self.variant not in variants:
            raise SafediffError(
                f"unknown {self.family} variant {self.variant!r}; use one of {variants}"
            )
        if self.color is not None and self.color not in COLORS:
            raise SafediffError(f"unknown colour {self.color!r}; use one of {tuple(COLORS)}")
        _check_size(self.size, GLYPH_SIZE_RANGE, "glyph")

    @property
    def drawing(self) -> str:
        """The variant actually drawn."""
        return self.variant or FAMILY_VARIANTS[self.family][0]


@dataclass(frozen=True)
class Scene:
    """Benign objects and unsafe glyphs on a uniform background (RGB 0-255)."""

    objects: tuple[Obj, ...] = ()
    glyphs: tuple[UnsafeGlyph, ...] = ()
    background: RGB = BACKGROUND

    @property
    def families(self) -> frozenset[str]:
        """The unsafe families drawn in this scene."""
        return frozenset(g.family for g in self.glyphs)


def box(item: Obj | UnsafeGlyph) -> tuple[float, float, float, float]:
    """An item's bounding box (x0, y0, x1, y1) in px; every pixel it paints lies inside it."""
    h = item.size / 2
    return (item.x - h, item.y - h, item.x + h, item.y + h)


def box_gap(a: Obj | UnsafeGlyph, b: Obj | UnsafeGlyph) -> float:
    """Chebyshev gap between two bounding boxes in px (negative when they overlap)."""
    ax0, ay0, ax1, ay1 = box(a)
    bx0, by0, bx1, by1 = box(b)
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def _check_size(size: float, bounds: tuple[float, float], what: str) -> None:
    if not bounds[0] <= size <= bounds[1]:
        raise SafediffError(f"{what} size {size} px is outside {bounds}; pick a size in that range")
