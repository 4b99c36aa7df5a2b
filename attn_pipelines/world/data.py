"""Procedural data of the synthetic world: coloured shapes on a plain background, deterministic by seed.

Three kinds of samples, each a pure function of `(seed, index)` (numpy's `default_rng([seed, index])`),
so any sample can be regenerated alone and two runs with one seed give identical arrays:

* `video_sample`: `frames` x `size` x `size` RGB clips of one or two shapes moving in a straight
  line at constant speed, captioned from their attributes ("a red circle moving right", "a blue
  square moving down and a green triangle moving left"); the trajectory (centre per frame) is known.
* `scene_sample`: images with one to three shapes inscribed in known boxes, captioned by name and
  place ("a red circle at the top left and a blue square at the bottom right"); boxes and masks known.
* `class_sample`: one shape of a random size, colour and position with noise and blur, labelled
  by colour x shape (18 classes): the attribute classifier's data and the vision benchmark's.

Shapes are drawn analytically on a 4x supersampled grid and box-filtered (anti-aliased edges).
Values are float32 in [0, 1], layout [F, H, W, 3] (videos) or [H, W, 3] (images).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BACKGROUND",
    "COLORS",
    "SHAPES",
    "DIRECTIONS",
    "CLASSES",
    "VOCABULARY",
    "ShapeSpec",
    "VideoSample",
    "SceneSample",
    "video_sample",
    "scene_sample",
    "class_sample",
    "render_shape",
    "caption_of",
    "single_prompts",
    "parse_caption",
]

#: background of every world image (dark grey, so every shape colour stands out)
BACKGROUND = (0.12, 0.12, 0.14)
#: shape colours: name -> RGB in [0, 1]
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.70, 0.25, 0.85),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
#: direction name -> unit step (dx, dy) in image coordinates (y grows downward)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: classification labels, colour-major: index = colour_index * len(SHAPES) + shape_index
CLASSES = tuple(f"{c}_{s}" for c in COLORS for s in SHAPES)
PLACES = {
    "top left": (0, 0),
    "top right": (0, 1),
    "bottom left": (1, 0),
    "bottom right": (1, 1),
}
#: every word a world caption uses (the world tokenizer's vocabulary)
VOCABULARY = tuple(
    dict.fromkeys(
        ["a", "and", "moving", "at", "the", "top", "bottom", "left", "right", "up", "down", "center", "middle"]
        + list(COLORS)
        + list(SHAPES)
    )
)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: colour and shape names, centre (x, y) in pixels, radius in pixels, rotation in radians."""

    color: str
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float = 0.0


@dataclass
class VideoSample:
    """A clip [F, H, W, 3], its caption, and per object: attributes, direction, speed (px/frame), centres [F, 2]."""

    video: np.ndarray
    caption: str
    objects: list[dict] = field(default_factory=list)


@dataclass
class SceneSample:
    """An image [H, W, 3], its caption, and per object: attributes, box (x0, y0, x1, y1) in px, place, mask [H, W]."""

    image: np.ndarray
    caption: str
    objects: list[dict] = field(default_factory=list)


