"""Train an SAE or transcoder from a stream of activations, with checkpoints and exact resume.

What the trainer does (each a known good practice of the field's trainers):
- inputs scaled to an average norm of sqrt(d_in) (scale estimated on the first batches) and the
  scale folded back into the weights at save, so the saved SAE reads raw activations;
- decoder bias initialised at the geometric median of a sample (mean for transcoder outputs);
- decoder rows kept at unit norm (gradient component along each row removed before a step);
- Adam with linear learning-rate warm-up and linear decay over the last ``lr_decay`` fraction;
- the architecture's own encoding, sparsity and auxiliary losses, from its class in
  ``mechscope.sae.archs`` (ReLU: L1 penalty on |f| times decoder norms, warmed up linearly;
  TopK / BatchTopK: AuxK loss on dead latents (Gao et al.); JumpReLU: L0 penalty through a
  straight-through estimator with a rectangle kernel (Rajamanoharan et al.)); the trainer
  calls its methods and does not branch on its name;
- dead features resampled towards badly reconstructed inputs, for architectures that ask
  (``resamples_dead``: ReLU);
- checkpoints every ``checkpoint_every`` tokens (written to a temporary folder then renamed,
  so a SIGKILL mid-write leaves the previous checkpoint intact). ``resume=True`` restores
  weights, optimiser, counters, random state and the data source's position, so the resumed
  run continues exactly as an uninterrupted one would (tested).

``Trainer`` reads any ``BatchSource``; ``sae_trainer`` / ``train_sae`` feed it a model's
activations, streamed from a corpus or read from harvested shards (what ``mechscope sae
train`` runs).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechscope.activations import ActivationStore, ShardStore, StoreConfig, get_corpus
from mechscope.activations.corpus import changed_corpus, same_corpus
from mechscope.errors import MechscopeError, check_config, refuse_file_as_folder, step_or_diverge
from mechscope.models.check import require_model
from mechscope.models.hooks import check_hook_name, mlp_out, parse_hook
from mechscope.progress import ProgressArg, as_progress
from mechscope.sae.archs import StepState, get_architecture
from mechscope.sae.config import TrainConfig
from mechscope.sae.io import check_vector_hook, hook_width, save_sae
from mechscope.sae.model import SAE, SAEConfig
from mechscope.sae.sources import StoreSource

if TYPE_CHECKING:
    from mechscope.models import Model

CKPT_DIR = "checkpoint"
_RESUME_MAY_CHANGE = ("device", "checkpoint_every", "log_every")
"""``TrainConfig`` fields a resumed run may set otherwise than its checkpoint: they change
where it runs and what it writes along the way, not the weights it ends with."""


class BatchSource(Protocol):
    """Where activations come from: ``next_batch(n)`` gives ``[n, d_in]`` (or, for a transcoder,
    a pair ``([n, d_in], [n, d_out])``); ``state_dict`` / ``load_state_dict`` let a resumed run
    continue at the same place in the data."""

    def next_batch(self, n: int) -> Tensor | tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainLog:
    """What the run printed, kept for the record (one row per ``log_every`` steps)."""

    rows: list[dict[str, float]] = field(default_factory=list)


def _geometric_median(x: Tensor, iters: int = 30) -> Tensor:
    """Weiszfeld's algorithm on rows of x [n, d]."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-6)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < 1e-6 * (y.norm() + 1e-6):
            return y_new
        y = y_new
    return y


