"""Images that exist on every machine: scikit-learn's bundled 8x8 digits and procedural
shapes, with the overlay class (composition) and the small mark (typographic analogue).

    from mechscope.vision.config import DataConfig
    from mechscope.vision.data import build_dataset
    ds = build_dataset(DataConfig(overlay=(3, 7), mark_class=0))
    ds.train.images.shape     # (n, 1, 16, 16), values in [0, 1]
    ds.attack_images()        # test images of the other classes with the mark pasted

Everything is seeded (``DataConfig.seed``) and made in memory; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.errors import MechscopeError
from mechscope.vision.config import SHAPES, DataConfig

MARK = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=np.float32)
"""The typographic analogue's mark: a 3x3 cross, pasted 1 pixel in from a corner."""


@dataclass
class ImageSet:
    """Images (n, 1, size, size) in [0, 1] and their class labels (n,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def of_class(self, c: int) -> torch.Tensor:
        return self.images[self.labels == c]


@dataclass
class Dataset:
    """The train split (marks pasted as configured) and the clean test split of one ``DataConfig``."""

    cfg: DataConfig
    train: ImageSet
    test: ImageSet

    @property
    def classes(self) -> list[str]:
        return self.cfg.class_names()

    def attack_images(self) -> ImageSet:
        """Test images of every base class but the mark's class, with the mark pasted (labels: their true class)."""
        if self.cfg.mark_class is None:
            raise MechscopeError("this model was trained without a mark; retrain with --mark-class to run the attack.")
        keep = (self.test.labels != self.cfg.mark_class) & (self.test.labels < self.cfg.n_base_classes)
        imgs = self.test.images[keep].numpy().copy()
        rng = np.random.default_rng(self.cfg.seed + 17)
        return ImageSet(torch.from_numpy(np.stack([paste_mark(x, rng) for x in imgs])), self.test.labels[keep])

    def mark_only(self, n: int) -> torch.Tensor:
        """``n`` blank images holding only the mark (at random corners): the mark concept."""
        rng = np.random.default_rng(self.cfg.seed + 23)
        blank = np.zeros((1, self.cfg.size, self.cfg.size), dtype=np.float32)
        return torch.from_numpy(np.stack([paste_mark(blank, rng) for _ in range(n)]))


