"""Train a tuned lens on a CPU in minutes: a closed-form start, then a short KL fine-tune.

    from mechscope.lens.config import TunedLensTrainConfig
    from mechscope.lens.tuned_train import train_tuned_lens
    lens = train_tuned_lens(model, "embedded", TunedLensTrainConfig(tokens=24_000), out="tl-dir")

Belrose et al. train every translator by SGD on KL(final || translated) over ~250M tokens on
GPUs. Here:

1. **One harvest for all layers.** Contexts of the corpus's train split (packed as every
   mechscope harvest, first position dropped) run through the model once per
   ``forward_contexts`` contexts; each forward captures the residual stream at every
   translator's hook and the final residual (``ln_final.hook_in``). The model never runs per
   layer, and it runs only in this stage.
2. **Closed-form start, streamed.** The final norm (RMSNorm or LayerNorm) ignores the scale of
   its input, so a translator only has to reproduce the final residual's *direction*. With
   ``r = scale(h)`` (the final norm's own scale of h), ``x = h / r`` and ``z = y / scale(y)``
   for the final residual y, ``norm(h + A h + b) = norm(x + A x + b / r)``, and the closed form
   solves the ridge least squares ``min sum_t ||x_t + A x_t + b / r_t - z_t||^2 + lam ||A||^2``
   over the regressors ``[x_t, 1 / r_t]`` (every position weighs the same, whatever its norm).
   Per layer it accumulates the (d+1) x (d+1) Gram matrix and the (d+1) x d cross term, in
   float64, batch by batch (memory does not grow with ``tokens``), then solves once. Fitting
   the logits instead, ``||(norm(...) - norm(y)) W_U||^2``, gives the same unpenalised solution:
   an affine map of shared regressors has one least-squares solution under any positive
   definite metric on its outputs, so the unembedding's metric drops out.
   Measured on the embedded model (8,000 train tokens, 512 held-out tokens, 2-core CPU under
   load 15): the closed form alone lowers the held-out KL at every layer, 12.47 -> 1.44 nats on
   average, 9.7-12.2x lower at layers 10-20; top-1 agreement with the model 0.14 -> 0.37 at
   layer 15. 40 KL steps of 16 positions (lr 1e-4) on top lower it at every layer again, to
   1.29 nats on average (11.1-13.7x lower than the logit lens at layers 10-20).
3. **KL fine-tune.** ``kl_tokens`` positions of stage 1 (a seeded sample over everything read)
   keep their residuals at every hook; each Adam step draws ``kl_batch`` of them (seeded
   epochs) and minimises the sum over layers of the mean KL(p_final || q_l) over the full
   vocabulary, where p_final is the model's own distribution there and q_l the translated
   layer's. All layers train from the same cached batch; logits are made ``token_chunk`` rows
   at a time and their gradient flows back chunk by chunk, so memory stays bounded. The
   unembedding matmuls run in ``matmul_dtype`` (``auto``: bfloat16 where the hardware has
   bfloat16 instructions, ~3.5x faster with AMX, float32 elsewhere; softmax and loss in float32); p_final goes through the same path, so a translator whose
   input is the final residual (the last one with ``reads="resid_post"``) gets zero gradient
   and stays exactly the identity.

Checkpoints (safetensors + JSON, never pickle) live in ``out/checkpoint/``: ``stage1.safetensors``
(the closed-form translators and the KL cache, written once) and ``state.safetensors`` +
``state.json`` (translators, Adam moments, the step, the settings), replaced atomically every
``checkpoint_every`` steps (each ``.safetensors`` carries its JSON in its metadata, so one
``os.replace`` commits both; the ``.json`` files are copies to read). Batches are a pure function of (seed, step), so ``resume=True``
ends with exactly the weights of an uninterrupted run (a test compares them with
``torch.equal``). The finished lens is ``out/tuned_lens.{json,safetensors}`` with the training
log in its JSON. The checkpoint folder then holds the final state and stays (unless
``keep_checkpoint=False``), so ``resume=True`` with a larger ``kl_steps`` extends a finished run
to exactly the weights of one run of that many steps; extending without it would need the
closed form again (session 17: a run could not be lengthened once it had finished).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from mechscope.activations.corpus import changed_corpus, corpus_digest, same_corpus
from mechscope.errors import MechscopeError, check_config, step_or_diverge
from mechscope.lens.config import MatmulDtype, TunedLensTrainConfig
from mechscope.lens.tuned import JSON_FILE, TunedLens
from mechscope.models.hooks import FINAL_NORM_IN
from mechscope.models.unembed import FinalNorm, final_norm, unembed_weights
from mechscope.progress import Progress, ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.activations.corpus import Split
    from mechscope.models import Model

CKPT_DIR = "checkpoint"
STAGE1 = "stage1.safetensors"
STATE = "state.safetensors"
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_STAGE1_KEYS = ("tokens", "reads", "corpus", "context_len", "ridge", "kl_tokens", "cache_dtype", "seed")
"""Settings a run resumed from the closed form must share with it."""
_FINGERPRINT = _STAGE1_KEYS + ("kl_batch", "lr", "matmul_dtype")
"""Settings a run resumed from a KL checkpoint must share with it. ``kl_steps`` is not one:
batches depend on the step only, so ``--resume --kl-steps N`` continues (or extends) a run."""


# ---------------------------------------------------------------------------------- stage 1
def _contexts(model: Model, corpus, context_len: int, forward_contexts: int, split: Split, n_rows: int):
    """Batches of token ids [forward_contexts, context_len] covering at least ``n_rows`` rows."""
    from mechscope.activations import get_corpus, pack_contexts

    docs = get_corpus(corpus, split=split) if corpus is None or isinstance(corpus, (str, Path)) else corpus
    n_ctx = -(-n_rows // (context_len - 1))
    batch: list[list[int]] = []
    got = 0
    for ctx in pack_contexts(model.tokenizer, docs, context_len):
        batch.append(ctx)
        got += 1
        if len(batch) == forward_contexts or got == n_ctx:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
        if got == n_ctx:
            return
    if batch:
        yield torch.tensor(batch, dtype=torch.long)
    if got * (context_len - 1) < n_rows:
        raise MechscopeError(f"the corpus holds only {got * (context_len - 1)} positions in its {split} split, fewer "
                             f"than the {n_rows} asked for; lower --tokens or pass a bigger --corpus.")


def harvest_residuals(model, corpus, hooks: list[str], n_rows: int, split: Split = "train", context_len: int = 128,
                      forward_contexts: int = 8):
    """Yield ({hook: [rows, d_model] float32}, rows served before) for ``hooks`` + the final
    residual, one forward pass per batch of contexts of the corpus's ``split``, until
    ``n_rows`` rows have been served (the last batch cut)."""
    from mechscope.activations import StoreConfig
    from mechscope.activations.store import Harvester

    want = list(dict.fromkeys(hooks + [FINAL_NORM_IN]))
    harv = Harvester(model, StoreConfig(hooks=want, context_len=context_len, batch_size=forward_contexts,
                                        buffer_tokens=2 * context_len, skip_first=1))
    served = 0
    for tokens in _contexts(model, corpus, context_len, forward_contexts, split, n_rows):
        rows = harv.run(tokens)
        k = min(n_rows - served, next(iter(rows.values())).shape[0])
        yield {h: t[:k].float() for h, t in rows.items()}, served
        served += k
        if served >= n_rows:
            return


def closed_form(model, corpus, cfg: TunedLensTrainConfig, lens: TunedLens, progress: ProgressArg = False) -> dict[str, torch.Tensor]:
    """Stage 1: fit ``lens``'s translators in closed form (module docstring) and return the
    KL cache {"inputs": [kl_tokens, n_layers, d_model], "final": [kl_tokens, d_model]}."""
    norm = final_norm(model)
    L, D = lens.n_layers, lens.d_model
    hooks = lens.hooks
    gram = torch.zeros(L, D + 1, D + 1, dtype=torch.float64)
    cross = torch.zeros(L, D + 1, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(cfg.seed)
    keep = torch.randperm(cfg.tokens, generator=g)[: cfg.kl_tokens].sort().values  # rows kept for the KL stage
    cdt = _DTYPES[cfg.cache_dtype]
    cache_in = torch.empty(cfg.kl_tokens, L, D, dtype=cdt)
    cache_final = torch.empty(cfg.kl_tokens, D, dtype=cdt)
    bar = as_progress(progress).phase("closed form", total=cfg.tokens, unit="tok")
    for rows, start in harvest_residuals(model, corpus, hooks, cfg.tokens, "train", cfg.context_len, cfg.forward_contexts):
        # the batch's products run where the model does (a GPU's float32 GEMMs; on a GPU the same
        # products on the CPU held the closed form to ~5k tokens/s) and are summed in float64 here
        y = rows[FINAL_NORM_IN]  # [n, D]
        n = y.shape[0]
        z = y / norm.scale(y)
        for l, h in enumerate(hooks):
            x_raw = rows[h]
            r = norm.scale(x_raw)  # [n, 1]
            x = x_raw / r
            X = torch.cat([x, 1.0 / r], 1)  # [n, D + 1]
            gram[l] += (X.T @ X).double().cpu()
            cross[l] += (X.T @ (z - x)).double().cpu()
        sel = keep[(keep >= start) & (keep < start + n)]
        if len(sel):
            j = torch.searchsorted(keep, sel)
            idx = (sel - start).to(y.device)
            cache_in[j] = torch.stack([rows[h][idx] for h in hooks], 1).to(cdt).cpu()
            cache_final[j] = y[idx].to(cdt).cpu()
        bar.advance(n)
    bar.close()
    eye = torch.eye(D + 1, dtype=torch.float64)
    eye[D, D] = 1e-6  # the bias is (almost) unpenalised
    with torch.no_grad():
        for l in range(L):
            lam = cfg.ridge * float(gram[l].diagonal()[:D].mean())
            B = torch.linalg.solve(gram[l] + lam * eye, cross[l])  # [(D + 1), D]: rows A^T then b
            lens.weight[l] = B[:D].T.float()
            lens.bias[l] = B[D].float()
    return {"inputs": cache_in, "final": cache_final}


# ---------------------------------------------------------------------------------- stage 2
class _Decoder:
    """Final norm + unembedding (+ the model's logit soft-cap) with the unembedding in ``dtype``:
    logits [n, d_vocab] float32."""

    def __init__(self, model, dtype: torch.dtype, device):
        W_U, b_U = unembed_weights(model)
        self.norm: FinalNorm = final_norm(model)
        self.W = W_U.to(device, dtype)
        self.b = None if b_U is None else b_U.to(device)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = (self.norm(x).to(self.dtype) @ self.W).float()
        return self.norm.cap(out + self.b if self.b is not None else out)


def _cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 matmul instructions (Linux ``/proc/cpuinfo`` flags ``amx_bf16``
    or ``avx512_bf16``); False where the flags cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def resolve_matmul_dtype(name: MatmulDtype, device) -> MatmulDtype:
    """``auto`` -> bfloat16 on a GPU or a CPU with bfloat16 instructions, else float32 (see
    ``TunedLensTrainConfig.matmul_dtype`` for the measurement); other names pass through."""
    if name != "auto":
        return name
    return "bfloat16" if torch.device(device).type == "cuda" or _cpu_has_bf16() else "float32"


def _checkpoint_matmul_dtype(out: Path) -> MatmulDtype | None:
    """The matmul dtype a checkpointed KL stage in ``out`` ran with (None: no KL state yet), so that
    ``auto`` resumes with it whatever hardware resumes."""
    path = out / CKPT_DIR / STATE
    if not path.is_file():
        return None
    try:
        return _saved_meta(path)["settings"]["matmul_dtype"]
    except Exception:  # noqa: BLE001 - a damaged state is reported by the resume itself
        return None


def _batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Rows of the KL cache for ``step``: consecutive slices of seeded per-epoch permutations."""
    out, perms = [], {}
    for g in range(step * batch, (step + 1) * batch):
        epoch, j = divmod(g, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch + 1))
        out.append(int(perms[epoch][j]))
    return torch.tensor(out)


