"""Train an SAE or transcoder from a stream of activations, with checkpoints and exact resume.

What the trainer does (each a known good practice of the field's trainers):
- inputs scaled to an average norm of sqrt(d_in) (scale estimated on the first batches) and the
  scale folded back into the weights at save, so the saved SAE reads raw activations;
- decoder bias initialised at the geometric median of a sample (mean for transcoder outputs);
- decoder rows kept at unit norm (gradient component along each row removed before a step);
- Adam with linear learning-rate warm-up and linear decay over the last ``lr_decay`` fraction;
- ReLU: L1 penalty (on |f| times decoder norms) warmed up linearly, dead features resampled
  towards badly reconstructed inputs; TopK / BatchTopK: AuxK loss on dead latents (Gao et al.);
  JumpReLU: L0 penalty through a straight-through estimator with a rectangle kernel
  (Rajamanoharan et al.);
- checkpoints every ``checkpoint_every`` tokens (written to a temporary folder then renamed,
  so a SIGKILL mid-write leaves the previous checkpoint intact). ``resume=True`` restores
  weights, optimiser, counters, random state and the data source's position, so the resumed
  run continues exactly as an uninterrupted one would (tested).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.sae.io import save_sae
from mechscope.sae.model import ARCHITECTURES, SAE, SAEConfig

CKPT_DIR = "checkpoint"


class BatchSource(Protocol):
    """Where activations come from: ``next_batch(n)`` gives ``[n, d_in]`` (or, for a transcoder,
    a pair ``([n, d_in], [n, d_out])``); ``state_dict`` / ``load_state_dict`` let a resumed run
    continue at the same place in the data."""

    def next_batch(self, n: int) -> Tensor | tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    """How to train. Widths: ``d_sae`` or ``expansion * d_in``."""

    architecture: str = "topk"
    d_sae: int | None = None
    expansion: int = 8
    k: int = 32
    l1: float = 5.0  # relu: L1 coefficient (inputs normalised to norm sqrt(d_in))
    l0: float = 0.02  # jumprelu: L0 coefficient
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    tokens: int = 2_000_000
    batch_tokens: int = 4096
    lr: float = 4e-4
    lr_warmup: float = 0.02  # fraction of steps
    lr_decay: float = 0.2  # fraction of steps at the end decayed linearly to 0
    l1_warmup: float = 0.05  # fraction of steps
    aux_k: int | None = None  # topk/batchtopk: latents in the AuxK loss (default d_in // 2)
    aux_coef: float = 1 / 32
    dead_tokens: int = 500_000  # a latent is dead if it has not fired in this many tokens
    resample_every: int | None = None  # relu: steps between dead-feature resamplings (default ~ 1/5 run)
    checkpoint_every: int = 250_000  # tokens
    seed: int = 0
    norm_batches: int = 8  # batches used to estimate the input scale
    device: str = "cpu"
    log_every: int = 20  # steps

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise MechscopeError(f"unknown SAE architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}.")
        if self.tokens < self.batch_tokens:
            raise MechscopeError(f"--tokens {self.tokens} is less than one batch ({self.batch_tokens} tokens); train on more tokens.")
        if self.batch_tokens <= 0 or self.checkpoint_every <= 0:
            raise MechscopeError("batch size and checkpoint interval must be positive.")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens


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


class _StepSTE(torch.autograd.Function):
    """Heaviside H(pre - theta); gradient to theta through a rectangle kernel of width eps."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: ANN001
        pre, theta = ctx.saved_tensors
        k = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype) / ctx.eps
        return None, -(k * g).sum(0), None


