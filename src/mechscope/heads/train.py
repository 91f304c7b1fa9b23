"""Train a small (by default 2-layer, attention-only) transformer on CPU, with checkpoints at a
log-spaced schedule, to watch induction heads form (Olsson et al. 2022, "In-context Learning
and Induction Heads"; Singh et al. 2024, "What needs to go right for an induction head?").

1. Data: ``heads.toydata`` (bigram Markov chains with copied spans; a held-out set of
   ``n_eval`` sequences is drawn once from its own seed).
2. Model: a Hugging Face ``GPT2LMHeadModel`` (learned positions, LayerNorm, untied
   unembedding). ``attn_only`` zeroes every MLP's weights and biases and freezes them, so the
   MLPs output exactly 0 and the model is attention-only while staying a standard
   architecture that ``mechscope.models.load_model`` (and TransformerLens's bridge) loads.
3. AdamW, linear warm-up then constant learning rate; each step one fresh batch.
4. At every step of the log-spaced schedule (step 0 included; plus evenly spaced steps, so a
   late phase change is resolved too) the model is saved to
   ``out/ckpt_{step:06d}/`` (``config.json`` + ``model.safetensors`` + tokenizer), so
   ``load_model(out/ckpt_000123)`` works, and its held-out loss is logged. ``out/train.json``
   holds the settings, the checkpoint list and the per-step training loss.
5. Resume: rerunning with the same ``out`` continues from ``out/last/`` (model + optimizer
   state + data generator state) when it exists.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import MechscopeError, check_config, step_or_diverge
from mechscope.heads.config import ToyConfig
from mechscope.heads.toydata import ToyData
from mechscope.progress import PhaseHandle, ProgressArg, as_progress, transformers_bars_off
from mechscope.results import sweep_temporaries, whole_folder

BOS = "<bos>"


def schedule(steps: int, n: int, n_linear: int = 0) -> list[int]:
    """Step 0, ``n`` log-spaced steps from 1 to ``steps`` and ``n_linear`` evenly spaced ones
    (duplicates merged)."""
    if steps < 1:
        return [0]
    pts = {0, steps}
    for i in range(n):
        pts.add(int(round(math.exp(math.log(steps) * i / max(n - 1, 1)))))
    for i in range(1, n_linear + 1):
        pts.add(int(round(steps * i / n_linear)))
    return sorted(p for p in pts if p <= steps)


def make_tokenizer(vocab: int):
    """A word-level tokenizer: ``<bos>`` = 0, ``t1``..``t{vocab}`` = 1..vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {BOS: 0, **{f"t{i}": i for i in range(1, vocab + 1)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=BOS)


def make_model(cfg: ToyConfig):
    import transformers

    torch.manual_seed(cfg.seed)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.data.vocab + 1, n_positions=cfg.data.seq_len + 1, n_embd=cfg.d_model,
        n_layer=cfg.layers, n_head=cfg.heads, n_inner=(1 if cfg.attn_only else 4 * cfg.d_model),
        bos_token_id=0, eos_token_id=0, pad_token_id=None, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(hf_cfg)
    if cfg.attn_only:
        for block in model.transformer.h:
            mlp, ln_2 = block.get_submodule("mlp"), block.get_submodule("ln_2")
            for p in list(mlp.parameters()) + list(ln_2.parameters()):
                p.requires_grad_(False)
            for p in mlp.parameters():
                p.zero_()
    return model


def eval_loss(model, tokens: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy on ``tokens`` [n, pos]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens), batch):
            t = tokens[s : s + batch]
            logits = model(t).logits[:, :-1]  # [b, pos-1, vocab]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            count += t[:, 1:].numel()
    return total / count


def save_checkpoint_dir(d: Path, model: Any, tok: Any, extra: dict[str, str] | None = None) -> Path:
    """Save ``model`` and ``tok`` (and ``extra`` text files) as the checkpoint folder ``d``, all at
    once: into a hidden temporary folder beside it, renamed into place when complete (a run
    killed mid-save left a ``ckpt_*`` without its tokenizer, which ``dynamics`` then blamed on a
    missing ``save_pretrained``; session 39): ``results.whole_folder``."""
    with whole_folder(d) as tmp, transformers_bars_off():
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return d