def kl_step(lens: TunedLens, dec: _Decoder, h: torch.Tensor, y: torch.Tensor, chunk: int, layers: list[int]) -> torch.Tensor:
    """Backpropagate sum over ``layers`` of mean over positions of KL(p_final || q_l) for h [n,
    len(layers), d_model] (read at those layers' hooks) and final residuals y [n, d_model];
    returns the per-layer KL [len(layers)]."""
    n, L, _ = h.shape
    with torch.no_grad():
        lp = torch.cat([dec(y[s:s + chunk]).log_softmax(-1) for s in range(0, n, chunk)])  # [n, V]
    W, b = lens.weight[layers], lens.bias[layers]  # views: gradients reach the parameters
    t = (h + torch.einsum("nli,loi->nlo", h, W) + b).reshape(n * L, -1)  # row i * L + l: position i, layers[l]
    leaf = t.detach().requires_grad_(True)
    pos = torch.arange(n, device=h.device).repeat_interleave(L)
    kl_rows = torch.empty(n * L, device=h.device)
    for s in range(0, n * L, chunk):
        lq = dec(leaf[s:s + chunk]).log_softmax(-1)
        p_log = lp[pos[s:s + chunk]]
        kl = (p_log.exp() * (p_log - lq)).sum(-1)  # [chunk]
        (kl.sum() / n).backward()
        kl_rows[s:s + chunk] = kl.detach()
    t.backward(leaf.grad)
    return kl_rows.reshape(n, L).mean(0)