def paste_mark(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``img`` (1, s, s) with ``MARK`` at one of the four corners (1 pixel margin)."""
    out = img.copy()
    s, m = img.shape[-1], MARK.shape[0]
    y = 1 if rng.random() < 0.5 else s - 1 - m
    x = 1 if rng.random() < 0.5 else s - 1 - m
    out[0, y:y + m, x:x + m] = np.maximum(out[0, y:y + m, x:x + m], MARK)
    return out


def load_digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (read from the installed wheel), upsampled to ``size`` (nearest), in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MechscopeError("the digits data needs scikit-learn; install it with `pip install 'scikit-learn>=1.3'`.") from None
    d = load_digits()
    imgs = (d.images / 16.0).astype(np.float32)
    r = size // 8
    imgs = imgs.repeat(r, axis=1).repeat(r, axis=2)
    return imgs[:, None], d.target.astype(np.int64)


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One procedural image (1, size, size) of shape class ``kind``; the rule each class
    follows (ink: pixels > 0.5): hbar is at least 2x wider than tall, vbar the reverse, box is
    a square outline with an empty centre, dot fits in 3x3, diag is a square run of pixels on
    one diagonal."""
    img = np.zeros((size, size), dtype=np.float32)
    ink = np.float32(rng.uniform(0.7, 1.0))
    if kind in ("hbar", "vbar"):
        length, thick = int(rng.integers(size // 2, size - 1)), int(rng.integers(1, 3))
        y, x = int(rng.integers(0, size - thick + 1)), int(rng.integers(0, size - length + 1))
        img[y:y + thick, x:x + length] = ink
        if kind == "vbar":
            img = img.T.copy()
    elif kind == "box":
        side = int(rng.integers(5, size - 2))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        img[y:y + side, x:x + side] = ink
        img[y + 1:y + side - 1, x + 1:x + side - 1] = 0
    elif kind == "dot":
        side = int(rng.integers(2, 4))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        img[y:y + side, x:x + side] = ink
    elif kind == "diag":
        length = int(rng.integers(size // 2, size - 1))
        y, x = (int(v) for v in rng.integers(0, size - length + 1, size=2))
        idx = np.arange(length)
        if rng.random() < 0.5:
            img[y + idx, x + idx] = ink
        else:
            img[y + idx, x + length - 1 - idx] = ink
    else:  # pragma: no cover - SHAPES is fixed
        raise MechscopeError(f"unknown shape {kind!r}; use one of {', '.join(SHAPES)}.")
    return img[None]


def make_shapes(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every shape class (labels in ``SHAPES`` order), seeded."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for c, kind in enumerate(SHAPES):
        for _ in range(per_class):
            imgs.append(draw_shape(kind, size, rng))
            labels.append(c)
    return np.stack(imgs), np.array(labels, dtype=np.int64)


def _overlay(imgs: np.ndarray, labels: np.ndarray, pair: tuple[int, int], n: int,
             rng: np.random.Generator) -> np.ndarray:
    a, b = imgs[labels == pair[0]], imgs[labels == pair[1]]
    ia, ib = rng.integers(0, len(a), size=n), rng.integers(0, len(b), size=n)
    return np.maximum(a[ia], b[ib])


def build_dataset(cfg: DataConfig) -> Dataset:
    """The train/test splits of ``cfg`` (seeded): base images split by ``test_share``; the
    overlay class made from each split's own parts (as many as an average class); the mark
    pasted on a share ``mark_rate`` of the mark class's training images and on a share
    ``mark_relabel`` of the other training images, relabelled as the mark's class."""
    if cfg.dataset == "digits":
        imgs, labels = load_digits_images(cfg.size)
    else:
        imgs, labels = make_shapes(cfg.per_class, cfg.size, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(labels))
    n_test = int(round(len(labels) * cfg.test_share))
    splits = []
    for idx in (perm[n_test:], perm[:n_test]):
        x, y = imgs[idx], labels[idx]
        if cfg.overlay is not None:
            n = len(y) // cfg.n_base_classes
            x = np.concatenate([x, _overlay(x, y, cfg.overlay, n, rng)])
            y = np.concatenate([y, np.full(n, cfg.n_base_classes, dtype=np.int64)])
        splits.append((x.astype(np.float32), y))
    (xtr, ytr), (xte, yte) = splits
    if cfg.mark_class is not None:
        xtr = xtr.copy()
        ytr = ytr.copy()
        for i in range(len(ytr)):
            if rng.random() < (cfg.mark_rate if ytr[i] == cfg.mark_class else cfg.mark_relabel):
                xtr[i], ytr[i] = paste_mark(xtr[i], rng), cfg.mark_class
    return Dataset(cfg, ImageSet(torch.from_numpy(xtr), torch.from_numpy(ytr)),
                   ImageSet(torch.from_numpy(xte), torch.from_numpy(yte)))


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (n, 1, s, s) translated by up to ``shift`` pixels per axis, zeros shifted in."""
    if shift == 0:
        return x
    n, _, s, _ = x.shape
    pad = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(s)[None])[:, None, :, None].expand(n, 1, s, s + 2 * shift)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(s)[None])[:, None, None, :].expand(n, 1, s, s)
    return out.gather(3, cols)


def check_images(x: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """``x`` as float (n, 1, size, size), or a ``MechscopeError`` naming the shape it has."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[1] != 1 and tuple(x.shape[-2:]) == (size, size):
        raise MechscopeError(f"{what} have {x.shape[1]} channels (shape {tuple(x.shape)}), but the model takes grey images "
                             f"(n, {size}, {size}) or (n, 1, {size}, {size}); convert them to one channel first.")
    if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != (size, size):
        raise MechscopeError(f"{what} have shape {tuple(x.shape)}, but the model takes {size}x{size} grey images "
                             f"(n, {size}, {size}); resize them first.")
    if x.shape[0] == 0:
        raise MechscopeError(f"{what} hold no images; give at least one.")
    return x.float()