class Trainer:
    """One training run; ``run()`` trains to ``cfg.tokens`` and returns the saved SAE."""

    def __init__(
        self,
        source: BatchSource,
        cfg: TrainConfig,
        out: str | Path,
        *,
        d_in: int,
        hook_name: str,
        model_name: str,
        d_out: int | None = None,
        hook_name_out: str | None = None,
        metadata: dict[str, Any] | None = None,
        progress: ProgressArg = False,
    ):
        self.source, self.cfg, self.out = source, cfg, Path(out)
        self.progress = as_progress(progress)
        d_sae = cfg.d_sae or cfg.expansion * d_in
        self.sae_cfg = SAEConfig(
            d_in=d_in, d_sae=d_sae, architecture=cfg.architecture,
            k=cfg.k if get_architecture(cfg.architecture).uses_k else None,
            hook_name=hook_name, model_name=model_name, d_out=d_out, hook_name_out=hook_name_out,
            metadata={"seed": cfg.seed, **(metadata or {})},
        )
        torch.manual_seed(cfg.seed)
        self.sae = SAE(self.sae_cfg).to(cfg.device)
        self.arch = self.sae.arch
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.step = 0
        self.tokens = 0
        self.scale_in = 1.0
        self.scale_out = 1.0
        self.last_fired = torch.zeros(d_sae, dtype=torch.long, device=cfg.device)  # tokens seen at last firing
        self.log = TrainLog()
        self.pending: list[Tensor | tuple[Tensor, Tensor]] = []  # batches used for init, trained on first

    # ----------------------------------------------------------------- data
    def _batch(self) -> tuple[Tensor, Tensor]:
        b = self.pending.pop(0) if self.pending else self.source.next_batch(self.cfg.batch_tokens)
        x, y = b if isinstance(b, tuple) else (b, b)
        x = x.to(self.cfg.device, torch.float32)
        y = y.to(self.cfg.device, torch.float32)
        return x * self.scale_in, y * self.scale_out

    def _initialise(self) -> None:
        """Input scales and decoder bias from the first batches (which are then trained on)."""
        cfg = self.cfg
        self.pending = [self.source.next_batch(cfg.batch_tokens) for _ in range(max(1, min(cfg.norm_batches, cfg.steps)))]
        xs = torch.cat([(b[0] if isinstance(b, tuple) else b).float() for b in self.pending])
        ys = torch.cat([(b[1] if isinstance(b, tuple) else b).float() for b in self.pending])
        self.scale_in = float(math.sqrt(xs.shape[1]) / xs.norm(dim=1).mean().clamp_min(1e-8))
        self.scale_out = float(math.sqrt(ys.shape[1]) / ys.norm(dim=1).mean().clamp_min(1e-8)) if self.sae_cfg.is_transcoder else self.scale_in
        sample = (ys[:4096] * self.scale_out).to(cfg.device)
        with torch.no_grad():
            if self.sae_cfg.is_transcoder:
                self.sae.b_dec.copy_(sample.mean(0))
                if cfg.centre_init:  # the input is not centred (no b_dec on it): centre the pre-activations
                    self.sae.b_enc.copy_(-(xs[:4096] * self.scale_in).to(cfg.device).mean(0) @ self.sae.W_enc)
            else:
                self.sae.b_dec.copy_(_geometric_median(sample))
            self.arch.init_training(self.sae, cfg)

    # ----------------------------------------------------------------- schedule
    def _lr(self) -> float:
        cfg, n = self.cfg, max(1, self.cfg.steps)
        warm = max(1, int(cfg.lr_warmup * n))
        if self.step < warm:
            return cfg.lr * (self.step + 1) / warm
        decay_start = int((1 - cfg.lr_decay) * n)
        if self.step >= decay_start and cfg.lr_decay > 0:
            return cfg.lr * max(0.0, (n - self.step) / max(1, n - decay_start))
        return cfg.lr

    def _warm(self) -> float:
        """Sparsity-penalty warm-up factor, 0 -> 1 over the first ``l1_warmup`` of the steps."""
        warm = max(1, int(self.cfg.l1_warmup * self.cfg.steps))
        return min(1.0, (self.step + 1) / warm)

    # ----------------------------------------------------------------- one step
    def _dead_mask(self) -> Tensor:
        return (self.tokens - self.last_fired) >= self.cfg.dead_window

    def _train_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        cfg, sae, arch = self.cfg, self.sae, self.arch
        st = StepState(cfg=cfg, step=self.step, warm=self._warm(), dead=self._dead_mask())
        code = arch.train_forward(sae, x, st)
        err = y - code.y_hat
        mse = err.pow(2).sum(-1).mean()
        aux = arch.aux_loss(sae, code, err, st)
        loss = mse + code.sparsity + aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        step_or_diverge(self.opt, lambda: self.diverged("the optimiser's step overflowed float32"))
        if not math.isfinite(float(loss.detach())):
            raise self.diverged("the loss is not finite")
        sae.set_decoder_unit_norm()
        arch.after_step(sae, cfg)
        self.tokens += x.shape[0]
        with torch.no_grad():
            fired, l0 = code.fired()
            self.last_fired[fired] = self.tokens
            var = (y - y.mean(0)).pow(2).sum(-1).mean()
            return {
                "loss": float(loss), "mse": float(mse), "fvu": float(mse / var.clamp_min(1e-8)),
                "l0": l0, "aux": float(aux),
                "dead": float(self._dead_mask().float().mean()) if self.tokens >= cfg.dead_window else float("nan"),
                "lr": self._lr(),
            }

    def diverged(self, why: str) -> MechscopeError:
        """The one sentence for a run whose weights left the finite numbers (a learning rate too
        large): saving them would hand on an SAE of NaN that reports nothing wrong."""
        what = "transcoder" if self.sae_cfg.is_transcoder else "SAE"
        return MechscopeError(f"training the {what} on {self.sae_cfg.hook_name} diverged at step {self.step + 1} ({why}), so "
                              f"nothing was saved; lower --lr (it was {self.cfg.lr:g}) and train again with a new --out.")

    def check_finite(self) -> None:
        """Refuse (``diverged``) weights that are not all finite, before they are saved."""
        bad = [n for n, p in self.sae.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise self.diverged(f"{', '.join(bad)} became NaN or infinite")

    @torch.no_grad()
    def _resample(self, x: Tensor, y: Tensor) -> int:
        """Point dead features at inputs the SAE reconstructs worst (Anthropic 2023); for
        architectures with ``resamples_dead`` (ReLU)."""
        dead = self._dead_mask().nonzero().flatten()
        if dead.numel() == 0:
            return 0
        sae = self.sae
        err = (y - sae(x)).pow(2).sum(-1)
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed + self.step)
        pick = torch.multinomial((err / err.sum()).cpu(), dead.numel(), replacement=True, generator=g).to(x.device)
        dirs = y[pick] - sae.b_dec if not self.sae_cfg.is_transcoder else y[pick]
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = ~self._dead_mask()
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = dirs
        src = x[pick] - (sae.b_dec if not self.sae_cfg.is_transcoder else 0)
        sae.W_enc[:, dead] = (src / src.norm(dim=1, keepdim=True).clamp_min(1e-8) * enc_norm * 0.2).T
        sae.b_enc[dead] = 0.0
        for p in (sae.W_enc, sae.W_dec, sae.b_enc):  # fresh Adam moments for the resampled rows
            st = self.opt.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq"):
                    if p is sae.W_enc:
                        st[key][:, dead] = 0
                    else:
                        st[key][dead] = 0
        self.last_fired[dead] = self.tokens
        return int(dead.numel())

    # ----------------------------------------------------------------- checkpoints
    def _ckpt_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in self.sae.state_dict().items()}
        names = {id(p): n for n, p in self.sae.named_parameters()}
        for p, st in self.opt.state.items():
            for key, v in st.items():
                if isinstance(v, Tensor):
                    tensors[f"opt.{names[id(p)]}.{key}"] = v.detach().cpu().contiguous().reshape(v.shape)
        tensors["last_fired"] = self.last_fired.cpu()
        tensors["rng_cpu"] = torch.get_rng_state()
        if hasattr(self.source, "state_tensors"):  # rows a streaming source holds but has not served
            tensors.update({f"source.{k}": v for k, v in self.source.state_tensors().items()})
        meta = {
            "step": self.step, "tokens": self.tokens, "scale_in": self.scale_in, "scale_out": self.scale_out,
            "train_config": asdict(self.cfg), "sae_config": self.sae_cfg.to_dict(),
            "source": self.source.state_dict() if hasattr(self.source, "state_dict") else None,
            "log": self.log.rows,
        }
        return tensors, meta

    def save_checkpoint(self) -> Path:
        """Atomically replace ``out/checkpoint`` with the current state (refused when the weights
        are not finite: the previous checkpoint stays the one to resume from)."""
        self.check_finite()
        tensors, meta = self._ckpt_state()
        final = self.out / CKPT_DIR
        tmp = self.out / f".{CKPT_DIR}.tmp{os.getpid()}"
        self._sweep_partial_checkpoints()
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = self.out / f".{CKPT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def _sweep_partial_checkpoints(self) -> None:
        """Remove the half-written checkpoint folders of this or a killed earlier process (a
        SIGKILL mid-save leaves ``.checkpoint.tmp<its pid>``; one run writes to an ``--out``)."""
        for stale in self.out.glob(f".{CKPT_DIR}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        """Restore from ``out/checkpoint`` (or the previous one if a kill hit the swap)."""
        ck = self.out / CKPT_DIR
        if not (ck / "state.json").is_file():
            old = self.out / f".{CKPT_DIR}.old"
            if (old / "state.json").is_file():
                ck = old
            else:
                return False
        meta = self._read_checkpoint_meta(ck)
        self._check_same_settings(ck, meta)
        damaged = self._damaged(ck)
        try:
            tensors = load_file(str(ck / "state.safetensors"))
            self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
            # Rebuild Adam state in the optimiser's own structure.
            for n, p in self.sae.named_parameters():
                st = {key.split(".", 2)[2]: v.to(p.device) for key, v in tensors.items() if key.startswith(f"opt.{n}.")}
                if st:
                    if "step" in st:
                        st["step"] = st["step"].cpu()
                    self.opt.state[p] = st
            last_fired, rng = tensors["last_fired"], tensors["rng_cpu"]
            if tuple(last_fired.shape) != (self.sae_cfg.d_sae,):
                raise ValueError(f"last_fired has shape {list(last_fired.shape)}")
            torch.set_rng_state(rng)
        except (SafetensorError, OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise MechscopeError(damaged.format(why=f"its tensors do not load: {type(exc).__name__} {first}".strip())) from None
        self.last_fired = last_fired.to(self.cfg.device)
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.scale_in, self.scale_out = meta["scale_in"], meta["scale_out"]
        self.log.rows = meta.get("log", [])
        try:
            if meta.get("source") is not None and hasattr(self.source, "load_state_dict"):
                self.source.load_state_dict(meta["source"])
            if hasattr(self.source, "load_state_tensors"):
                self.source.load_state_tensors({k[len("source."):]: v for k, v in tensors.items() if k.startswith("source.")})
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise MechscopeError(damaged.format(why=f"its data position does not load ({type(exc).__name__}: {exc})")) from None
        return True

    @staticmethod
    def _damaged(ck: Path) -> str:
        """The sentence for a checkpoint that cannot be read, with ``{why}`` to fill in."""
        return (f"the checkpoint in {ck} is damaged ({{why}}), so it cannot be resumed; delete it and train again without "
                "--resume, or use a new --out.")

    def _read_checkpoint_meta(self, ck: Path) -> dict[str, Any]:
        """``state.json`` of checkpoint ``ck``, checked for the keys a resume reads (one sentence
        when it is not JSON or lacks one: a truncated write, an edit)."""
        damaged = self._damaged(ck)
        try:
            meta = json.loads((ck / "state.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MechscopeError(damaged.format(why=f"state.json is not valid JSON: {exc}")) from None
        except OSError as exc:
            raise MechscopeError(damaged.format(why=f"state.json cannot be read: {exc.strerror or exc}")) from None
        if not isinstance(meta, dict):
            raise MechscopeError(damaged.format(why="state.json does not hold a JSON object"))
        for key, kinds in (("step", int), ("tokens", int), ("scale_in", (int, float)), ("scale_out", (int, float)),
                           ("sae_config", dict), ("train_config", dict)):
            v = meta.get(key)
            if isinstance(v, bool) or not isinstance(v, kinds):
                why = f"state.json lacks {key}" if key not in meta else f"state.json holds {key}={v!r}"
                raise MechscopeError(damaged.format(why=why))
        if meta["step"] < 0 or meta["tokens"] < 0 or not all(math.isfinite(meta[k]) and meta[k] > 0 for k in ("scale_in", "scale_out")):
            raise MechscopeError(damaged.format(why="state.json holds a negative count or a scale that is not a positive number"))
        for key in ("d_sae", "architecture"):
            if key not in meta["sae_config"]:
                raise MechscopeError(damaged.format(why=f"state.json's sae_config lacks {key}"))
        if not isinstance(meta["sae_config"].get("metadata", {}), dict):
            raise MechscopeError(damaged.format(why="state.json's sae_config.metadata is not a JSON object"))
        if not isinstance(meta.get("log", []), list):
            raise MechscopeError(damaged.format(why="state.json's log is not a list"))
        return meta

    def _check_same_settings(self, ck: Path, meta: dict[str, Any]) -> None:
        """Refuse (one sentence, naming the first setting that differs) to continue a checkpoint
        made with other settings than this run's: another model (by weights fingerprint, else by
        name), hook, corpus, context length, or training setting (``TrainConfig``, all but where
        the run is and how often it logs and checkpoints), or a module of another shape. Continuing
        it would write an SAE whose cfg.json names this run's settings while its weights were
        trained partly with the checkpoint's."""
        saved_cfg, saved_meta = meta["sae_config"], meta["sae_config"].get("metadata") or {}
        now, now_meta = self.sae_cfg.to_dict(), self.sae_cfg.metadata
        fp_old, fp_new = saved_meta.get("model_fingerprint"), now_meta.get("model_fingerprint")
        if fp_old and fp_new and fp_old != fp_new:  # the weights decide: a moved or renamed folder of the same model still resumes
            raise MechscopeError(
                f"the checkpoint in {ck} was made with model {saved_cfg.get('model_name')!r} (weights fingerprint {fp_old}), "
                f"not {now['model_name']!r} (weights fingerprint {fp_new}); resume with the same settings or use a new --out."
            )
        pairs: list[tuple[str, Any, Any]] = []
        if not (fp_old and fp_new):
            pairs.append(("model", saved_cfg.get("model_name"), now["model_name"]))
        pairs += [(k, saved_cfg.get(k), now[k]) for k in ("hook_name", "hook_name_out")]
        if "shards_digest" in saved_meta and saved_meta["shards_digest"] != now_meta.get("shards_digest"):  # none before it was recorded
            raise MechscopeError(f"the checkpoint in {ck} was trained on other activation shards (another harvest, or a "
                                 "corpus); resume with the same --from-shards folder or use a new --out.")
        for label, key in (("corpus", "dataset_path"), ("context_len", "context_size")):
            if key in saved_meta or key in now_meta:
                pairs.append((label, saved_meta.get(key), now_meta.get(key)))
        saved_train, now_train = meta["train_config"], asdict(self.cfg)
        for f in fields(TrainConfig):
            if f.name in _RESUME_MAY_CHANGE:
                continue
            default = f.default if f.default is not MISSING else None
            pairs.append((f.name, saved_train.get(f.name, default), now_train[f.name]))
        pairs += [(k, saved_cfg.get(k), now[k]) for k in ("architecture", "d_in", "d_out", "d_sae", "k")]
        for key, old, new in pairs:
            if old != new and not (key == "corpus" and same_corpus(old, new)):
                raise MechscopeError(
                    f"the checkpoint in {ck} was made with {key}={old!r}, not {new!r}; resume with the same "
                    "settings or use a new --out."
                )
        d_old, d_new = saved_meta.get("corpus_digest"), now_meta.get("corpus_digest")
        if d_old and d_new and d_old != d_new:  # none before it was recorded
            raise changed_corpus(str(ck), now_meta.get("dataset_path"))

    # ----------------------------------------------------------------- run
    def run(self, resume: bool = False, stop_after_steps: int | None = None) -> SAE:
        """Train to the end (or ``stop_after_steps`` steps, for tests) and save the SAE."""
        cfg = self.cfg
        check_out(self.out, resume)
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.load_checkpoint()
        if resume and not resumed:  # check_out saw a checkpoint that has gone since
            raise MechscopeError(f"nothing to resume in {self.out} (it holds no checkpoint); drop --resume to start a new run.")
        if not resumed:
            self._initialise()
        resample_every = cfg.resample_every or max(50, cfg.steps // 5)
        next_ckpt = (self.tokens // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        t0, tok0 = time.perf_counter(), self.tokens
        done_here = 0
        bar = self.progress.phase("training", total=cfg.steps, unit="step", initial=self.step)
        while self.step < cfg.steps:
            x, y = self._batch()
            stats = self._train_step(x, y)
            self.step += 1
            done_here += 1
            if self.arch.resamples_dead and self.step % resample_every == 0 and self.step < 0.8 * cfg.steps and self.tokens >= cfg.dead_window:
                stats["resampled"] = self._resample(x, y)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                stats.update(step=self.step, tokens=self.tokens, tok_per_s=(self.tokens - tok0) / max(1e-9, time.perf_counter() - t0))
                self.log.rows.append(stats)
                bar.advance(0, l0=stats["l0"], fvu=stats["fvu"], dead=stats["dead"], tokens=self.tokens)
            bar.advance()
            if self.tokens >= next_ckpt and self.step < cfg.steps and not self.pending:
                self.save_checkpoint()
                next_ckpt += cfg.checkpoint_every
            if stop_after_steps is not None and done_here >= stop_after_steps:
                bar.close()
                return self.sae
        bar.close()
        return self.finish()

    def folded(self) -> SAE:
        """A copy of the SAE that reads raw activations (input/output scales folded in)."""
        sae = SAE(self.sae_cfg).to(self.cfg.device)
        sae.load_state_dict(self.sae.state_dict())
        sae.arch.fold_scales(sae, self.scale_in, self.scale_out)  # an SAE's scale_out is its scale_in
        sae.cfg.metadata.update(
            {"trained_tokens": self.tokens, "input_scale_folded": self.scale_in, "train_config": asdict(self.cfg)}
        )
        return sae

    def finish(self) -> SAE:
        self.check_finite()
        sae = self.folded()
        save_sae(sae, self.out)
        (self.out / "training_log.json").write_text(json.dumps(self.log.rows))
        shutil.rmtree(self.out / CKPT_DIR, ignore_errors=True)
        shutil.rmtree(self.out / f".{CKPT_DIR}.old", ignore_errors=True)
        self._sweep_partial_checkpoints()
        return sae


def has_checkpoint(out: str | Path) -> bool:
    """Whether ``out`` holds a checkpoint ``Trainer.run(resume=True)`` can continue from (the
    current one, or the previous one a kill during the swap left)."""
    out = Path(out)
    return any((out / name / "state.json").is_file() for name in (CKPT_DIR, f".{CKPT_DIR}.old"))


def check_out(out: str | Path, resume: bool) -> None:
    """Refuse (one sentence) an ``--out`` a run cannot use: a file; with ``resume``, a folder with
    no checkpoint; without it, a folder holding a checkpoint or a finished SAE (training would
    overwrite it). The CLI calls it before loading the model."""
    out = Path(out)
    refuse_file_as_folder(out)
    finished = (out / "cfg.json").is_file()
    if resume:
        if not out.is_dir():
            raise MechscopeError(f"--resume: {out} does not exist; pass the --out of the run to continue.")
        if not has_checkpoint(out) and finished:
            raise MechscopeError(f"nothing to resume in {out}: it holds a finished SAE and no checkpoint; use a new --out to train again.")
        if not has_checkpoint(out):
            raise MechscopeError(f"nothing to resume in {out} (it holds no checkpoint); drop --resume to start a new run.")
    elif (out / CKPT_DIR).exists():
        raise MechscopeError(f"{out} holds a checkpoint of an earlier run; add --resume to continue it, or choose a new --out.")
    elif finished:
        raise MechscopeError(f"{out} already holds a finished SAE; choose a new --out.")


# --------------------------------------------------------------------- from a model
def transcoder_output_hook(hook: str) -> str:
    """A transcoder's default output for input ``hook`` (e.g. ``blocks.6.ln2.hook_normalized``):
    the MLP output of the same block."""
    layer = parse_hook(hook).layer
    if layer is None:
        raise MechscopeError(f"cannot tell which layer {hook!r} belongs to; pass --hook-out blocks.L.hook_mlp_out as well.")
    return mlp_out(layer)


def sae_trainer(
    model: Model,
    hook: str,
    cfg: TrainConfig | None,
    out: str | Path,
    *,
    hook_out: str | None = None,
    corpus: str | None = None,
    shards: str | Path | None = None,
    context_len: int | None = None,
    metadata: dict[str, Any] | None = None,
    progress: ProgressArg = False,
) -> Trainer:
    """A ``Trainer`` of an SAE on ``model``'s activations at ``hook`` (of a transcoder from
    ``hook`` to ``hook_out`` when that is given; ``transcoder_output_hook`` names the usual one).

    Activations stream from the train split of ``corpus`` (``activations.get_corpus``; default
    the embedded corpus) in contexts of ``context_len`` tokens (default: min(128, the model's
    context), as the CLI's), or come from ``shards`` written
    by ``activations.harvest``. Training runs on the model's device (``cfg.device`` is set to
    it); ``cfg.seed`` also seeds the data order. ``metadata`` is added to the saved SAE's
    metadata (``model_path``, ``context_size``, ``dataset_path``). Call ``.run()`` (with
    ``resume=True`` to continue a checkpointed run in ``out``)."""
    from mechscope.models.load import default_length
    from mechscope.sae.evaluate import check_context_len

    require_model(model, "train_sae")
    check_config(cfg, TrainConfig, "train_sae")
    cfg = cfg or TrainConfig()
    if context_len is None and shards is None:
        context_len = default_length(model, StoreConfig.context_len)
    if context_len is not None:
        check_context_len(context_len, "--context-len (context_len)")
    check_train_device(cfg.device, model)
    cfg = replace(cfg, device=str(model.device))
    hooks = [hook] + ([hook_out] if hook_out else [])
    for h in hooks:
        check_hook_name(model, h)
        check_vector_hook(model, h)
    if shards is not None:
        store: Any = ShardStore(shards, hooks=hooks, seed=cfg.seed, device=cfg.device)
        check_shards_fit(store, model)
        _check_shards_text(store.manifest, shards, corpus, context_len)
    else:
        assert context_len is not None  # defaulted above without shards
        docs = get_corpus(corpus, split="train")
        store = ActivationStore(model, docs, StoreConfig(hooks=hooks, context_len=context_len, seed=cfg.seed))
    dims = store.dims
    name = model.summary.name
    meta = {"model_path": name, "context_size": context_len, "dataset_path": str(corpus) if corpus else "embedded",
            "model_fingerprint": model.fingerprint()}
    if shards is None:  # what the corpus held, so a resume notices an edited file
        meta["corpus_digest"] = docs.digest()
    else:  # the contexts and text the shards were harvested from, and which harvest (a resume must not switch)
        import hashlib

        listing = [(sh["file"], sh["rows"]) for sh in store.manifest["shards"]]
        meta.update(context_size=store.manifest.get("context_len", context_len),
                    dataset_path=str(store.manifest.get("corpus") or "embedded"),
                    shards_digest=hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16])
    meta.update(metadata or {})  # the caller's entries win
    return Trainer(StoreSource(store, hook, hook_out), cfg, out, d_in=dims[hook], d_out=dims[hook_out] if hook_out else None,
                   hook_name=hook, hook_name_out=hook_out, model_name=name, metadata=meta, progress=progress)


def _check_shards_text(manifest: dict[str, Any], shards: Any, corpus: Any, context_len: int | None) -> None:
    """Shards hold their own text and contexts: a corpus or context length given beside them
    must be theirs (the same options as the harvest are fine), never silently ignored."""
    have_corpus = re.sub(r" \[(train|heldout|all)\]$", "", str(manifest.get("corpus") or "embedded"))
    if corpus is not None and not same_corpus(str(corpus), have_corpus):
        raise MechscopeError(f"the shards in {shards} were harvested from the corpus {have_corpus!r}, not {str(corpus)!r}; "
                             "drop --corpus (shards train on their own text) or harvest that corpus.")
    have_len = manifest.get("context_len")
    if context_len is not None and have_len is not None and context_len != have_len:
        raise MechscopeError(f"the shards in {shards} hold contexts of {have_len} tokens, not {context_len}; drop "
                             "--context-len (shards train on their own contexts) or harvest again with it.")


def check_train_device(device: str, model: Model) -> None:
    """Training runs on the model's device: one sentence when ``TrainConfig.device`` was set (left
    at its default "cpu" it names nothing) to another device than the model is on, which would
    otherwise be ignored without a word."""
    if device == "cpu":
        return
    want, have = torch.device(device), model.device
    if want.type != have.type or (want.index is not None and want.index != (have.index or 0)):
        raise MechscopeError(f"TrainConfig.device is {device!r} but the model is on {have}; training runs on the model's "
                             f"device, so load the model there (mechscope.load_model(..., device={device!r})) or leave "
                             "TrainConfig.device out.")


def check_shards_fit(store: ShardStore, model: Model) -> None:
    """One sentence when ``store``'s shards were harvested from another model than ``model`` (by
    the weights fingerprint their manifest records; a manifest written before it did so, by the
    model's name) or hold another width at a hook than ``model`` has there."""
    man, name = store.manifest, model.summary.name
    fp = man.get("model_fingerprint")
    if isinstance(fp, str) and fp:
        if fp != model.fingerprint():
            raise MechscopeError(
                f"the shards in '{store.dir}' were harvested from {man.get('model')!r}, whose weights differ from {name}'s "
                f"(fingerprint {fp} vs {model.fingerprint()}); pass the model they were harvested from with --model, or "
                "harvest again from this one."
            )
    elif man.get("model") != name:
        raise MechscopeError(f"the shards in '{store.dir}' were harvested from {man.get('model')!r}, not {name!r}; pass that "
                             "model with --model, or harvest again from this one.")
    for h, d in store.dims.items():
        w = hook_width(model, h)
        if w is not None and w != d:
            raise MechscopeError(f"the shards in '{store.dir}' hold width {d} at {h}, but {name} has width {w} there; "
                                 "harvest again from this model.")


def train_sae(model: Any, hook: str, cfg: TrainConfig | None, out: str | Path, *, resume: bool = False, **kw: Any) -> SAE:
    """Harvest ``model``'s activations at ``hook`` and train an SAE on them into ``out``
    (``sae_trainer``'s keywords: ``hook_out``, ``corpus``, ``shards``, ``context_len``, ...);
    returns the trained SAE, saved in SAELens layout. ``cfg=None``: ``TrainConfig()``'s defaults."""
    return sae_trainer(model, hook, cfg, out, **kw).run(resume=resume)