def train_toy(cfg: ToyConfig | None, out: str | Path, progress: ProgressArg = False) -> Path:
    """Train, saving checkpoints into ``out``; returns ``out``. Resumes from ``out/last``.
    ``cfg=None`` trains with ``ToyConfig()``'s defaults."""
    check_config(cfg, ToyConfig, "train_toy")
    cfg = cfg or ToyConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = ToyData(cfg.data)
    eval_tokens = data.batch(cfg.n_eval, torch.Generator().manual_seed(10_000 + cfg.seed))
    tok = make_tokenizer(cfg.data.vocab)
    model = make_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    log: dict = {"settings": cfg.to_dict(), "checkpoints": [], "train_loss": [], "entropy_floor": data.entropy()}
    last = out / "last"
    start, log, done = resume_run(out, cfg.to_dict(), model, opt, gen, log)
    if done:
        return out  # already trained with these settings
    sched = schedule(cfg.steps, cfg.n_checkpoints, cfg.linear_checkpoints)
    t0 = time.perf_counter()

    def checkpoint(step: int) -> None:
        check_finite(model, step)
        d = save_checkpoint_dir(out / f"ckpt_{step:06d}", model, tok)
        model.eval()
        ev = eval_loss(model, eval_tokens)
        model.train()
        log["checkpoints"] = [c for c in log["checkpoints"] if c["step"] != step]
        log["checkpoints"].append({"step": step, "dir": d.name, "eval_loss": ev, "seconds": time.perf_counter() - t0})

    def lr_at(step: int) -> float:
        return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))

    model.train()
    if start == 0:
        checkpoint(0)
    bar = as_progress(progress).phase("training", total=cfg.steps, unit="step", initial=start)
    for step in range(start + 1, cfg.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = data.batch(cfg.batch, gen)  # [batch, 1 + seq_len]
        logits = model(x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        optimiser_step(opt, params, loss, step, log, bar)
        if step in sched:
            checkpoint(step)
            save_state(model, opt, gen, step, last, out, log)
    bar.close()
    log["seconds"] = log.get("seconds", 0.0) + time.perf_counter() - t0
    log["done"] = True
    write_log(out, log)
    shutil.rmtree(last, ignore_errors=True)
    return out


def optimiser_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, step: int, log: dict,
                   bar: PhaseHandle) -> None:
    """One step of a toy run: backpropagate ``loss``, clip the gradient norm to 1, step, and log
    ``[step, loss]`` in ``log["train_loss"]`` and on ``bar`` (the toy trainers share it)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    step_or_diverge(opt, lambda: diverged(step, "the optimiser's step overflowed float32"))
    log["train_loss"].append([step, check_loss(loss, step)])
    bar.advance(loss=log["train_loss"][-1][1])


def check_loss(loss: torch.Tensor, step: int) -> float:
    """The loss as a float, or one sentence when it is not finite (the run diverged: a NaN loss
    trains a model of NaN that nothing downstream would notice)."""
    value = loss.item()
    if not math.isfinite(value):
        raise diverged(step, f"loss {value}")
    return value


def diverged(step: int, why: str) -> MechscopeError:
    """The toy trainers' one sentence for a run that left the finite numbers."""
    return MechscopeError(f"Training diverged at step {step} ({why}); lower --lr and start again in a new --out folder.")


def check_finite(model: torch.nn.Module, step: int) -> None:
    """One sentence instead of saving a model with a non-finite weight (checked before every save)."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise diverged(step, f"{name} is not finite")


STATE_FILE = "state.safetensors"
"""Resume state of a toy run: the model's and the optimiser's tensors and the data generator's
state as safetensors, the optimiser's hyperparameters and the step in its JSON metadata (no
pickle anywhere)."""


def save_state(model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, step: int, last: Path, out: Path,
               log: dict) -> None:
    """Write the resume state to ``last/STATE_FILE`` (atomically) and the run log to ``out/train.json``.
    Shared by every toy setting (induction, icml, binding)."""
    from safetensors.torch import save_file

    check_finite(model, step)
    last.mkdir(exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
    tensors["gen"] = gen.get_state()
    # The run log rides in the state's metadata: one replace commits weights, step and log together
    # (train.json, written next, can lag the state by one checkpoint after a kill; resume reads this one).
    meta = {"step": str(step), "param_groups": json.dumps(sd["param_groups"]), "log": json.dumps(log)}
    tmp = last / (STATE_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(last / STATE_FILE)
    write_log(out, log)


def write_log(out: Path, log: dict) -> None:
    """Write the run log to ``out/train.json`` atomically (a kill mid-write must not leave a
    truncated file, which would stop the run from resuming)."""
    tmp = out / "train.json.tmp"
    tmp.write_text(json.dumps(log))
    tmp.replace(out / "train.json")


def load_state(model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, path: Path) -> tuple[int, dict | None]:
    """Restore what ``save_state`` wrote; returns the step and the run log saved with it (None in
    a state written before the log was saved there). A damaged file, or one written for another
    model or optimiser, is one sentence."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        with safe_open(str(path), "pt") as h:
            meta = h.metadata() or {}
        groups = json.loads(meta["param_groups"])
        step = int(meta["step"])
        log = json.loads(meta["log"]) if "log" in meta else None
        model.load_state_dict({k[len("model."):]: v for k, v in t.items() if k.startswith("model.")})
        state: dict[int, dict] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": groups})
        gen.set_state(t["gen"])
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        raise MechscopeError(f"{path} is not a readable resume state ({exc}); delete {path.parent} to start over.") from None
    return step, log