# ---------------------------------------------------------------------------------- the run
def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> None:
    """Commit ``tensors`` and ``meta`` (JSON, in the file's metadata) with one ``os.replace``, so a
    kill leaves the old checkpoint or the new one, never one file's tensors with another's step;
    ``path`` with ``.json`` for ``.safetensors`` is a copy for people to read."""
    from safetensors.torch import save_file

    text = json.dumps(meta)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"json": text})
    os.replace(tmp, path)
    _atomic_write(path.with_suffix(".json"), text)


def _saved_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {})["json"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Run:
    def __init__(self, model, corpus, cfg: TunedLensTrainConfig, out: Path | None, progress: Progress):
        self.model, self.corpus, self.cfg, self.out, self.progress = model, corpus, cfg, out, progress
        self.lens = TunedLens.identity(model, cfg.reads)
        self.opt = torch.optim.Adam(self.lens.parameters(), lr=cfg.lr)
        self.step = 0
        self.log: list[dict[str, Any]] = []
        self.seconds = {"closed_form": 0.0, "kl": 0.0}
        self.cache: dict[str, torch.Tensor] | None = None
        self._digest: tuple[str | None] | None = None

    def corpus_digest(self) -> str | None:
        """What the corpus's train split holds (``Corpus.digest``), so a resume notices an edited file."""
        if self._digest is None:
            from mechscope.activations import get_corpus

            docs = get_corpus(self.corpus, split="train") if self.corpus is None or isinstance(self.corpus, (str, Path)) else self.corpus
            self._digest = (corpus_digest(docs),)
        return self._digest[0]

    @property
    def ckpt(self) -> Path:
        assert self.out is not None
        return self.out / CKPT_DIR

    def fingerprint(self, keys: tuple[str, ...] = _FINGERPRINT) -> dict[str, Any]:
        d = self.cfg.to_dict()
        out = {"model": self.model.summary.name, "model_fingerprint": self.model.fingerprint(), **{k: d[k] for k in keys}}
        if "corpus" in keys:
            out["corpus_digest"] = self.corpus_digest()
        return out

    def save_stage1(self) -> None:
        if self.out is None:
            return
        self.ckpt.mkdir(parents=True, exist_ok=True)
        assert self.cache is not None  # stage 1 saves after closed_form filled it
        _atomic_save({"weight": self.lens.weight, "bias": self.lens.bias, **self.cache}, self.ckpt / STAGE1,
                     {"settings": self.fingerprint(_STAGE1_KEYS), "seconds": self.seconds})

    def save_state(self) -> None:
        if self.out is None:
            return
        t = {"weight": self.lens.weight, "bias": self.lens.bias}
        for name, p in (("weight", self.lens.weight), ("bias", self.lens.bias)):
            for k, v in self.opt.state.get(p, {}).items():
                t[f"opt.{name}.{k}"] = v if v.dim() else v.reshape(1)
        _atomic_save(t, self.ckpt / STATE, {"step": self.step, "settings": self.fingerprint(), "log": self.log,
                                             "seconds": self.seconds})

    def _check_settings(self, saved: dict[str, Any]) -> None:
        want = self.fingerprint(tuple(k for k in saved if k not in ("model", "model_fingerprint", "corpus_digest")))
        for key, old in saved.items():
            if key == "corpus_digest":  # recorded after the corpus's name, so a renamed corpus is named first
                if old and want.get(key) and old != want[key]:  # a checkpoint from before it was recorded has none
                    raise changed_corpus(str(self.ckpt), self.cfg.corpus or "embedded")
                continue
            if key == "model_fingerprint" and old != want[key]:  # a checkpoint from before it was recorded has none
                raise MechscopeError(f"the checkpoint in {self.ckpt} was made with another model also called "
                                     f"{self.model.summary.name} (its weights differ); resume with that model or use a new --out.")
            if want.get(key) != old and not (key == "corpus" and same_corpus(old, want.get(key))):
                if key == "cache_dtype":  # no option of its own: the CLI sets it from --matmul-dtype
                    flag = {"float32": "float32"}  # any other --matmul-dtype caches in bfloat16
                    was, now = flag.get(str(old), "auto or bfloat16"), flag.get(str(want.get(key)), "auto or bfloat16")
                    raise MechscopeError(f"the checkpoint in {self.ckpt} was made with --matmul-dtype {was}, not {now} (its "
                                         f"activation cache is {old}); resume with --matmul-dtype {was} or use a new --out.")
                raise MechscopeError(f"the checkpoint in {self.ckpt} was made with {key}={old!r}, not {want.get(key)!r}; "
                                     "resume with the same settings or use a new --out.")

    def load(self) -> str:
        """Restore what the checkpoint holds: 'state', 'stage1' or 'none'."""
        from safetensors.torch import load_file

        if not (self.ckpt / STAGE1).is_file():
            return "none"
        meta = _saved_meta(self.ckpt / STAGE1)
        self._check_settings(meta["settings"])
        t = load_file(str(self.ckpt / STAGE1))
        self.cache = {"inputs": t["inputs"], "final": t["final"]}
        self.seconds = meta["seconds"]
        with torch.no_grad():
            self.lens.weight.copy_(t["weight"])
            self.lens.bias.copy_(t["bias"])
        if not (self.ckpt / STATE).is_file():
            return "stage1"
        st = _saved_meta(self.ckpt / STATE)
        self._check_settings(st["settings"])
        t = load_file(str(self.ckpt / STATE))
        dev = self.lens.weight.device
        with torch.no_grad():
            self.lens.weight.copy_(t["weight"])
            self.lens.bias.copy_(t["bias"])
        for name, p in (("weight", self.lens.weight), ("bias", self.lens.bias)):
            s = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"opt.{name}.")}
            if s:
                s = {k: (v.reshape(()) if k == "step" else v.to(dev)) for k, v in s.items()}
                self.opt.state[p] = s
        self.step, self.log, self.seconds = st["step"], st["log"], st["seconds"]
        if not self.lens.is_finite():
            raise MechscopeError(f"the checkpoint in {self.ckpt} holds NaN or inf translators (its run diverged); train "
                                 "again with a lower --lr and a new --out.")
        if self.step > self.cfg.kl_steps:
            raise MechscopeError(f"the checkpoint in {self.ckpt} is at KL step {self.step}, beyond --kl-steps {self.cfg.kl_steps}; "
                                 "resume with at least that many steps.")
        return "state"

    def diverged(self) -> MechscopeError:
        """The one sentence for a KL step that left non-finite translators (or could not be taken)."""
        return MechscopeError(f"the KL fine-tune diverged at step {self.step + 1} (the translators became NaN or inf), so no "
                              f"tuned lens was saved; lower --lr (it was {self.cfg.lr:g}) and train again with a new --out.")

    def trained_layers(self) -> list[int]:
        """Translators the KL stage trains: all but one whose input is the final residual (it is
        the identity exactly, from the closed form; its KL gradient is rounding noise, which
        Adam's normalisation would turn into steps of size ``lr``)."""
        last = self.lens.n_layers - 1
        return [l for l in range(self.lens.n_layers) if not (self.cfg.reads == "resid_post" and l == last)]

    def run(self, resume: bool) -> TunedLens:
        cfg = self.cfg
        got = self.load() if resume else "none"
        if got == "none":
            t0 = time.perf_counter()
            self.cache = closed_form(self.model, self.corpus, cfg, self.lens, self.progress)
            self.seconds["closed_form"] = time.perf_counter() - t0
            if not self.lens.is_finite():
                raise MechscopeError("the closed-form fit gave NaN or inf translators (the model's residual streams on this "
                                     "corpus are not finite); check the model on a few prompts or pass another --corpus.")
            self.save_stage1()
        dev = self.model.device
        dec = _Decoder(self.model, _DTYPES[cfg.matmul_dtype], dev)
        t0, s0 = time.perf_counter(), self.seconds["kl"]
        layers = self.trained_layers()
        cache = self.cache
        assert cache is not None  # loaded or computed by stage 1 above
        bar = self.progress.phase("KL fine-tune", total=cfg.kl_steps, unit="step", initial=self.step)
        while self.step < cfg.kl_steps and layers:
            idx = _batch_indices(self.step, cfg.kl_batch, cfg.kl_tokens, cfg.seed)
            h = cache["inputs"][idx][:, layers].to(dev).float()
            y = cache["final"][idx].to(dev).float()
            self.opt.zero_grad(set_to_none=True)
            kl = kl_step(self.lens, dec, h, y, cfg.token_chunk, layers)
            step_or_diverge(self.opt, self.diverged)
            if not (self.lens.is_finite() and bool(torch.isfinite(kl).all())):
                raise self.diverged()
            self.step += 1
            self.seconds["kl"] = s0 + time.perf_counter() - t0
            row = {"step": self.step, "kl_mean": float(kl.mean()), "kl": [round(float(v), 5) for v in kl]}
            self.log.append(row)
            bar.advance(kl=float(kl.mean()))
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.kl_steps:
                self.save_state()
        bar.close()
        self.lens.info = {"source": "mechscope tuned-lens train", "settings": cfg.to_dict(),
                          "training": {"seconds": self.seconds, "kl_log": self.log, "kl_layers": self.trained_layers(),
                                       "method": "closed-form ridge least squares on norm-scaled residuals, then "
                                                 "Adam on KL(final || translated) over the full vocabulary"}}
        if self.out is not None:
            if cfg.keep_checkpoint:
                self.save_state()
            self.lens.save(self.out)
            if not cfg.keep_checkpoint:
                shutil.rmtree(self.ckpt, ignore_errors=True)
        return self.lens


