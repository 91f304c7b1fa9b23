"""The small vision models: a CNN and a ViT in plain torch, whose units are marked by
``Site`` modules (identity layers a hook can read or replace), saved as safetensors + JSON.

Units per site: CNN channels (``conv0..2``, spatially averaged) and hidden dense neurons
(``fc``); ViT patch positions (``patches``: the embedded tokens, position 0 is the class
token), attention heads (``b{i}.attn``, each head's output before the output projection) and
MLP neurons (``b{i}.mlp``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from mechscope.errors import MechscopeError
from mechscope.vision.config import TrainConfig

SCHEMA = 1
KIND = "mechscope-vision-model"
Reduce = Literal["mean", "rms"]


class Site(nn.Identity):
    """Where a layer's units are read and ablated: its output has the units along ``unit_dim``
    (batch first); a unit's scalar activation per image is the mean (``reduce='mean'``) or the
    root mean square (``'rms'``, for signed vectors) of its elements."""

    def __init__(self, unit_dim: int, n_units: int, kind: str, reduce: Reduce = "mean") -> None:
        super().__init__()
        self.unit_dim, self.n_units, self.kind, self.reduce = unit_dim, n_units, kind, reduce

    def unit_sum(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_units): ``x`` summed over every dimension but batch and the unit's."""
        dims = [d for d in range(1, x.ndim) if d != self.unit_dim]
        return x.sum(dim=dims) if dims else x

    def unit_value(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_units): each unit's scalar activation."""
        per = x[0].numel() // self.n_units
        if self.reduce == "rms":
            return (self.unit_sum(x * x) / per + 1e-12).sqrt()
        return self.unit_sum(x) / per


