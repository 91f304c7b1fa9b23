"""A concept given by example images: a class of the model's data (``3``, ``hbar``, ``3+7``),
``mark`` (the typographic mark alone), or a folder of ``.npy`` images (or one ``.npy`` file).

A class's circuit is found on its training images and tested on its held-out test images; a
folder's is found and tested on the folder's images, its target being ``--target`` or the
class the model predicts most often for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechscope.errors import MechscopeError, _article, near_matches
from mechscope.vision.data import Dataset, build_dataset, check_images
from mechscope.vision.models import VisionModel

MARK_IMAGES = 64


@dataclass
class Concept:
    """Example images (n, 1, s, s) of a concept, the class whose logit it drives, and held-out images to test on."""

    name: str
    images: torch.Tensor
    target: int
    target_name: str
    eval_images: torch.Tensor
    source: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "target_name": self.target_name, "source": self.source,
                "n_images": len(self.images), "n_eval": len(self.eval_images)}


def class_index(vm: VisionModel, name: str) -> int:
    """A class given by its index or its name, or one sentence listing the classes."""
    if name in vm.classes:
        return vm.classes.index(name)
    if name.lstrip("-").isdigit():
        if 0 <= int(name) < len(vm.classes):
            return int(name)
        raise MechscopeError(f"Class index {name} is out of range: this model's classes are 0 to {len(vm.classes) - 1} "
                             f"({', '.join(vm.classes)}).")  # no 'did you mean' of the digits in it
    raise MechscopeError(f"{name!r} is not a class of this model (classes: {', '.join(vm.classes)})."
                         + near_matches(name, vm.classes))


def _pixel_range(f: Path, a: np.ndarray) -> str:
    """``unit`` (every value in [0, 1]) or ``byte`` (whole numbers in [0, 255], some above 1),
    or one sentence naming ``f`` and the range it holds."""
    if a.size == 0:
        return "unit"
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return "unit"
    if lo >= 0 and hi <= 255 and bool((a == np.round(a)).all()):
        return "byte"
    if lo < 0 or hi > 255:
        raise MechscopeError(f"{f} holds pixel values from {lo:.6g} to {hi:.6g}, outside what an image holds; rescale "
                             "them into [0, 1] (or whole numbers in [0, 255]).")
    raise MechscopeError(f"{f} holds pixel values from {lo:.6g} to {hi:.6g} that are not whole numbers, so neither in "
                         "[0, 1] nor 8-bit [0, 255]; rescale them into [0, 1] or round them to whole numbers in [0, 255].")


def read_image_folder(path: Path, size: int) -> torch.Tensor:
    """The images in ``path`` (a folder of ``.npy`` files, or one): each file (s, s), (n, s, s)
    or (n, 1, s, s) of real numbers (float, integer or bool), returned in [0, 1].

    Pixel scale, decided once for all the files together: if every value of every file lies in
    [0, 1], the images are read as they are; otherwise every file must hold whole numbers in
    [0, 255] (8-bit images, saved with any dtype), and all are divided by 255. Anything else is
    refused with the file and the range it holds: negative values, values above 255, fractions
    above 1 (``1.01`` is neither scale), a file in [0, 1] (other than all zeros) beside a 0-255
    one, and files that are empty, damaged, pickled, ``.npz`` archives, or hold strings, complex
    numbers or records.
    """
    if path.is_dir():  # .npy in any case (a.NPY from another system); hidden files (AppleDouble ._x.npy) left out
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() == ".npy" and not f.name.startswith("."))
        others = sorted(f.name for f in path.iterdir() if not f.name.startswith(".") and f not in files)
        if others and not files:
            raise MechscopeError(f"the concept folder {path} holds no .npy images, only {', '.join(others[:4])}"
                                 f"{' ...' if len(others) > 4 else ''}; save each image array with numpy.save.")
    else:
        files = [path]
    if path.is_file() and path.suffix.lower() != ".npy":
        raise MechscopeError(f"{path} is not a .npy file; give a folder of .npy images or one .npy array.")
    arrays: list[np.ndarray] = []
    ranges: list[str] = []
    for f in files:
        try:
            a = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            a = None
        if not isinstance(a, np.ndarray):
            raise MechscopeError(f"{f} is not a readable .npy array (it is empty, damaged, pickled or an .npz archive); "
                                 "save each image array with numpy.save.")
        if a.dtype.kind not in "biuf":
            what = {"U": "text", "S": "text", "c": "complex", "V": "record", "M": "date", "m": "time"}.get(a.dtype.kind, "other")
            raise MechscopeError(f"{f} holds {what} values ({a.dtype}), not real numbers; save the images as a float or "
                                 "integer array.")
        shape = tuple(a.shape)  # as saved: a message names this, not the reshape below
        if a.ndim == 2:
            a = a[None]
        if a.ndim == 3:
            a = a[:, None]
        if a.ndim != 4 or a.shape[1:] != (1, size, size):
            if shape[-1] in (1, 3, 4) and len(shape) in (3, 4) and shape[-3:-1] == (size, size):
                fix = ("it is channel-last (height, width, channels); save it as (n, 1, height, width) grey images, "
                       "averaging colour channels if it is RGB")
            else:
                fix = f"resize them to {size}x{size} first"
            raise MechscopeError(f"{f} holds an array of shape {shape}, but the model takes {size}x{size} grey images, "
                                 f"as (s, s), (n, s, s) or (n, 1, s, s); {fix}.")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise MechscopeError(f"{f} holds NaN or infinite pixels; give images with finite values (0-1 or 0-255).")
        ranges.append(_pixel_range(f, a))
        arrays.append(a)
    if not arrays or sum(len(a) for a in arrays) == 0:
        raise MechscopeError(f"the concept {path} holds no images; put .npy images of the concept in it.")
    scale = 255.0 if "byte" in ranges else 1.0
    if scale > 1:
        b = ranges.index("byte")
        for f, a, r in zip(files, arrays, ranges):
            if r == "unit" and a.max(initial=0) > 0:
                raise MechscopeError(f"{f} holds values in [0, 1] but {files[b].name} holds values up to {arrays[b].max():.6g} "
                                     "(0-255); save every image of the concept in one range, [0, 1] or [0, 255].")
    imgs = np.concatenate(arrays) / scale
    return check_images(torch.from_numpy(imgs.astype(np.float32)), size, f"the images in {path}")


def resolve_concept(vm: VisionModel, spec: str | int | os.PathLike[str], target: str | int | None = None, ds: Dataset | None = None) -> Concept:
    """The concept ``spec`` names for model ``vm`` (see the module docstring); a class may be
    given as its index (3 or "3") and a folder as a ``Path``."""
    import numbers

    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):  # a class index, never a folder name
        if not 0 <= int(spec) < len(vm.classes):
            raise MechscopeError(f"class {int(spec)} is not one of the model's {len(vm.classes)} classes (0..{len(vm.classes) - 1}).")
        spec = vm.classes[int(spec)]
    elif isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise MechscopeError(f"a concept is a class (e.g. 3), 'mark' or a folder of .npy images, not {_article(type(spec).__name__)}.")
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):  # a class index (numpy's too)
        if not 0 <= int(target) < len(vm.classes):
            raise MechscopeError(f"--target class {int(target)} is not one of the model's {len(vm.classes)} classes.")
        target = vm.classes[int(target)]
    if not spec:
        raise MechscopeError("--concept is empty; give a class (e.g. 3), 'mark' or a folder of .npy images.")
    p = Path(spec)
    if p.exists() and spec not in vm.classes:
        imgs = read_image_folder(p, vm.size)
        if target is not None:
            t = class_index(vm, str(target))
        else:
            with torch.no_grad():
                t = int(torch.bincount(vm.net(imgs).argmax(-1), minlength=len(vm.classes)).argmax())
        return Concept(p.name, imgs, t, vm.classes[t], imgs, f"folder {p}")
    ds = ds or build_dataset(vm.cfg.data)
    if spec == "mark":
        mc = vm.cfg.data.mark_class
        if mc is None:
            raise MechscopeError("this model was trained without a mark, so 'mark' has no images; retrain with --mark-class.")
        att = ds.attack_images()
        return Concept("mark", ds.mark_only(MARK_IMAGES), mc, vm.classes[mc], att.images, "mark-only images")
    t = class_index(vm, spec) if target is None else class_index(vm, str(target))
    c = class_index(vm, spec)
    imgs, held = ds.train.of_class(c), ds.test.of_class(c)
    if len(imgs) == 0 or len(held) == 0:
        raise MechscopeError(f"class {vm.classes[c]!r} has no images in this model's data; pick another class.")
    return Concept(vm.classes[c], imgs, t, vm.classes[t], held, f"class {vm.classes[c]} (train images; tested on held-out ones)")
