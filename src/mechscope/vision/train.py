"""Train a small CNN or ViT on a ``DataConfig`` in seconds on a CPU (Adam, cross-entropy,
random shifts), and measure what the experiments need (clean accuracy, attack success).

    from mechscope.vision import TrainConfig, DataConfig, train_model
    vm = train_model(TrainConfig(arch="cnn", data=DataConfig(overlay=(3, 7), mark_class=0)), out="cnn")

Training is short (seconds to a minute), so it keeps no checkpoint: a killed run is rerun.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mechscope.errors import MechscopeError, check_config, refuse_file_as_folder
from mechscope.progress import ProgressArg, as_progress
from mechscope.vision.config import TrainConfig
from mechscope.vision.data import Dataset, build_dataset, random_shift
from mechscope.vision.models import VisionModel, build_model


@torch.no_grad()
def predict(net: torch.nn.Module, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Logits (n, n_classes) of ``images`` (n, 1, s, s), in batches."""
    return torch.cat([net(images[i:i + batch]) for i in range(0, len(images), batch)])


def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(net, images).argmax(-1) == labels).float().mean())


def measure(vm: VisionModel, ds: Dataset) -> dict[str, float]:
    """Clean test accuracy; with a mark, the attack success rate (share of marked test images
    of the other classes predicted as the mark's class)."""
    m: dict[str, float] = {"test_accuracy": accuracy(vm.net, ds.test.images, ds.test.labels)}
    if ds.cfg.mark_class is not None:
        att = ds.attack_images()
        m["attack_success"] = float((predict(vm.net, att.images).argmax(-1) == ds.cfg.mark_class).float().mean())
    return m


def check_out_folder(out: str | Path) -> None:
    """One sentence, before any training, when ``out`` (the folder the model is saved to) is an
    existing file or lies under one, or already holds a trained model (circuits and reports made
    from that model would no longer match it)."""
    refuse_file_as_folder(out, "out")
    if (Path(out) / "model.safetensors").is_file():
        raise MechscopeError(f"{out} already holds a trained vision model; save to a new folder (or delete that one to "
                             "train again).")


def train_model(cfg: TrainConfig | None = None, out: str | Path | None = None, progress: ProgressArg = False) -> VisionModel:
    """Train a model on ``cfg.data`` and (with ``out``) save it there; returns it loaded in eval mode.
    ``progress`` sees one "training" phase of ``cfg.epochs`` epochs with each epoch's mean loss.
    ``cfg=None`` trains ``TrainConfig()``'s default (a CNN on the digits)."""
    check_config(cfg, TrainConfig, "train_model")
    cfg = cfg or TrainConfig()
    if out is not None:
        check_out_folder(out)
    t0 = time.perf_counter()
    ds = build_dataset(cfg.data)
    net = build_model(cfg, cfg.data.n_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * (-(-len(ds.train) // cfg.batch)))
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = ds.train.images, ds.train.labels
    bar = as_progress(progress).phase("training", total=cfg.epochs, unit="epoch")
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), cfg.batch):
            idx = perm[i:i + cfg.batch]
            loss = torch.nn.functional.cross_entropy(net(random_shift(x[idx], cfg.data.shift, gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.advance(loss=total / len(y))
    bar.close()
    net.eval()
    vm = VisionModel(net, cfg, ds.classes, {})
    vm.metrics = {**measure(vm, ds), "train_accuracy": accuracy(net, x, y), "train_seconds": round(time.perf_counter() - t0, 2),
                  "n_train": len(ds.train), "n_test": len(ds.test)}
    if out is not None:
        vm.save(out)
        vm.path = str(out)
    return vm