class SmallCNN(nn.Module):
    """Three 3x3 conv layers (ReLU; 2x2 max-pool after the last two), one hidden dense layer, logits."""

    def __init__(self, n_classes: int, size: int, width: int) -> None:
        super().__init__()
        w0 = max(2, width // 2)
        self.c0, self.c1, self.c2 = nn.Conv2d(1, w0, 3, padding=1), nn.Conv2d(w0, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * (size // 4) ** 2, 2 * width)
        self.out = nn.Linear(2 * width, n_classes)
        self.sites = nn.ModuleDict({"conv0": Site(1, w0, "channel"), "conv1": Site(1, width, "channel"),
                                    "conv2": Site(1, width, "channel"), "fc": Site(1, 2 * width, "neuron")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, s, s) -> (batch, n_classes)
        s = self.sites
        h = s["conv0"](torch.relu(self.c0(x)))
        h = nn.functional.max_pool2d(s["conv1"](torch.relu(self.c1(h))), 2)
        h = nn.functional.max_pool2d(s["conv2"](torch.relu(self.c2(h))), 2)
        h = s["fc"](torch.relu(self.fc(h.flatten(1))))
        return self.out(h)


class Block(nn.Module):
    """A pre-norm transformer block whose heads and MLP neurons are sites."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.ln1, self.qkv, self.o = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.attn = Site(2, heads, "head", "rms")
        self.mlp = Site(2, 2 * d, "neuron")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, d)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, self.dh).unbind(2)  # each (b, t, h, dh)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k).div(math.sqrt(self.dh)).softmax(-1)
        z = self.attn(torch.einsum("bhqk,bkhd->bqhd", att, v))  # (b, t, h, dh)
        x = x + self.o(z.reshape(b, t, d))
        return x + self.fc2(self.mlp(nn.functional.gelu(self.fc1(self.ln2(x)))))


class SmallViT(nn.Module):
    """Patch embedding + class token + learned positions, ``depth`` blocks, logits from the class token."""

    def __init__(self, n_classes: int, size: int, width: int, depth: int, heads: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        n_tok = (size // patch) ** 2 + 1
        self.embed = nn.Linear(patch * patch, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, n_tok, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln, self.out = nn.LayerNorm(width), nn.Linear(width, n_classes)
        sites: dict[str, Site] = {"patches": Site(1, n_tok, "patch", "rms")}
        for i, blk in enumerate(self.blocks):
            sites[f"b{i}.attn"], sites[f"b{i}.mlp"] = cast(Block, blk).attn, cast(Block, blk).mlp
        self.site_map = sites

    @property
    def sites(self) -> dict[str, Site]:
        return self.site_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, s, s) -> (batch, n_classes)
        b, p = x.shape[0], self.patch
        tok = x.unfold(2, p, p).unfold(3, p, p).reshape(b, -1, p * p)  # (b, patches, p*p), row-major
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(tok)], 1) + self.pos
        h = self.site_map["patches"](h)
        for blk in self.blocks:
            h = blk(h)
        return self.out(self.ln(h[:, 0]))


def sites_of(model: nn.Module) -> dict[str, Site]:
    """The model's sites in forward order (name -> ``Site``)."""
    return dict(cast("dict[str, Site]", model.sites).items())


def build_model(cfg: TrainConfig, n_classes: int) -> nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.arch == "cnn":
        return SmallCNN(n_classes, cfg.data.size, cfg.width)
    return SmallViT(n_classes, cfg.data.size, cfg.width, cfg.depth, cfg.heads, cfg.patch)


class VisionModel:
    """A loaded model with what it was trained on: ``net`` (eval mode), ``cfg`` (``TrainConfig``),
    ``classes`` and ``metrics`` (from training)."""

    def __init__(self, net: nn.Module, cfg: TrainConfig, classes: list[str], metrics: dict[str, Any],
                 path: str = "") -> None:
        self.net, self.cfg, self.classes, self.metrics, self.path = net.eval(), cfg, classes, metrics, path

    def __repr__(self) -> str:
        acc = self.metrics.get("test_accuracy")
        return (f"VisionModel({self.cfg.arch} on {self.cfg.data.dataset} {self.size}x{self.size}, {len(self.classes)} classes"
                + (f", test accuracy {acc:.3f}" if isinstance(acc, float) else "") + (f", {self.path!r}" if self.path else "") + ")")

    @property
    def size(self) -> int:
        return self.cfg.data.size

    @property
    def sites(self) -> dict[str, Site]:
        return sites_of(self.net)

    def info(self) -> dict[str, Any]:
        return {"path": self.path, "arch": self.cfg.arch, "classes": self.classes, "train": self.cfg.to_dict(),
                "metrics": self.metrics, "sites": {n: {"kind": s.kind, "n_units": s.n_units} for n, s in self.sites.items()}}

    def save(self, out: str | Path) -> Path:
        """``out/model.safetensors`` + ``out/config.json``."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.net.state_dict().items()}, str(out / "model.safetensors"))
        meta = {"schema_version": SCHEMA, "kind": KIND, "train": self.cfg.to_dict(), "classes": self.classes,
                "metrics": self.metrics}
        (out / "config.json").write_text(json.dumps(meta, indent=2))
        return out


def require_vision_model(vm: Any, who: str) -> None:
    """One sentence when ``vm`` is not a ``VisionModel`` (a path, or a language model)."""
    if isinstance(vm, VisionModel):
        return
    hint = (f"load it first: vm = mechscope.vision.load_vision_model({str(vm)!r})" if isinstance(vm, (str, Path))
            else "load one with mechscope.vision.load_vision_model(path) or train one with mechscope.vision.train_model(...)")
    raise MechscopeError(f"{who} needs a vision model, got a {type(vm).__name__}; {hint}.")


def load_vision_model(path: str | Path) -> VisionModel:
    """A model saved by ``VisionModel.save`` (safetensors only; nothing is unpickled)."""
    from safetensors.torch import load_file

    from mechscope.vision.config import DataConfig

    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise MechscopeError(f"{p} is not a vision model folder (config.json + model.safetensors); "
                             "make one with `mechscope vision train --out DIR`.")
    try:
        meta = json.loads((p / "config.json").read_text())
        if meta.get("kind") != KIND:
            raise ValueError
        train = dict(meta["train"])
        data = DataConfig.from_dict(train.pop("data"))
        cfg = TrainConfig(**train, data=data)
        classes = list(meta["classes"])
    except MechscopeError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MechscopeError(f"{p / 'config.json'} is not a mechscope vision model config; retrain the model.") from None
    net = build_model(cfg, len(classes))
    try:
        state = load_file(str(p / "model.safetensors"))
        check_float_state(state, net.state_dict(), p / "model.safetensors")
        net.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise MechscopeError(f"{p / 'model.safetensors'} does not fit its config.json ({msg}); retrain the model.") from None
    return VisionModel(net, cfg, classes, meta.get("metrics", {}), str(p))


def check_float_state(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse (one sentence) a tensor of whole numbers where the model holds floats: ``load_state_dict``
    would cast it silently (a model re-saved as int16 loads, then every figure it gives is NaN)."""
    for key, t in state.items():
        if key in want and want[key].is_floating_point() and not t.is_floating_point():
            raise MechscopeError(f"{where} holds {t.dtype} values in {key}, so the model is unusable; its weights must be "
                                 "floating point: retrain the model or re-save it as float32.")
