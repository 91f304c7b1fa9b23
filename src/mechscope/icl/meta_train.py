"""Train the meta-learning model (``icl.meta_model``) on its sequences (``icl.meta_data``)
with checkpoints on the toy runs' log-spaced schedule (``heads.train.schedule``).

1. Each step draws a fresh batch from a generator seeded by ``seed + 1``; the loss is the
   cross-entropy of the query's label. Adam (default; minutes on a CPU) or plain SGD (the
   paper's schedule: lr 0.01, batch 128, 4e5 steps, for a GPU).
2. At every scheduled step the weights go to ``out/ckpt_{step:06d}/model.safetensors`` with
   the settings in ``config.json``, and the held-out accuracy (fixed sequences from seed
   ``10_000 + seed``; also with random context labels) is logged in ``out/train.json``.
3. Resume: ``out/last/state.safetensors`` holds the model's and the optimiser's tensors and the
   generator's state (the step and the optimiser's hyperparameters in its JSON metadata; no
   pickle); rerunning with the same ``out`` and settings continues exactly where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from mechscope.errors import MechscopeError, check_config, step_or_diverge
from mechscope.heads.train import check_finite, check_loss, diverged, resume_run, save_state, schedule, write_log
from mechscope.icl.meta_config import MetaConfig
from mechscope.icl.meta_data import MetaBatch, MetaData
from mechscope.icl.meta_model import MetaModel
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import whole_folder, write_json

WEIGHTS = "model.safetensors"


def make_optimizer(model: MetaModel, cfg: MetaConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def accuracy(model: MetaModel, b: MetaBatch, chunk: int = 1024) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the query's label over the batch."""
    hits, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(b.target), chunk):
            logits = model(b.x[s : s + chunk], b.labels[s : s + chunk])
            hits += int((logits.argmax(-1) == b.target[s : s + chunk]).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, b.target[s : s + chunk], reduction="sum"))
    return hits / len(b.target), loss / len(b.target)


def load_checkpoint(folder: str | Path) -> MetaModel:
    """The model saved in a checkpoint folder (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    d = Path(folder)
    try:
        cfg = MetaConfig.from_dict(json.loads((d / "config.json").read_text()))
        state = load_file(str(d / WEIGHTS))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MechscopeError(f"'{d}' is not a checkpoint of `mechscope train-toy --setting icml` ({exc}).") from None
    model = MetaModel(cfg)
    model.load_state_dict(state)
    return model.eval()


def train_meta(cfg: MetaConfig | None, out: str | Path, progress: ProgressArg = False) -> Path:
    """Train, saving checkpoints into ``out``; returns ``out``. Resumes from ``out/last``.
    ``cfg=None`` trains with ``MetaConfig()``'s defaults."""
    check_config(cfg, MetaConfig, "train_meta")
    cfg = cfg or MetaConfig()
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = MetaData(cfg.data)
    eval_gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    held_out = data.batch(cfg.n_eval, eval_gen)
    held_out_random = data.batch(cfg.n_eval, eval_gen, random_labels=True)
    torch.manual_seed(cfg.seed)
    model = MetaModel(cfg)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    log: dict = {"settings": cfg.to_dict(), "checkpoints": [], "train_loss": [], "chance": 1 / cfg.data.n_labels,
                 "one_over_tasks": 1 / cfg.data.tasks}
    last = out / "last"
    start, log, done = resume_run(out, cfg.to_dict(), model, opt, gen, log)
    if done:
        return out
    sched = set(schedule(cfg.steps, cfg.n_checkpoints, cfg.linear_checkpoints))
    t0, before = time.perf_counter(), log.get("seconds", 0.0)  # seconds of training before this resume

    def checkpoint(step: int) -> None:
        check_finite(model, step)
        d = out / f"ckpt_{step:06d}"
        with whole_folder(d) as tmp:  # written whole, then renamed into place
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
            write_json(tmp / "config.json", cfg.to_dict())
        model.eval()
        acc, loss = accuracy(model, held_out)
        acc_random, _ = accuracy(model, held_out_random)
        model.train()
        log["checkpoints"] = [c for c in log["checkpoints"] if c["step"] != step]
        log["checkpoints"].append({"step": step, "dir": d.name, "accuracy": acc, "random_label_accuracy": acc_random,
                                   "eval_loss": loss, "seconds": before + time.perf_counter() - t0})
        log["seconds"] = before + time.perf_counter() - t0

    model.train()
    if start == 0:
        checkpoint(0)
    bar = as_progress(progress).phase("training", total=cfg.steps, unit="step", initial=start)
    for step in range(start + 1, cfg.steps + 1):
        b = data.batch(cfg.batch, gen)
        loss = torch.nn.functional.cross_entropy(model(b.x, b.labels), b.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step_or_diverge(opt, lambda: diverged(step, "the optimiser's step overflowed float32"))
        log["train_loss"].append([step, check_loss(loss, step)])
        bar.advance(loss=log["train_loss"][-1][1])
        if step in sched:
            checkpoint(step)
            save_state(model, opt, gen, step, last, out, log)
    bar.close()
    log["seconds"] = before + time.perf_counter() - t0
    log["done"] = True
    write_log(out, log)
    shutil.rmtree(last, ignore_errors=True)
    return out