def _coverage(spec: ShapeSpec, size: int, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel of a `size` x `size` image covered by the shape (supersampled `ss` x `ss`)."""
    n = size * ss
    c = (np.arange(n, dtype=np.float32) + 0.5) / ss
    x, y = np.meshgrid(c, c)
    dx, dy = x - spec.cx, y - spec.cy
    if spec.angle:
        ca, sa = np.cos(spec.angle), np.sin(spec.angle)
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    r = spec.radius
    if spec.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif spec.shape == "square":
        h = r * 0.88  # same area as the circle, roughly
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif spec.shape == "triangle":  # equilateral, pointing up, centroid at the centre
        R = r * 1.3
        # three half-planes: bottom edge and the two slanted edges
        inside = (dy <= R / 2) & (np.sqrt(3) * dx - dy <= R) & (-np.sqrt(3) * dx - dy <= R)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3)).astype(np.float32)


def render_shape(canvas: np.ndarray, spec: ShapeSpec) -> np.ndarray:
    """Alpha-composite `spec` onto `canvas` [H, W, 3] (in place) and return the coverage mask [H, W]."""
    a = _coverage(spec, canvas.shape[0])
    canvas *= 1 - a[..., None]
    canvas += a[..., None] * np.asarray(COLORS[spec.color], dtype=np.float32)
    return a


def _canvas(size: int, background: tuple[float, float, float] = BACKGROUND) -> np.ndarray:
    return np.broadcast_to(np.asarray(background, dtype=np.float32), (size, size, 3)).copy()


def caption_of(objects: list[dict]) -> str:
    """`a red circle moving right` / `... and a blue square moving down` from object dicts."""
    parts = []
    for o in objects:
        where = f" moving {o['direction']}" if "direction" in o else f" at the {o['place']}" if "place" in o else ""
        parts.append(f"a {o['color']} {o['shape']}{where}")
    return " and ".join(parts)


def parse_caption(caption: str) -> list[dict]:
    """The objects a world caption names: [{color, shape, direction | place}] (ValueError if not a world caption)."""
    out = []
    for part in caption.strip().lower().split(" and "):
        words = part.split()
        if len(words) < 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
            raise ValueError(f"not a world caption: {caption!r} (expected 'a <colour> <shape> moving <direction>')")
        o: dict = {"color": words[1], "shape": words[2]}
        rest = " ".join(words[3:])
        if rest.startswith("moving ") and rest[7:] in DIRECTIONS:
            o["direction"] = rest[7:]
        elif rest.startswith("at the ") and rest[7:] in PLACES:
            o["place"] = rest[7:]
        elif rest:
            raise ValueError(f"not a world caption: {caption!r} (unknown ending {rest!r})")
        out.append(o)
    return out


def single_prompts() -> list[str]:
    """Every one-object video caption (colour x shape x direction), in a fixed order."""
    return [f"a {c} {s} moving {d}" for c in COLORS for s in SHAPES for d in DIRECTIONS]


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), stream])


def _start(rng: np.random.Generator, u: int, lo: float, hi: float, travel: float) -> float:
    """Start coordinate along a motion component `u` (-1, 0, 1) keeping the whole path in [lo, hi]."""
    if u > 0:
        return float(rng.uniform(lo, max(lo, hi - travel)))
    if u < 0:
        return float(rng.uniform(min(hi, lo + travel), hi))
    return float(rng.uniform(lo, hi))


def video_sample(
    seed: int,
    index: int,
    *,
    frames: int = 9,
    size: int = 32,
    two_object_prob: float = 0.2,
    radius: tuple[float, float] = (4.5, 6.5),
    speed: tuple[float, float] = (1.2, 2.2),
) -> VideoSample:
    """Clip `index` of the video set with `seed`: one shape (or two, with `two_object_prob`) moving straight.

    Each start point is drawn so the shape stays fully inside the frame for all `frames` frames; two
    objects differ in colour and shape (so each is told apart by colour). `objects[i]["centers"]`
    holds the true centre (x, y) of object i in every frame.
    """
    rng = _rng(seed, index, 0)
    n = 2 if rng.random() < two_object_prob else 1
    colors = rng.choice(len(COLORS), size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    objects = []
    for i in range(n):
        r = float(rng.uniform(*radius))
        d = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        v = float(rng.uniform(*speed))
        travel = v * (frames - 1)
        ux, uy = DIRECTIONS[d]
        lo, hi = r + 1.0, size - r - 1.0
        x0, y0 = (_start(rng, u, lo, hi, travel) for u in (ux, uy))
        angle = float(rng.uniform(-0.25, 0.25)) if SHAPES[shapes[i]] == "square" else 0.0
        centers = np.array([[x0 + ux * v * t, y0 + uy * v * t] for t in range(frames)], dtype=np.float32)
        objects.append(
            {"color": list(COLORS)[colors[i]], "shape": SHAPES[shapes[i]], "direction": d, "speed": v, "radius": r,
             "angle": angle, "centers": centers}
        )  # fmt: skip
    video = np.empty((frames, size, size, 3), dtype=np.float32)
    for t in range(frames):
        canvas = _canvas(size)
        for o in objects:
            cx, cy = o["centers"][t]
            render_shape(canvas, ShapeSpec(o["color"], o["shape"], float(cx), float(cy), o["radius"], o["angle"]))
        video[t] = canvas
    return VideoSample(video=video, caption=caption_of(objects), objects=objects)


def scene_sample(seed: int, index: int, *, size: int = 32, max_objects: int = 2) -> SceneSample:
    """Image `index` of the scene set: 1..`max_objects` shapes, each inscribed in a box in its own quadrant.

    Each shape sits in the quadrant its caption's place names (with jitter); its box (x0, y0, x1, y1) is
    the tight pixel box of the drawn shape. Objects differ in colour; `objects[i]["mask"]` is its coverage [H, W].
    """
    rng = _rng(seed, index, 1)
    n = int(rng.integers(1, max_objects + 1))
    places = [list(PLACES)[i] for i in rng.choice(len(PLACES), size=n, replace=False)]
    colors = rng.choice(len(COLORS), size=n, replace=False)
    canvas = _canvas(size)
    objects = []
    half = size / 2
    for i, place in enumerate(places):
        row, col = PLACES[place]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = float(rng.uniform(0.28, 0.36) * half)
        reach = r * (1.3 if shape == "triangle" else 1.0)  # a triangle's vertices lie 1.3 r from its centre
        cx = col * half + half / 2 + float(rng.uniform(-1, 1)) * max(0.0, half / 2 - reach - 0.5)
        cy = row * half + half / 2 + float(rng.uniform(-1, 1)) * max(0.0, half / 2 - reach - 0.5)
        spec = ShapeSpec(list(COLORS)[colors[i]], shape, cx, cy, r)
        mask = render_shape(canvas, spec)
        ys, xs = np.nonzero(mask >= 0.5)  # the tight box of the drawn shape (x1, y1 exclusive)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        objects.append({"color": spec.color, "shape": shape, "place": place, "box": box, "mask": mask})
    return SceneSample(image=canvas, caption=caption_of(objects), objects=objects)


def class_sample(seed: int, index: int, *, size: int = 32, hard: bool = True) -> tuple[np.ndarray, int]:
    """Classification image `index`: one shape, label `CLASSES.index(f"{colour}_{shape}")`.

    `hard`: random size (3.5-8 px radius), rotation, background shade, colour jitter, blur and pixel
    noise, so a classifier trained on it also reads generated (slightly blurry, off-colour) frames.
    """
    rng = _rng(seed, index, 2)
    label = int(rng.integers(len(CLASSES)))
    color, shape = CLASSES[label].split("_")
    r = float(rng.uniform(3.5, 8.0) if hard else rng.uniform(4.5, 6.5))
    cx, cy = (float(rng.uniform(r + 0.5, size - r - 0.5)) for _ in range(2))
    angle = float(rng.uniform(-0.4, 0.4)) if hard and shape != "circle" else 0.0
    bg = tuple(float(np.clip(b + rng.uniform(-0.08, 0.08), 0, 1)) for b in BACKGROUND) if hard else BACKGROUND
    canvas = _canvas(size, bg)
    a = _coverage(ShapeSpec(color, shape, cx, cy, r, angle), size)
    rgb = np.asarray(COLORS[color], dtype=np.float32)
    if hard:
        rgb = np.clip(rgb + rng.normal(0, 0.05, 3).astype(np.float32), 0, 1)
    canvas = canvas * (1 - a[..., None]) + a[..., None] * rgb
    if hard:
        if rng.random() < 0.5:  # separable 3-tap blur
            k = float(rng.uniform(0.1, 0.3))
            for ax in (0, 1):
                canvas = (1 - 2 * k) * canvas + k * (np.roll(canvas, 1, ax) + np.roll(canvas, -1, ax))
        canvas = canvas + rng.normal(0, float(rng.uniform(0.0, 0.06)), canvas.shape)
    return np.clip(canvas, 0, 1).astype(np.float32), label
