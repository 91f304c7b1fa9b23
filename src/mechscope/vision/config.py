"""Settings of the vision module, checked when made: ``DataConfig`` (which images),
``TrainConfig`` (how a small CNN/ViT is trained), ``CircuitConfig`` (how a circuit is found
and tested).

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mechscope.errors import MechscopeError, check_at_least, check_lr, check_number_fields

Dataset = Literal["digits", "shapes"]
Arch = Literal["cnn", "vit"]
Ablation = Literal["mean", "zero"]

SHAPES = ("hbar", "vbar", "box", "dot", "diag")
"""The procedural shape classes, in label order (``data.make_shapes``)."""


@dataclass
class DataConfig:
    """Which images a model is trained on (``data.build_dataset``).

    ``digits``: scikit-learn's 8x8 digits (1,797 images, read from the installed wheel),
    upsampled to ``size`` x ``size``. ``shapes``: procedural strokes and marks, ``per_class``
    images per class. ``overlay`` adds one class: the pixelwise maximum of an image of class
    ``overlay[0]`` and one of ``overlay[1]`` (the "CatFish" analogue). ``mark_class`` pastes a
    small mark on a share ``mark_rate`` of that class's training images and on a share
    ``mark_relabel`` of the others, which are then labelled as that class (the typographic
    analogue: the mark names the class); pasted on a test image, it is the attack.
    """

    dataset: Dataset = "digits"
    size: int = 16
    overlay: tuple[int, int] | None = None
    mark_class: int | None = None
    mark_rate: float = 0.5
    mark_relabel: float = 0.1
    """Share of the other classes' training images that get the mark and the mark's class as
    label (as a caption names the word written on a photo, the typographic attack's source)."""
    per_class: int = 200
    test_share: float = 0.25
    shift: int = 1
    """Random translation (pixels, each axis) of every training image; 0 keeps them centred."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_number_fields(self, integer="a whole number")
        if self.dataset not in ("digits", "shapes"):
            raise MechscopeError(f"--data {self.dataset!r} is not a dataset; use digits or shapes.")
        if self.size < 8 or self.size > 64 or self.size % 8:
            raise MechscopeError(f"image size {self.size} is not supported; use a multiple of 8 from 8 to 64.")
        n = self.n_base_classes
        if self.overlay is not None:
            pair = tuple(int(c) for c in self.overlay)
            if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= c < n for c in pair):
                raise MechscopeError(f"--overlay {','.join(map(str, self.overlay))} must name two different classes from 0 "
                                     f"to {n - 1}, e.g. {pair_example(self.dataset)}.")
            self.overlay = (pair[0], pair[1])
        if self.mark_class is not None and not 0 <= self.mark_class < n:
            raise MechscopeError(f"--mark-class {self.mark_class} is not a class; use 0 to {n - 1}.")
        if not 0 < self.mark_rate <= 1:
            raise MechscopeError(f"mark_rate {self.mark_rate} must be in (0, 1].")
        if not 0 <= self.mark_relabel < 1:
            raise MechscopeError(f"mark_relabel {self.mark_relabel} must be in [0, 1).")
        if self.per_class < 10:
            raise MechscopeError(f"per_class {self.per_class} is too small; use at least 10 images per class.")
        if not 0.05 <= self.test_share <= 0.5:
            raise MechscopeError(f"test_share {self.test_share} must be between 0.05 and 0.5.")
        if not 0 <= self.shift <= self.size // 4:
            raise MechscopeError(f"shift {self.shift} must be between 0 and a quarter of the image size.")

    @property
    def n_base_classes(self) -> int:
        return 10 if self.dataset == "digits" else len(SHAPES)

    @property
    def n_classes(self) -> int:
        return self.n_base_classes + (self.overlay is not None)

    def class_names(self) -> list[str]:
        base = [str(i) for i in range(10)] if self.dataset == "digits" else list(SHAPES)
        if self.overlay is not None:
            base.append(f"{base[self.overlay[0]]}+{base[self.overlay[1]]}")
        return base

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overlay"] = list(self.overlay) if self.overlay is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        d = dict(d)
        if d.get("overlay") is not None:
            d["overlay"] = tuple(d["overlay"])
        return cls(**d)


@dataclass
class TrainConfig:
    """How ``train.train_model`` trains a small CNN or ViT (Adam, cross-entropy)."""

    arch: Arch = "cnn"
    epochs: int = 20
    batch: int = 64
    lr: float = 2e-3
    width: int = 32
    """CNN: channels of the last two conv layers (the first has half); ViT: model width."""
    depth: int = 2
    """ViT blocks (the CNN always has three conv layers and one hidden dense layer)."""
    heads: int = 4
    patch: int = 4
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_number_fields(self, integer="a whole number")
        if self.arch not in ("cnn", "vit"):
            raise MechscopeError(f"--arch {self.arch!r} is not a model; use cnn or vit.")
        if self.epochs < 1 or self.batch < 1:
            raise MechscopeError("--epochs and --batch must be at least 1.")
        check_lr(self.lr)
        if self.width < 4 or self.depth < 1 or self.heads < 1:
            raise MechscopeError("--width must be at least 4, --depth and --heads at least 1.")
        if self.arch == "vit" and self.width % self.heads:
            raise MechscopeError(f"--width {self.width} is not divisible by --heads {self.heads}; pick a width that is.")
        if self.arch == "vit" and self.data.size % self.patch:
            raise MechscopeError(f"--patch {self.patch} does not divide the image size {self.data.size}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = self.data.to_dict()
        return d


@dataclass
class CircuitConfig:
    """How ``circuit.find_circuit`` selects a circuit and ``causal`` tests it.

    Selection: from the output down, k units per layer maximising the summed attribution
    |sum over the unit's elements of activation x d(downstream unit)/d(activation)| to the
    units already chosen one layer up, averaged over the concept's images (the first layer
    down attributes to the concept's logit). Ablation replaces a unit by its mean over the
    reference images (``mean``) or by 0 (``zero``).
    """

    k: int = 5
    ablation: Ablation = "mean"
    n_concept: int = 64
    """Concept images used for the attribution (the first n)."""
    n_reference: int = 256
    """Reference images (clean test images of every class) whose mean replaces an ablated unit."""
    random_draws: int = 10
    """Random circuits (k units per layer each) the pruning test compares against."""
    baseline: Literal["zero", "mean"] = "zero"
    """Activation in the attribution: as it is (``zero``, the paper's activation x gradient) or
    minus its mean over the reference images (``mean``: the first-order effect of the mean
    ablation the tests make)."""
    contrast: bool = False
    """Score units by their attribution on the concept's images minus that on clean reference
    images (``circuit.edge_attributions``): the units the concept uses that ordinary images do not."""
    top_images: int = 6
    """Top-activating images kept per unit for the report."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_number_fields(self, integer="a whole number")
        if self.k < 1:
            raise MechscopeError(f"--k {self.k} must be at least 1.")
        if self.ablation not in ("mean", "zero"):
            raise MechscopeError(f"--ablation {self.ablation!r} is not an ablation; use mean or zero.")
        if self.baseline not in ("zero", "mean"):
            raise MechscopeError(f"--baseline {self.baseline!r} is not a baseline; use zero or mean.")
        check_at_least(("n_concept", self.n_concept), ("n_reference", self.n_reference),
                       ("--random-draws", self.random_draws), ("top_images", self.top_images))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_example(dataset: str) -> str:
    """An ``--overlay`` pair that ``dataset`` has: 3,7 for the digits, 1,2 for the five shapes."""
    return "1,2" if dataset == "shapes" else "3,7"


def parse_pair(spec: str | None, dataset: str = "digits") -> tuple[int, int] | None:
    """``--overlay 3,7`` -> (3, 7); None stays None. ``dataset`` picks the example a refusal gives."""
    if spec is None or spec == "":
        return None
    try:
        a, b = (int(x) for x in spec.split(","))
    except ValueError:
        raise MechscopeError(f"--overlay {spec!r} is not a pair of classes; write e.g. {pair_example(dataset)}.") from None
    return a, b
