"""Ground-truth scoring of generated world videos: attributes by the classifier, motion by tracking, layout by IoU.

* `AttributeScorer`: the trained attribute classifier (`assets/world/classifier`, 18 colour x shape
  classes) on every frame; class probabilities are averaged over the frames and the argmax gives the
  colour and the shape, compared with the caption's.
* `track`: the foreground (pixels far from the world's background colour) and its centroid per
  frame; `direction_of` reads the dominant axis and sign of the centroid's displacement.
* `iou_by_color`: pixels near a requested colour vs the requested box or mask (regional / boundary).
* `crispness`, `color_error`: edge sharpness of the foreground and distance of its mean colour
  from the requested one (objectives for guidance variants).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import vision_attn as va

from .data import BACKGROUND, COLORS, DIRECTIONS, parse_caption

__all__ = ["AttributeScorer", "foreground", "track", "direction_of", "iou_by_color", "crispness", "color_error"]

FG_THRESHOLD = 0.25  # RGB distance from the background beyond which a pixel is foreground


class AttributeScorer:
    """The attribute classifier applied to generated videos (`video` [F, H, W, 3] floats in [0, 1])."""

    def __init__(self, folder: str | Path) -> None:
        self.model = va.load_finetuned(folder)
        cfg = self.model.attnplug_config
        self.classes: list[str] = list(cfg["classes"])
        self.size = int(cfg.get("img_size") or 32)
        dc = self.model.pretrained_cfg
        self.mean = torch.tensor(dc["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(dc["std"]).view(1, 3, 1, 1)

    @torch.no_grad()
    def probs(self, frames: np.ndarray) -> torch.Tensor:
        """Class probabilities [F, classes] of frames [F, H, W, 3] (resized to the classifier's input)."""
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).permute(0, 3, 1, 2)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.model((x - self.mean) / self.std).softmax(-1)

    def predict(self, video: np.ndarray) -> tuple[str, str, float]:
        """(colour, shape, probability) of the class with the highest mean probability over the frames."""
        p = self.probs(video).mean(0)
        i = int(p.argmax())
        color, shape = self.classes[i].split("_")
        return color, shape, float(p[i])

    def score(self, video: np.ndarray, caption: str) -> dict[str, Any]:
        """Colour / shape / both / direction correctness of a one-object `caption`'s video."""
        want = parse_caption(caption)[0]
        color, shape, p = self.predict(video)
        direction = direction_of(track(video))
        out = {"pred_color": color, "pred_shape": shape, "p": round(p, 4), "pred_direction": direction,
               "color_ok": color == want["color"], "shape_ok": shape == want["shape"]}  # fmt: skip
        out["attr_ok"] = out["color_ok"] and out["shape_ok"]
        if "direction" in want:
            out["direction_ok"] = direction == want["direction"]
        return out


def foreground(frame: np.ndarray, threshold: float = FG_THRESHOLD) -> np.ndarray:
    """Bool [H, W]: pixels whose RGB distance from the background exceeds `threshold`."""
    return np.linalg.norm(frame - np.asarray(BACKGROUND, dtype=np.float32), axis=-1) > threshold


def track(video: np.ndarray) -> np.ndarray:
    """Centroid (x, y) of the foreground per frame [F, 2] (NaN where a frame has no foreground)."""
    out = np.full((len(video), 2), np.nan, dtype=np.float32)
    for t, frame in enumerate(video):
        ys, xs = np.nonzero(foreground(frame))
        if len(xs):
            out[t] = (xs.mean() + 0.5, ys.mean() + 0.5)
    return out


def direction_of(centers: np.ndarray, min_travel: float = 1.5) -> str:
    """`left` / `right` / `up` / `down` from the first and last tracked centroids, `still` under `min_travel` px,
    `none` when fewer than two frames have foreground."""
    ok = ~np.isnan(centers[:, 0])
    if ok.sum() < 2:
        return "none"
    c = centers[ok]
    d = c[-1] - c[0]
    if np.abs(d).max() < min_travel:
        return "still"
    axis = int(np.argmax(np.abs(d)))
    for name, (ux, uy) in DIRECTIONS.items():
        if (ux, uy)[axis] == int(np.sign(d[axis])) and (ux, uy)[1 - axis] == 0:
            return name
    return "none"  # pragma: no cover


def color_mask(image: np.ndarray, color: str, threshold: float = 0.3) -> np.ndarray:
    """Bool [H, W]: pixels within `threshold` (RGB distance) of the named colour."""
    return np.linalg.norm(image - np.asarray(COLORS[color], dtype=np.float32), axis=-1) < threshold


def iou_by_color(image: np.ndarray, color: str, region: np.ndarray | tuple[float, float, float, float]) -> float:
    """IoU between the pixels of `color` and `region` (a bool/float mask [H, W] or a box (x0, y0, x1, y1) in px)."""
    got = color_mask(image, color)
    if isinstance(region, tuple):
        h, w = image.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w] + 0.5
        x0, y0, x1, y1 = region
        want = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    else:
        want = np.asarray(region) >= 0.5
    union = (got | want).sum()
    return float((got & want).sum() / union) if union else 0.0


def crispness(video: np.ndarray) -> float:
    """Mean gradient magnitude on the foreground's edge band (higher = sharper shape edges)."""
    vals = []
    for frame in video:
        g = frame.mean(-1)
        gy, gx = np.gradient(g)
        mag = np.hypot(gx, gy)
        fg = foreground(frame)
        edge = fg ^ np.roll(fg, 1, 0) | fg ^ np.roll(fg, 1, 1)
        if edge.any():
            vals.append(float(mag[edge].mean()))
    return float(np.mean(vals)) if vals else 0.0


def color_error(video: np.ndarray, color: str) -> float:
    """RGB distance between the foreground's mean colour and the named colour (NaN without foreground)."""
    fg = np.stack([foreground(f) for f in video])
    if not fg.any():
        return float("nan")
    return float(np.linalg.norm(video[fg].mean(0) - np.asarray(COLORS[color], dtype=np.float32)))