class _JumpSTE(torch.autograd.Function):
    """pre * H(pre - theta): exact gradient to pre where active; to theta via the kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: ANN001
        pre, theta = ctx.saved_tensors
        active = (pre > theta).to(pre.dtype)
        k = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype) / ctx.eps
        return g * active, (-theta * k * g).sum(0), None


def _sparse_weight_grad(idx: Tensor, g: Tensor, xc: Tensor, d_sae: int) -> Tensor:
    """sum over tokens b and slots j of g[b, j] * xc[b], added into row idx[b, j]: [d_sae, d_in].
    A sparse-dense product, ~5x faster than the dense [d_in, batch] @ [batch, d_sae] it replaces
    (measured on this CPU at batch 4096, d_in 576, d_sae 4608, k 32)."""
    b, k = idx.shape
    rows = torch.arange(b, device=idx.device).repeat_interleave(k)
    gt = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), g.reshape(-1), (d_sae, b), check_invariants=False)
    return torch.sparse.mm(gt, xc)


class _TopKEncode(torch.autograd.Function):
    """TopK encoding of ``x - b_dec`` (b_dec None for a transcoder) that also returns, for
    AuxK, the top ``k_aux`` pre-activations among dead latents. Its backward touches only the
    selected entries: W_enc's gradient is a sparse product instead of a dense GEMM over all
    d_sae columns, b_enc's an index_add, b_dec's ``-W_enc @ grad(b_enc)``."""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor | None, w_enc: Tensor, b_enc: Tensor, k: int, dead: Tensor | None, k_aux: int):  # noqa: ANN001
        xc = x - b_dec if b_dec is not None else x
        pre = torch.addmm(b_enc, xc, w_enc)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        if dead is not None and k_aux > 0:
            avals, aidx = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        else:
            avals, aidx = xc.new_zeros((xc.shape[0], 0)), idx.new_zeros((xc.shape[0], 0))
        ctx.save_for_backward(xc, w_enc, idx, aidx)
        ctx.has_b_dec = b_dec is not None
        ctx.mark_non_differentiable(idx, aidx)
        return vals, idx, avals, aidx

    @staticmethod
    def backward(ctx, g_vals: Tensor, _gi, g_avals: Tensor, _ga):  # noqa: ANN001
        xc, w_enc, idx, aidx = ctx.saved_tensors
        d_sae = w_enc.shape[1]
        idx_all, g_all = idx, g_vals
        if aidx.shape[1] and g_avals is not None:
            idx_all, g_all = torch.cat([idx, aidx], 1), torch.cat([g_vals, g_avals], 1)
        g_all = torch.nan_to_num(g_all, nan=0.0, posinf=0.0, neginf=0.0)
        g_b = torch.zeros(d_sae, dtype=g_all.dtype, device=g_all.device).index_add_(0, idx_all.reshape(-1), g_all.reshape(-1))
        g_w = _sparse_weight_grad(idx_all, g_all, xc, d_sae).T if ctx.needs_input_grad[2] else None
        g_bdec = -(w_enc @ g_b) if ctx.has_b_dec and ctx.needs_input_grad[1] else None
        return None, g_bdec, g_w, g_b, None, None, None


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
        progress: Callable[[dict[str, float]], None] | None = None,
    ):
        self.source, self.cfg, self.out = source, cfg, Path(out)
        self.progress = progress
        d_sae = cfg.d_sae or cfg.expansion * d_in
        self.sae_cfg = SAEConfig(
            d_in=d_in, d_sae=d_sae, architecture=cfg.architecture,
            k=cfg.k if cfg.architecture in ("topk", "batchtopk") else None,
            hook_name=hook_name, model_name=model_name, d_out=d_out, hook_name_out=hook_name_out,
            metadata={"seed": cfg.seed, **(metadata or {})},
        )
        torch.manual_seed(cfg.seed)
        self.sae = SAE(self.sae_cfg).to(cfg.device)
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
            else:
                self.sae.b_dec.copy_(_geometric_median(sample))
            if cfg.architecture == "jumprelu":
                self.sae.threshold.fill_(cfg.jumprelu_init_threshold)

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

    def _l1_coef(self) -> float:
        return self.cfg.l1 * self._warm()

    # ----------------------------------------------------------------- one step
    def _dead_mask(self) -> Tensor:
        return (self.tokens - self.last_fired) >= self.cfg.dead_tokens

    def _train_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        cfg, sae = self.cfg, self.sae
        arch = cfg.architecture
        aux = torch.zeros((), device=x.device)
        bags: tuple[Tensor, Tensor, Tensor | None] | None = None  # sparse code: (vals, idx, offsets)
        aux_code: tuple[Tensor, Tensor] | None = None
        pre = sae.pre_acts(x) if arch != "topk" else None
        if arch == "relu":
            f = torch.relu(pre)
            sparsity = self._l1_coef() * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
        elif arch == "topk":
            dead = self._dead_mask()
            k_aux = min(cfg.aux_k or x.shape[1] // 2, int(dead.sum()))
            b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input and not sae.cfg.is_transcoder else None
            vals, idx, avals, aidx = _TopKEncode.apply(x, b_dec, sae.W_enc, sae.b_enc, cfg.k, dead if k_aux else None, k_aux)
            bags = (vals.relu(), idx, None)
            aux_code = (avals, aidx) if k_aux else None
            sparsity = aux
        elif arch == "batchtopk":
            flat = pre.relu().flatten()
            vals, idx = flat.topk(cfg.k * x.shape[0], sorted=True)
            rows, cols = idx // pre.shape[1], idx % pre.shape[1]
            order = rows.argsort(stable=True)  # group the kept entries by token for embedding_bag
            counts = torch.bincount(rows, minlength=x.shape[0])
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
            bags = (vals[order], cols[order], offsets)
            with torch.no_grad():  # inference threshold: running mean of the smallest kept value
                pos = vals[vals > 0]
                if pos.numel():
                    m = pos.min()
                    if self.step == 0:
                        sae.threshold.fill_(float(m))
                    else:
                        sae.threshold.mul_(0.99).add_(0.01 * m)
            sparsity = aux
        else:  # jumprelu
            theta = sae.threshold
            f = _JumpSTE.apply(pre, theta, cfg.jumprelu_bandwidth)
            l0 = _StepSTE.apply(pre, theta, cfg.jumprelu_bandwidth).sum(-1).mean()
            sparsity = self._warm() * cfg.l0 * l0
        if bags is not None:
            # TopK codes have k non-zeros per token: decoding by gathering the k decoder rows
            # (embedding_bag) instead of a dense [batch, d_sae] @ [d_sae, d] product skips
            # (1 - k/d_sae) of the decoder's forward and backward work.
            v, i, off = bags
            y_hat = F.embedding_bag(i.reshape(-1) if off is not None else i, sae.W_dec, off, mode="sum", per_sample_weights=v.reshape(-1) if off is not None else v) + sae.b_dec
        else:
            y_hat = sae.decode(f)
        err = y - y_hat
        mse = err.pow(2).sum(-1).mean()
        if arch == "batchtopk" and self._dead_mask().any():
            dead = self._dead_mask()
            k_aux = min(cfg.aux_k or x.shape[1] // 2, int(dead.sum()))
            aux_code = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        if aux_code is not None:  # AuxK: dead latents reconstruct the main code's error
            va, ia = aux_code
            e_hat = F.embedding_bag(ia, sae.W_dec, mode="sum", per_sample_weights=va.relu())
            e = err.detach()
            aux = cfg.aux_coef * (e - e_hat).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-8)
            aux = torch.nan_to_num(aux)
        loss = mse + sparsity + aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        self.opt.step()
        sae.set_decoder_unit_norm()
        if arch == "jumprelu":
            with torch.no_grad():
                sae.threshold.clamp_(min=1e-4)
        n = x.shape[0]
        self.tokens += n
        with torch.no_grad():
            if bags is not None:
                v, i, _ = bags
                active = v.detach().reshape(-1) > 0
                self.last_fired[i.reshape(-1)[active]] = self.tokens
                l0 = float(active.sum()) / n
            else:
                self.last_fired[(f > 0).any(0)] = self.tokens
                l0 = float((f > 0).sum(-1).float().mean())
            var = (y - y.mean(0)).pow(2).sum(-1).mean()
            return {
                "loss": float(loss), "mse": float(mse), "fvu": float(mse / var.clamp_min(1e-8)),
                "l0": l0, "aux": float(aux),
                "dead": float(self._dead_mask().float().mean()) if self.tokens >= cfg.dead_tokens else float("nan"),
                "lr": self._lr(),
            }

    @torch.no_grad()
    def _resample(self, x: Tensor, y: Tensor) -> int:
        """ReLU: point dead features at inputs the SAE reconstructs worst (Anthropic 2023)."""
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
        meta = {
            "step": self.step, "tokens": self.tokens, "scale_in": self.scale_in, "scale_out": self.scale_out,
            "train_config": asdict(self.cfg), "sae_config": self.sae_cfg.to_dict(),
            "source": self.source.state_dict() if hasattr(self.source, "state_dict") else None,
            "log": self.log.rows,
        }
        return tensors, meta

    def save_checkpoint(self) -> Path:
        """Atomically replace ``out/checkpoint`` with the current state."""
        tensors, meta = self._ckpt_state()
        final = self.out / CKPT_DIR
        tmp = self.out / f".{CKPT_DIR}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
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

    def load_checkpoint(self) -> bool:
        """Restore from ``out/checkpoint`` (or the previous one if a kill hit the swap)."""
        ck = self.out / CKPT_DIR
        if not (ck / "state.json").is_file():
            old = self.out / f".{CKPT_DIR}.old"
            if (old / "state.json").is_file():
                ck = old
            else:
                return False
        meta = json.loads((ck / "state.json").read_text())
        if meta["sae_config"]["d_sae"] != self.sae_cfg.d_sae or meta["sae_config"]["architecture"] != self.sae_cfg.architecture:
            raise MechscopeError(
                f"the checkpoint in {ck} is a {meta['sae_config']['architecture']} SAE with d_sae={meta['sae_config']['d_sae']}, "
                f"not the {self.sae_cfg.architecture} with d_sae={self.sae_cfg.d_sae} asked for; resume with the same settings or use a new --out."
            )
        tensors = load_file(str(ck / "state.safetensors"))
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        # Rebuild Adam state in the optimiser's own structure.
        for n, p in self.sae.named_parameters():
            st = {key.split(".", 2)[2]: v.to(p.device) for key, v in tensors.items() if key.startswith(f"opt.{n}.")}
            if st:
                if "step" in st:
                    st["step"] = st["step"].cpu()
                self.opt.state[p] = st
        self.last_fired = tensors["last_fired"].to(self.cfg.device)
        torch.set_rng_state(tensors["rng_cpu"])
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.scale_in, self.scale_out = meta["scale_in"], meta["scale_out"]
        self.log.rows = meta.get("log", [])
        if meta.get("source") is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(meta["source"])
        return True

    # ----------------------------------------------------------------- run
    def run(self, resume: bool = False, stop_after_steps: int | None = None) -> SAE:
        """Train to the end (or ``stop_after_steps`` steps, for tests) and save the SAE."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.load_checkpoint()
        if resume and not resumed and (self.out / "cfg.json").exists():
            raise MechscopeError(f"{self.out} already holds a finished SAE and no checkpoint; nothing to resume (use a new --out to train again).")
        if not resume and (self.out / CKPT_DIR).exists():
            raise MechscopeError(f"{self.out} holds a checkpoint of an earlier run; add --resume to continue it, or choose a new --out.")
        if not resumed:
            self._initialise()
        resample_every = cfg.resample_every or max(50, cfg.steps // 5)
        next_ckpt = (self.tokens // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        t0, tok0 = time.perf_counter(), self.tokens
        done_here = 0
        while self.step < cfg.steps:
            x, y = self._batch()
            stats = self._train_step(x, y)
            self.step += 1
            done_here += 1
            if cfg.architecture == "relu" and self.step % resample_every == 0 and self.step < 0.8 * cfg.steps and self.tokens >= cfg.dead_tokens:
                stats["resampled"] = self._resample(x, y)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                stats.update(step=self.step, tokens=self.tokens, tok_per_s=(self.tokens - tok0) / max(1e-9, time.perf_counter() - t0))
                self.log.rows.append(stats)
                if self.progress:
                    self.progress(stats)
            if self.tokens >= next_ckpt and self.step < cfg.steps and not self.pending:
                self.save_checkpoint()
                next_ckpt += cfg.checkpoint_every
            if stop_after_steps is not None and done_here >= stop_after_steps:
                return self.sae
        return self.finish()

    def folded(self) -> SAE:
        """A copy of the SAE that reads raw activations (input/output scales folded in)."""
        sae = SAE(self.sae_cfg).to(self.cfg.device)
        sae.load_state_dict(self.sae.state_dict())
        with torch.no_grad():
            sae.W_enc.mul_(self.scale_in)
            if self.sae_cfg.is_transcoder:
                sae.W_dec.div_(self.scale_out)
                sae.b_dec.div_(self.scale_out)
            else:
                sae.W_dec.div_(self.scale_in)
                sae.b_dec.div_(self.scale_in)
        sae.cfg.metadata.update(
            {"trained_tokens": self.tokens, "input_scale_folded": self.scale_in, "train_config": asdict(self.cfg)}
        )
        return sae

    def finish(self) -> SAE:
        sae = self.folded()
        save_sae(sae, self.out)
        (self.out / "training_log.json").write_text(json.dumps(self.log.rows))
        shutil.rmtree(self.out / CKPT_DIR, ignore_errors=True)
        return sae