def _setting_diff(saved: dict, want: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` of each setting that differs (nested settings as ``data.vocab``)."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(saved) | set(want)):
        old, new = saved.get(key), want.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _setting_diff(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append((f"{prefix}{key}", old, new))
    return out


def resume_run(out: Path, settings: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
               log: dict) -> tuple[int, dict, bool]:
    """Where a toy run in ``out`` stands: (first step to train, the run log, finished already).

    A fresh folder gives (0, ``log``, False); a run with the same ``settings`` continues from
    ``out/last`` (model, optimiser and data generator restored) with its saved log; other
    settings or an unreadable ``train.json`` are one sentence. Shared by every toy setting.
    """
    tj, state = out / "train.json", out / "last" / STATE_FILE
    if not tj.is_file():
        # Checkpoints without the run log that names their settings: another run's, which a new
        # run would mix into one folder (``dynamics`` reads every ckpt_*); a sweep found it silent.
        left = state.is_file() or (out.is_dir() and any(p.is_dir() and p.name.startswith("ckpt_") for p in out.iterdir()))
        if left:
            raise MechscopeError(f"'{out}' holds checkpoints of an earlier run but no train.json to say how it was made; "
                                 "pass a new --out folder (or delete that one to start over).")
        return 0, log, False
    try:
        prev = json.loads(tj.read_text())
    except ValueError:
        raise MechscopeError(f"{tj} is not valid JSON; pass a new --out folder.") from None
    if not isinstance(prev, dict) or prev.get("settings") != settings:
        saved = prev.get("settings") if isinstance(prev, dict) else None
        diff = _setting_diff(saved, settings) if isinstance(saved, dict) else []
        if len(diff) == 1:  # as `transcoders train` and `tuned-lens train` say it
            made = "a run made with {}={!r}, not {!r}".format(*diff[0])
        elif diff:
            made = "a run made with " + ", ".join(f"{k}={o!r} (not {n!r})" for k, o, n in diff)
        else:
            made = "a run with other settings"
        raise MechscopeError(f"'{out}' holds {made}; pass a new --out folder or the same settings to resume.")
    if prev.get("done"):
        return 0, prev, True
    # A kill mid-write leaves a temporary file: pid-tagged ones (checkpoint configs) would outlive
    # the rerun, so they go now; the fixed-name state/log ones are overwritten by its next save.
    sweep_temporaries(out)
    if state.is_file():
        step, saved = load_state(model, opt, gen, state)
        return step, saved if saved is not None else prev, False
    return 0, log, False