def train_tuned_lens(model, corpus=None, cfg: TunedLensTrainConfig | None = None, out: str | Path | None = None, *,
                     resume: bool = False, progress: ProgressArg = False) -> TunedLens:
    """Train a tuned lens for ``model`` (module docstring) and, with ``out``, save it there.

    ``corpus``: a corpus spec (default ``cfg.corpus``, else the embedded corpus; its train
    split) or a ``Corpus``. ``resume=True`` continues the run checkpointed in ``out`` and ends
    with the weights an uninterrupted run would have. Refuses (one sentence): ``resume``
    without a checkpoint; a fresh run into a folder holding a checkpoint or a lens.
    """
    check_config(cfg, TunedLensTrainConfig, "train_tuned_lens")
    cfg = cfg or TunedLensTrainConfig()
    if cfg.matmul_dtype == "auto":  # the settings (and a resume's fingerprint) name the dtype that ran
        ran = _checkpoint_matmul_dtype(Path(out)) if resume and out is not None else None
        cfg = dataclasses.replace(cfg, matmul_dtype=ran or resolve_matmul_dtype("auto", model.device))
    if corpus is None:
        corpus = cfg.corpus
    elif cfg.corpus is None and isinstance(corpus, (str, Path)):
        cfg = TunedLensTrainConfig(**{**cfg.to_dict(), "corpus": str(corpus)})
    out_p = Path(out) if out is not None else None
    if out_p is not None:
        if out_p.exists() and not out_p.is_dir():
            raise MechscopeError(f"{out_p} is a file; --out must name a folder.")
        has_ckpt = (out_p / CKPT_DIR / STAGE1).is_file()
        has_lens = (out_p / JSON_FILE).is_file()
        if resume and not has_ckpt:
            what = "a finished tuned lens without its checkpoint" if has_lens else "no checkpoint"
            raise MechscopeError(f"--resume: {out_p} holds {what} and nothing to resume; use a new --out to train again.")
        if not resume and has_lens:
            hint = " add --resume with a larger --kl-steps to extend it, or" if has_ckpt else ""
            raise MechscopeError(f"{out_p} already holds a tuned lens;{hint} choose a new --out.")
        if not resume and has_ckpt:
            raise MechscopeError(f"{out_p} holds a checkpoint of an earlier run; add --resume to continue it, or choose a new --out.")
    elif resume:
        raise MechscopeError("--resume needs the --out folder of the run to continue.")
    return _Run(model, corpus, cfg, out_p, as_progress(progress)).run(resume)

