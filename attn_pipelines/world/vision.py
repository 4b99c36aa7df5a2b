"""Image-classification data of the world (and scikit-learn's digits) as ImageFolders for `vision_attn.finetune`.

    shapes: 18 classes `<colour>_<shape>` from `data.class_sample(seed, i)`: train = indices
            0..n_train-1, val = n_train..n_train+n_val-1 (32 x 32 RGB PNG, lossless);
    digits: scikit-learn's bundled 8 x 8 handwritten digits (1,797), bilinearly upsampled to 32 x 32,
            split 80/20 with `random_state=0` (needs the `eval` extra: `pip install -e ".[eval]"`).

The same arguments always write the same files, so a checkpoint's validation split can be
rebuilt anywhere from its `train_config.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vision_attn.finetune import make_transform

from .data import CLASSES, class_sample

__all__ = ["SHAPES_SPLIT", "write_shapes", "write_digits", "write_dataset", "load_tensors", "digits_available"]

#: default sizes of the shapes classification set (per split, all classes together)
SHAPES_SPLIT = {"train": 9000, "val": 1800}


def _save(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_shapes(root: str | Path, seed: int = 0, n_train: int = 9000, n_val: int = 1800) -> dict[str, int]:
    """The 18-class colour x shape set as `root/{train,val}/<class>/<index>.png`; returns the split sizes."""
    root = Path(root)
    for split, rng in (("train", range(n_train)), ("val", range(n_train, n_train + n_val))):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in rng:
            img, label = class_sample(seed, i)
            _save(img, root / split / CLASSES[label] / f"{i:06d}.png")
    return {"train": n_train, "val": n_val}


def digits_available() -> bool:
    """True when scikit-learn (the `eval` extra, which bundles the digits) is importable."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def write_digits(root: str | Path, limit: int | None = None) -> dict[str, int]:
    """scikit-learn's digits as `root/{train,val}/<digit>/<index>.png` (32 x 32 RGB), 80/20 split, seed 0.

    `limit` keeps only the first `limit` images of each split (smoke runs)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    idx_train, idx_val = train_test_split(range(len(x)), test_size=0.2, random_state=0)
    sizes = {}
    for split, idx in (("train", idx_train), ("val", idx_val)):
        idx = list(idx)[:limit] if limit else list(idx)
        for c in range(10):
            (Path(root) / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = x[i, 0].numpy()
            _save(np.repeat(img[..., None], 3, axis=-1), Path(root) / split / str(int(d.target[i])) / f"{i:04d}.png")
        sizes[split] = len(idx)
    return sizes


def write_dataset(name: str, root: str | Path, *, smoke: bool = False) -> dict[str, int]:
    """`shapes` or `digits` into `root` (`smoke`: a few hundred images)."""
    if name == "shapes":
        return write_shapes(root, 0, *((360, 180) if smoke else (SHAPES_SPLIT["train"], SHAPES_SPLIT["val"])))
    if name == "digits":
        return write_digits(root, limit=300 if smoke else None)
    raise ValueError(f"unknown dataset {name!r}; expected 'shapes' or 'digits'")


def load_tensors(folder: str | Path, model) -> tuple:
    """(images [N, 3, H, W] normalised for `model`, labels [N]) of an ImageFolder split, like finetune's eval."""
    import torch
    from torchvision.datasets import ImageFolder

    cfg = model.pretrained_cfg
    ds = ImageFolder(str(folder), transform=make_transform(cfg, "simple", training=False))
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.tensor(ys)
