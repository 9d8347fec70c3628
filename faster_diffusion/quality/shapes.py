"""Synthetic "tiny shapes" data for the bundled reference model, and an analytic detector.

Every image is 64x64 RGB: one filled shape (circle, square or triangle) in one of six
colours on a plain white background, placed on the left, the right, the top, the
bottom or in the center.  Captions follow exactly the template
``a {colour} {shape} {position}``, e.g. ``"a blue triangle at the top"``.

The detector reads the three attributes back from any RGB image (a render or a
generated sample) with numpy / scikit-image only:

* foreground = pixels far from the background colour (estimated from the border),
  largest connected component;
* colour = mean colour of the foreground core -> nearest palette colour;
* shape = best IoU between the foreground mask and a circle / square / triangle
  template fitted to the mask's bounding box (with the fill ratio of the box as a
  tie-breaker);
* position = centroid of the mask -> nearest of the five anchors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import numpy as np

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)

#: palette, name -> RGB
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 225),
    "yellow": (240, 215, 20),
    "magenta": (215, 35, 215),
    "cyan": (25, 205, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: position name -> caption phrase
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
#: position name -> (x, y) of the shape's centroid, in pixels of a 64x64 image
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (15.5, 31.5),
    "right": (47.5, 31.5),
    "top": (31.5, 15.5),
    "bottom": (31.5, 47.5),
    "center": (31.5, 31.5),
}

SIZE_RANGE = (20.0, 27.0)  # bounding-box side in pixels
OFFSET_JITTER = 3.0  # max centroid offset from the anchor, pixels
COLOUR_JITTER = 10  # max per-channel colour offset

_CAPTION_RE = re.compile(
    r"^\s*an?\s+(?P<colour>%s)\s+(?P<shape>%s)\s+(?P<position>%s)\s*\.?\s*$"
    % (
        "|".join(COLOURS),
        "|".join(SHAPES),
        "|".join(re.escape(p) for p in POSITIONS.values()),
    ),
    re.IGNORECASE,
)
_PHRASE_TO_POSITION = {v: k for k, v in POSITIONS.items()}


class Attributes(NamedTuple):
    colour: str | None
    shape: str | None
    position: str | None


# --------------------------------------------------------------------------- captions
def caption(colour: str, shape: str, position: str) -> str:
    """``caption("blue", "triangle", "top") == "a blue triangle at the top"``."""
    if colour not in COLOURS or shape not in SHAPES or position not in POSITIONS:
        raise ValueError(f"unknown attributes {(colour, shape, position)!r}")
    return f"a {colour} {shape} {POSITIONS[position]}"


def parse_caption(text: str) -> Attributes:
    """Inverse of :func:`caption`; raises ``ValueError`` if the text does not match."""
    m = _CAPTION_RE.match(text)
    if m is None:
        raise ValueError(f"not a tiny-shapes caption: {text!r}")
    return Attributes(
        m.group("colour").lower(),
        m.group("shape").lower(),
        _PHRASE_TO_POSITION[m.group("position").lower()],
    )


def all_attributes() -> list[Attributes]:
    """The 90 (colour, shape, position) combinations in a fixed order."""
    return [Attributes(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def all_captions() -> list[str]:
    return [caption(*a) for a in all_attributes()]


# --------------------------------------------------------------------------- rendering
def _shape_mask(shape: str, cx: float, cy: float, side: float, size: int, ss: int) -> np.ndarray:
    """Anti-aliased coverage mask (size x size, float in [0,1]) by ss x ss supersampling.

    (cx, cy) is the shape's *centroid*; for the triangle (apex up) that lies one
    sixth of the height below the bounding box centre.
    """
    n = size * ss
    coords = (np.arange(n, dtype=np.float64) + 0.5) / ss - 0.5  # pixel-centre coords
    x = coords[None, :]
    y = coords[:, None]
    h = side / 2.0
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == "square":
        m = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        by = cy - side / 6.0  # bbox centre
        top, bottom = by - h, by + h
        t = (y - top) / side  # 0 at apex, 1 at base
        m = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= t * h)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m = np.broadcast_to(m, (n, n)).astype(np.float32)
    return m.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render(
    colour: str,
    shape: str,
    position: str,
    rng: np.random.Generator | int | None = None,
    size: int = IMAGE_SIZE,
    jitter: bool = True,
    extra_colours: dict[str, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Render one shape; returns a ``(size, size, 3)`` uint8 array.

    With ``jitter`` the side length, the exact offset and the colour vary a little,
    drawn from ``rng`` (a ``numpy.random.Generator`` or a seed); the result is a pure
    function of the arguments and the generator state. ``extra_colours`` (name -> RGB)
    adds colours outside the palette, e.g. for a LoRA teaching one (script/train-lora).
    """
    palette = {**COLOURS, **(extra_colours or {})}
    if colour not in palette or position not in ANCHORS:
        raise ValueError(f"unknown attributes {(colour, shape, position)!r}")
    rng = np.random.default_rng(rng)
    scale = size / IMAGE_SIZE
    ax, ay = ANCHORS[position]
    if jitter:
        side = rng.uniform(*SIZE_RANGE)
        dx, dy = rng.uniform(-OFFSET_JITTER, OFFSET_JITTER, size=2)
        col = np.clip(np.array(palette[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    else:
        side = sum(SIZE_RANGE) / 2
        dx = dy = 0.0
        col = np.array(palette[colour])
    cx, cy = (ax + 0.5 + dx) * scale - 0.5, (ay + 0.5 + dy) * scale - 0.5
    cov = _shape_mask(shape, cx, cy, side * scale, size, ss=4)[..., None]
    bg = np.array(BACKGROUND, dtype=np.float32)
    img = bg * (1.0 - cov) + col.astype(np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample(rng: np.random.Generator | int | None = None, size: int = IMAGE_SIZE) -> tuple[np.ndarray, str, Attributes]:
    """A uniformly random (image, caption, attributes) triple."""
    rng = np.random.default_rng(rng)
    a = Attributes(
        list(COLOURS)[rng.integers(len(COLOURS))],
        SHAPES[rng.integers(len(SHAPES))],
        list(POSITIONS)[rng.integers(len(POSITIONS))],
    )
    return render(*a, rng=rng, size=size), caption(*a), a


# --------------------------------------------------------------------------- detector
def _to_uint8_rgb(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if a.max() <= 1.0 + 1e-6:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return a


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = (xx + 0.5) / w * 2 - 1  # -1..1
    v = (yy + 0.5) / h  # 0 (top) .. 1 (bottom)
    return {
        "circle": u ** 2 + (v * 2 - 1) ** 2 <= 1.0,
        "square": np.ones((h, w), bool),
        "triangle": np.abs(u) <= v,
    }


@dataclass
class Detection:
    colour: str | None
    shape: str | None
    position: str | None
    area: int = 0
    fill: float = 0.0
    centroid: tuple[float, float] | None = None

    @property
    def attributes(self) -> Attributes:
        return Attributes(self.colour, self.shape, self.position)


def detect(
    image, threshold: float = 80.0, min_area: int = 20, extra_colours: dict[str, tuple[int, int, int]] | None = None
) -> Detection:
    """Read colour, shape and position from an RGB image (uint8, float [0,1] or PIL).

    The colour is the nearest of ``COLOURS`` plus ``extra_colours`` (name -> RGB), if given."""
    from scipy import ndimage  # scipy ships with scikit-image

    a = _to_uint8_rgb(image).astype(np.float64)
    hh, ww = a.shape[:2]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((a - bg) ** 2).sum(-1))
    fg = dist > threshold
    if not fg.any():
        return Detection(None, None, None)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum(fg, labels, index=np.arange(1, n + 1))
        fg = labels == (1 + int(np.argmax(sizes)))
    fg = ndimage.binary_fill_holes(fg)
    area = int(fg.sum())
    if area < min_area:
        return Detection(None, None, None, area=area)

    # colour: mean of the (eroded) core, nearest palette colour
    core = ndimage.binary_erosion(fg, iterations=1)
    if core.sum() < 5:
        core = fg
    mean = a[core].mean(axis=0)
    palette = {**COLOURS, **(extra_colours or {})}
    names = list(palette)
    pal = np.array([palette[n] for n in names], dtype=np.float64)
    colour = names[int(np.argmin(((pal - mean) ** 2).sum(-1)))]

    # shape: best IoU against templates fitted to the bounding box
    ys, xs = np.nonzero(fg)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = fg[y0:y1, x0:x1]
    fill = float(box.mean())
    best, best_iou = None, -1.0
    for name, t in _templates(y1 - y0, x1 - x0).items():
        iou = (box & t).sum() / max(1, (box | t).sum())
        if iou > best_iou:
            best, best_iou = name, iou
    shape = best

    # position: centroid -> nearest anchor (anchors scale with the image size)
    cy, cx = ys.mean(), xs.mean()
    sx, sy = ww / IMAGE_SIZE, hh / IMAGE_SIZE
    position = min(
        ANCHORS,
        key=lambda p: ((ANCHORS[p][0] + 0.5) * sx - 0.5 - cx) ** 2 + ((ANCHORS[p][1] + 0.5) * sy - 0.5 - cy) ** 2,
    )
    return Detection(colour, shape, position, area=area, fill=fill, centroid=(float(cx), float(cy)))


def score(detections: Iterable[Detection | Attributes], targets: Iterable[Attributes]) -> dict[str, float]:
    """Fraction of images whose detected colour / shape / position / all three match."""
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    n = 0
    for d, t in zip(detections, targets):
        d = d.attributes if isinstance(d, Detection) else d
        ok = [d.colour == t.colour, d.shape == t.shape, d.position == t.position]
        hits["colour"] += ok[0]
        hits["shape"] += ok[1]
        hits["position"] += ok[2]
        hits["all"] += all(ok)
        n += 1
    return {k: (v / n if n else float("nan")) for k, v in hits.items()}


def position_confusion(detections: Iterable[Detection | Attributes], targets: Iterable[Attributes]) -> dict[str, dict[str, int]]:
    """Counts of detected position ("none": no shape found) per caption position, in ``POSITIONS`` order."""
    counts = {p: dict.fromkeys([*POSITIONS, "none"], 0) for p in POSITIONS}
    for d, t in zip(detections, targets):
        d = d.attributes if isinstance(d, Detection) else d
        counts[t.position][d.position or "none"] += 1
    return counts
