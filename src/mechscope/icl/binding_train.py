"""Train a small GPT-2 on variable-binding programs (``icl.binding_data``), loss on the
answer token only, with the toy trainer's log-spaced checkpoints and exact resume
(``heads.train``: the schedule and the safetensors resume state are shared).

Each checkpoint ``out/ckpt_{step:06d}/`` is a Hugging Face folder (``load_model`` reads it)
plus ``binding.json`` (the data settings, so a checkpoint alone can be evaluated);
``out/train.json`` holds the settings (``setting: "binding"``), the checkpoint list with the
held-out answer loss and accuracy, and the per-step training loss.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from mechscope.errors import check_config
from mechscope.heads.train import (
    check_finite,
    optimiser_step,
    resume_run,
    save_checkpoint_dir,
    save_state,
    schedule,
    write_log,
)
from mechscope.icl import binding_data as bd
from mechscope.icl.binding_config import BindingConfig
from mechscope.progress import ProgressArg, as_progress

DATA_FILE = "binding.json"


def make_model(cfg: BindingConfig):
    """A GPT-2 (learned positions, LayerNorm, MLPs, untied unembedding) sized by ``cfg``."""
    import transformers

    torch.manual_seed(cfg.seed)
    hf_cfg = transformers.GPT2Config(
        vocab_size=len(bd.vocabulary(cfg.data)), n_positions=bd.seq_len(cfg.data), n_embd=cfg.d_model,
        n_layer=cfg.layers, n_head=cfg.heads, n_inner=4 * cfg.d_model, bos_token_id=0, eos_token_id=0,
        pad_token_id=None, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(hf_cfg)


def answer_loss(model, tokens: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer at the last position; tokens [n, pos], answers [n]."""
    logits = model(tokens).logits[:, -1]  # [n, vocab]
    return torch.nn.functional.cross_entropy(logits, answers)


def _eval(model, tokens: torch.Tensor, answers: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(tokens).logits[:, -1]
        loss = float(torch.nn.functional.cross_entropy(logits, answers))
        acc = float((logits.argmax(-1) == answers).float().mean())
    return loss, acc


def train_binding(cfg: BindingConfig | None, out: str | Path, progress: ProgressArg = False) -> Path:
    """Train, saving checkpoints into ``out``; returns ``out``. Resumes from ``out/last``.
    ``cfg=None`` trains with ``BindingConfig()``'s defaults."""
    check_config(cfg, BindingConfig, "train_binding")
    cfg = cfg or BindingConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = bd.BindingData(cfg.data)
    eval_tokens, eval_answers = bd.encode(cfg.data, data.held_out(cfg.n_eval, 10_000 + cfg.seed))
    tok = bd.make_tokenizer(cfg.data)
    model = make_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    log: dict = {"settings": cfg.to_dict(), "checkpoints": [], "train_loss": []}
    last = out / "last"
    start, log, done = resume_run(out, cfg.to_dict(), model, opt, gen, log)
    if done:
        return out
    sched = set(schedule(cfg.steps, cfg.n_checkpoints, cfg.linear_checkpoints))
    t0 = time.perf_counter()
    before = float(log.get("elapsed", 0.0))  # training seconds of earlier sessions of this run

    def elapsed() -> float:
        return before + time.perf_counter() - t0

    def checkpoint(step: int) -> None:
        check_finite(model, step)
        d = save_checkpoint_dir(out / f"ckpt_{step:06d}", model, tok,
                                {DATA_FILE: json.dumps({"setting": cfg.setting, "data": cfg.to_dict()["data"]})})
        model.eval()
        loss, acc = _eval(model, eval_tokens, eval_answers)
        model.train()
        log["checkpoints"] = [c for c in log["checkpoints"] if c["step"] != step]
        log["elapsed"] = elapsed()
        log["checkpoints"].append({"step": step, "dir": d.name, "eval_loss": loss, "eval_accuracy": acc,
                                   "seconds": log["elapsed"]})

    model.train()
    if start == 0:
        checkpoint(0)
    bar = as_progress(progress).phase("training", total=cfg.steps, unit="step", initial=start)
    for step in range(start + 1, cfg.steps + 1):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup, 1))
        x, y = data.batch(cfg.batch, gen)
        loss = answer_loss(model, x, y)
        optimiser_step(opt, params, loss, step, log, bar)
        if step in sched:
            checkpoint(step)
            save_state(model, opt, gen, step, last, out, log)
    bar.close()
    log["seconds"] = log["elapsed"] = elapsed()
    log["done"] = True
    write_log(out, log)
    shutil.rmtree(last, ignore_errors=True)
    return out
