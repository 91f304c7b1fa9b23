"""Train a transcoder set: one transcoder per layer, all from one pass of the model per batch.

    from mechscope.features.config import TranscoderTrainConfig
    from mechscope.features.train import train_transcoders
    tset = train_transcoders(model, TranscoderTrainConfig(tokens=300_000), "runs/tc")

How. One ``ActivationStore`` harvests every selected layer's MLP input
(``blocks.l.ln2.hook_normalized``) and output (``blocks.l.hook_mlp_out``) in the same forward
pass (it stops after the last hooked layer), rows aligned across hooks. ``SharedBatches``
shuffles those rows chunk by chunk and serves the same batches, in the same order, to one
unchanged ``mechscope.sae.train.Trainer`` per layer, each through a ``LayerSource`` that hands
it its layer's two columns. The trainers step in lockstep: batch ``i`` is trained by every
layer before batch ``i + 1`` is read, so a batch is harvested once and dropped once all have
used it. Each trainer is its own run (scales, initialisation, optimiser, AuxK/resampling,
schedule, logs), exactly as ``Trainer.run`` would do it on that layer's rows; a test checks
that a one-layer set equals ``Trainer.run`` on the same source.

Exact resume. Rows are shuffled within chunks of ``shuffle_contexts`` contexts (a seeded
permutation per chunk) rather than through the store's rolling half-refilled buffer, and
batches tile chunks exactly. Checkpoints are taken only at chunk boundaries, where no
harvested row is waiting anywhere: the data position is then just the number of contexts run,
which a resumed run skips by re-tokenising (no model), as ``StoreSource`` does. So after a
SIGKILL, ``resume=True`` ends with the same weights as an uninterrupted run (a test compares
them with ``torch.equal`` when both run with the same thread count). (A single SAE from a
streaming store saves its waiting rows in the checkpoint instead; chunk boundaries keep a set's
checkpoints small, with nothing waiting.)

A checkpoint is a generation folder ``out/checkpoint/step_<n>/`` holding every layer's
``Trainer.save_checkpoint`` (weights, Adam moments, counters, RNG, its reader position) and
``set.json`` (the shared position and the settings); ``out/checkpoint/latest.json`` names the
complete generation and is replaced atomically after the new one is written, so a kill at any
moment leaves one complete generation, whatever the number of layers.

Output (``out``): ``save_transcoders``' two layouts (``layer_<l>/`` SAELens folders,
``config.yaml`` + ``layer_<l>.safetensors`` for circuit-tracer) and ``training_log.json``
(settings, harvest counts, each layer's training log). A run over some layers only writes
their ``layer_<l>/`` folders and the log (circuit-tracer's layout needs every layer).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.activations import ActivationStore, StoreConfig, get_corpus, special_token_ids
from mechscope.activations.config import SINK_TOKEN, TOKENS_KEY
from mechscope.activations.corpus import changed_corpus, corpus_digest, same_corpus
from mechscope.errors import MechscopeError, check_config
from mechscope.features.config import TranscoderTrainConfig
from mechscope.features.transcoder_set import CONFIG, TranscoderSet, check_mlp_input_norm, save_transcoders
from mechscope.models.hooks import ln_normalized, mlp_out
from mechscope.progress import Progress, ProgressArg, as_progress
from mechscope.sae.io import save_sae
from mechscope.sae.model import SAE
from mechscope.sae.sources import StoreSource
from mechscope.sae.train import CKPT_DIR, Trainer

if TYPE_CHECKING:
    from mechscope.models import Model

SCHEMA_VERSION = 1
LOG_FILE = "training_log.json"
LATEST = "latest.json"
SET_STATE = "set.json"
_FINGERPRINT = ("layers", "architecture", "skip", "k", "expansion", "d_sae", "tokens", "lr", "corpus", "context_len",
                "batch_contexts", "forward_contexts", "shuffle_contexts", "seed", "exclude_special", "sink_ratio", "train_options")
"""Settings a resumed run must share with the checkpoint (everything but ``checkpoint_every``)."""
_BEFORE: dict[str, Any] = {"exclude_special": False, "sink_ratio": None}
"""Values of fingerprint settings added later, for checkpoints written before they existed."""


def layer_hooks(layer: int) -> tuple[str, str]:
    """(input, output) hook of layer ``layer``'s transcoder: the MLP's normalised input and its output."""
    return ln_normalized(layer, 2), mlp_out(layer)


class SharedBatches:
    """Row-aligned training batches of several hooks, read from one ``ActivationStore`` and
    served to several readers in step.

    The store runs with ``shuffle=False`` and a fill of ``cfg.fill_contexts`` contexts, so it
    hands over whole forward passes in corpus order and holds nothing between fills. Rows are
    read ``cfg.shuffle_contexts`` contexts at a time (a chunk, ``chunk_rows`` rows), permuted
    by a generator seeded with ``(cfg.seed, chunk index)`` and cut into ``batch_rows``-row
    batches; batch ``i`` is ``{hook: [n, d_hook]}``, views into its chunk (``n = batch_rows``),
    or, given ``exclude`` token ids (``SINK_TOKEN`` among them for a store that marks sinks,
    ``StoreConfig.sink_ratio``), copies without those tokens' rows (``n <= batch_rows``, the
    same rows for every hook). Every
    reader gets batch 0, 1, 2, ... in turn (``get``); a batch is dropped once every reader has
    had it. ``state_dict`` is only taken at a chunk boundary with every reader there.
    """

    def __init__(self, store: ActivationStore, cfg: TranscoderTrainConfig, n_readers: int, exclude: list[int] | None = None):
        if exclude and not store.cfg.with_tokens:
            raise MechscopeError("leaving out tokens' rows needs a store made with with_tokens=True.")
        self.store, self.cfg = store, cfg
        self.exclude = torch.tensor(sorted(exclude), dtype=torch.long) if exclude else None
        self.batch_rows = cfg.batch_rows
        self.fill_rows = store.cfg.buffer_tokens
        self.chunk_rows = cfg.shuffle_contexts * cfg.rows_per_context
        self.per_chunk = cfg.shuffle_contexts // cfg.batch_contexts
        self.chunks = 0  # chunks read so far
        self.cursors = [0] * n_readers  # the next batch of each reader
        self._batches: dict[int, dict[str, Tensor]] = {}

    def get(self, reader: int, n: int) -> dict[str, Tensor]:
        """Reader ``reader``'s next batch ({hook: [m, d]}; ``n`` must be ``batch_rows``, and ``m``
        is ``n`` less the special tokens' and sinks' rows left out)."""
        if n != self.batch_rows:
            raise MechscopeError(f"a shared batch has {self.batch_rows} rows; {n} were asked for.")
        i = self.cursors[reader]
        while i not in self._batches:
            if i < self.chunks * self.per_chunk:
                raise MechscopeError(f"batch {i} was already dropped; the readers of a shared stream must stay in step.")
            self._read_chunk()
        b = self._batches[i]
        self.cursors[reader] = i + 1
        low = min(self.cursors)
        for j in [j for j in self._batches if j < low]:
            del self._batches[j]
        return b

    def _read_chunk(self) -> None:
        rows: dict[str, Tensor] = {}
        for start in range(0, self.chunk_rows, self.fill_rows):
            try:
                part = self.store.next_batch(self.fill_rows)
            except StopIteration:
                raise MechscopeError("the corpus ran out of text before training finished; use a larger corpus or fewer --tokens.") from None
            for h, t in part.items():
                if h not in rows:
                    rows[h] = torch.empty(self.chunk_rows, *t.shape[1:], dtype=t.dtype, device=t.device)
                rows[h][start : start + t.shape[0]] = t
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.chunks)
        perm = torch.randperm(self.chunk_rows, generator=g)
        first = self.chunks * self.per_chunk
        for h in list(rows):
            rows[h] = rows[h][perm.to(rows[h].device)]
        tokens = rows.pop(TOKENS_KEY, None)
        keep = ~torch.isin(tokens, self.exclude.to(tokens.device)) if self.exclude is not None and tokens is not None else None
        for m in range(self.per_chunk):
            sl = slice(m * self.batch_rows, (m + 1) * self.batch_rows)
            batch = {h: t[sl] for h, t in rows.items()}
            if keep is not None and not keep[sl].all():
                if not keep[sl].any():
                    raise MechscopeError("a training batch holds special tokens and attention sinks only; the corpus has no "
                                         "text between its separators, so use another corpus (or a larger --sink-ratio).")
                batch = {h: t[keep[sl]] for h, t in batch.items()}
            self._batches[first + m] = batch
        self.chunks += 1

    def at_boundary(self) -> bool:
        """Every reader has had every batch read so far, which end a chunk: nothing is waiting."""
        return not self._batches and all(c == self.chunks * self.per_chunk for c in self.cursors)

    @property
    def contexts(self) -> int:
        """Contexts run through the model so far."""
        return self.store.tokens_seen // self.store.cfg.context_len

    def state_dict(self) -> dict[str, Any]:
        if not self.at_boundary():
            raise MechscopeError("a shared stream's position can only be saved at a chunk boundary.")
        return {"chunks": self.chunks, "contexts": self.contexts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        StoreSource(self.store, "").load_state_dict({"contexts": int(state["contexts"]), "served": 0})  # skip, no model
        self.chunks = int(state["chunks"])
        self._batches.clear()


class LayerSource:
    """One trainer's view of ``SharedBatches``: its layer's (input, output) columns of each
    shared batch, ``([n, d_in], [n, d_out])``; its position is its reader's cursor."""

    def __init__(self, shared: SharedBatches, reader: int, hook_in: str, hook_out: str):
        self.shared, self.reader, self.hook_in, self.hook_out = shared, reader, hook_in, hook_out

    def next_batch(self, n: int) -> tuple[Tensor, Tensor]:
        b = self.shared.get(self.reader, n)
        return b[self.hook_in], b[self.hook_out]

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.shared.cursors[self.reader]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shared.cursors[self.reader] = int(state["batches"])


def transcoder_sources(model: Any, cfg: TranscoderTrainConfig) -> tuple[SharedBatches, list[LayerSource]]:
    """The shared stream of ``cfg``'s layers (all of ``model``'s when ``cfg.layers`` is None)
    and one ``LayerSource`` per layer, in layer order."""
    layers = check_layers(model, cfg)
    hooks = [h for layer in layers for h in layer_hooks(layer)]
    scfg = StoreConfig(hooks=hooks, context_len=cfg.context_len, batch_size=cfg.forward_contexts,
                       buffer_tokens=cfg.fill_contexts * cfg.rows_per_context, shuffle=False, seed=cfg.seed,
                       with_tokens=cfg.exclude_special or cfg.sink_ratio is not None, sink_ratio=cfg.sink_ratio)
    store = ActivationStore(model, get_corpus(cfg.corpus, split="train"), scfg)
    exclude = (special_token_ids(model.tokenizer) if cfg.exclude_special else []) + ([SINK_TOKEN] if cfg.sink_ratio is not None else [])
    shared = SharedBatches(store, cfg, len(layers), exclude or None)
    return shared, [LayerSource(shared, i, *layer_hooks(layer)) for i, layer in enumerate(layers)]


def check_layers(model: Model, cfg: TranscoderTrainConfig) -> list[int]:
    """``cfg``'s layers, checked against ``model`` (all of them when None)."""
    n = model.summary.n_layers
    layers = list(range(n)) if cfg.layers is None else list(cfg.layers)
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise MechscopeError(f"layer {bad[0]} does not exist; {model.summary.name} has layers 0-{n - 1}.")
    hook = layer_hooks(layers[0])[0] if layers else None
    if hook is not None:
        check_mlp_input_norm(model, hook)
    from mechscope.sae.io import hook_shape

    shape = hook_shape(model, hook) if hook is not None else None
    if shape is not None and len(shape) != 3:  # OPT: the bridge gives ln2's output flattened over positions
        raise MechscopeError(f"transcoders read one vector per token at {hook}, but the bridge gives {model.summary.architecture}'s "
                             f"there as shape {list(shape)} (positions flattened); use a model of another architecture.")
    return layers


class _Run:
    """The lockstep loop over one ``Trainer`` per layer, its checkpoints and its output."""

    def __init__(self, model: Model, cfg: TranscoderTrainConfig, out: Path, model_path: str | None,
                 progress: Progress):
        self.model, self.cfg, self.out, self.progress = model, cfg, out, progress
        self.layers = check_layers(model, cfg)
        self.shared, sources = transcoder_sources(model, cfg)
        dims = self.shared.store.dims
        name = model.summary.name
        meta = {"model_path": model_path or name, "context_size": cfg.context_len, "dataset_path": cfg.corpus or "embedded",
                "transcoder_set_layers": self.layers, "exclude_special": cfg.exclude_special,
                "sink_ratio": cfg.sink_ratio, "model_fingerprint": model.fingerprint(),
                "corpus_digest": corpus_digest(self.shared.store.corpus)}
        self.trainers: list[Trainer] = []
        for layer, src in zip(self.layers, sources):
            hin, hout = layer_hooks(layer)
            # ``Trainer.out`` is pointed at a checkpoint generation's layer folder before each save or load.
            self.trainers.append(Trainer(src, cfg.train_config(layer, str(model.device)), out / CKPT_DIR / f"layer_{layer}",
                                         d_in=dims[hin], d_out=dims[hout], hook_name=hin, hook_name_out=hout,
                                         model_name=name, metadata=meta))
        self.tcfg = self.trainers[0].cfg

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        return {"model": self.model.summary.name, **{k: d[k] for k in _FINGERPRINT}, "layers": self.layers,
                "corpus_digest": corpus_digest(self.shared.store.corpus)}

    def save_checkpoint(self) -> None:
        root = self.out / CKPT_DIR
        step = self.trainers[0].step
        gen = root / f"step_{step:08d}"
        shutil.rmtree(gen, ignore_errors=True)
        for layer, tr in zip(self.layers, self.trainers):
            tr.out = gen / f"layer_{layer}"
            tr.save_checkpoint()
        state = {"step": step, "tokens": self.trainers[0].tokens, "shared": self.shared.state_dict(), "settings": self.fingerprint()}
        _write_synced(gen / SET_STATE, json.dumps(state))
        _write_synced(root / f".{LATEST}.tmp", json.dumps({"generation": gen.name}))
        os.replace(root / f".{LATEST}.tmp", root / LATEST)
        for p in root.iterdir():  # older generations and any half-written one
            if p.is_dir() and p.name != gen.name:
                shutil.rmtree(p, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        root = self.out / CKPT_DIR
        if not (root / LATEST).is_file():
            return False
        try:
            gen = root / str(json.loads((root / LATEST).read_text())["generation"])
            state = json.loads((gen / SET_STATE).read_text())
            settings, shared = state["settings"], state["shared"]
            if not isinstance(settings, dict) or not isinstance(shared, dict):
                raise TypeError("settings and shared state must be objects")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            why = "a file is missing" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            raise MechscopeError(f"the checkpoint in {root} is damaged ({why}); train again with a new --out, or delete "
                                 f"{root} to start this one over.") from None
        want = self.fingerprint()
        saved = {**_BEFORE, **settings}  # a checkpoint older than a setting ran with its old value
        for key in sorted(set(saved) | set(want)):
            old = saved.get(key)
            if key == "corpus_digest":  # checked last (a checkpoint from before it was recorded has none)
                continue
            if want.get(key) != old and not (key == "corpus" and same_corpus(old, want.get(key))):
                raise MechscopeError(
                    f"the checkpoint in {root} was made with {key}={old!r}, not {want.get(key)!r}"
                    + (" (--sink-ratio 0 means None)" if key == "sink_ratio" else "") + "; resume with the same "
                    "settings or use a new --out."
                )
        if None not in (saved.get("corpus_digest"), want["corpus_digest"]) and saved["corpus_digest"] != want["corpus_digest"]:
            raise changed_corpus(str(root), self.cfg.corpus or "embedded")
        for layer, tr in zip(self.layers, self.trainers):
            tr.out = gen / f"layer_{layer}"
            if not tr.load_checkpoint():
                raise MechscopeError(f"the checkpoint {gen} lacks layer {layer}; it is damaged, so train again with a new --out.")
        self.shared.load_state_dict(shared)
        return True

    # ------------------------------------------------------------------ training
    def _advance(self, tr: Trainer, t0: float, tok0: int) -> dict[str, float]:
        """One step of one trainer: the body of ``Trainer.run``'s loop."""
        cfg = tr.cfg
        x, y = tr._batch()
        stats = tr._train_step(x, y)
        tr.step += 1
        resample_every = cfg.resample_every or max(50, cfg.steps // 5)
        if tr.arch.resamples_dead and tr.step % resample_every == 0 and tr.step < 0.8 * cfg.steps and tr.tokens >= cfg.dead_window:
            stats["resampled"] = tr._resample(x, y)
        if tr.step % cfg.log_every == 0 or tr.step == cfg.steps:
            stats.update(step=tr.step, tokens=tr.tokens, tok_per_s=(tr.tokens - tok0) / max(1e-9, time.perf_counter() - t0))
            tr.log.rows.append(stats)
        return stats

    def run(self, resume: bool) -> TranscoderSet | dict[int, SAE]:
        cfg = self.tcfg
        resumed = resume and self.load_checkpoint()
        if not resumed:
            for tr in self.trainers:
                tr._initialise()
        steps, every = cfg.steps, self.cfg.checkpoint_every
        next_ckpt = (self.trainers[0].tokens // every + 1) * every
        t0, tok0 = time.perf_counter(), self.trainers[0].tokens
        bar = self.progress.phase(f"training {len(self.trainers)} transcoders", total=steps, unit="step",
                                  initial=self.trainers[0].step)
        while self.trainers[0].step < steps:
            stats = [self._advance(tr, t0, tok0) for tr in self.trainers]
            step, tokens = self.trainers[0].step, self.trainers[0].tokens
            if step % cfg.log_every == 0 or step == steps:
                fvu = [s["fvu"] for s in stats if not math.isnan(s["fvu"])]
                bar.advance(0, fvu_mean=sum(fvu) / max(1, len(fvu)), fvu_max=max(fvu, default=float("nan")),
                            l0=sum(s["l0"] for s in stats) / len(stats), tokens=tokens)
            bar.advance()
            if tokens >= next_ckpt and step < steps and self.shared.at_boundary() and not any(tr.pending for tr in self.trainers):
                self.save_checkpoint()
                next_ckpt = (tokens // every + 1) * every
        bar.close()
        return self.finish()

    def finish(self) -> TranscoderSet | dict[int, SAE]:
        for tr in self.trainers:  # a last step that left NaN weights: refused, nothing saved
            tr.check_finite()
        saes = {layer: tr.folded() for layer, tr in zip(self.layers, self.trainers)}
        complete = self.layers == list(range(self.model.summary.n_layers))
        tmp = self.out / f".set.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        result: TranscoderSet | dict[int, SAE]
        if complete:
            result = TranscoderSet([saes[layer] for layer in self.layers], self.model.summary.name)
            save_transcoders(result, tmp, self.model)
        else:
            result = saes
            for layer, sae in saes.items():
                save_sae(sae, tmp / f"layer_{layer}")
        log = {
            "schema_version": SCHEMA_VERSION, "model": self.model.summary.name, "settings": self.cfg.to_dict(),
            "train_config": asdict(self.tcfg), "layers": self.layers, "complete_set": complete,
            "harvest": {"contexts": self.shared.contexts, "chunks": self.shared.chunks,
                        "forward_passes": -(-self.shared.contexts // self.cfg.forward_contexts),
                        "tokens_trained_per_layer": self.trainers[0].tokens},
            "training_log": {str(layer): tr.log.rows for layer, tr in zip(self.layers, self.trainers)},
        }
        (tmp / LOG_FILE).write_text(json.dumps(log))
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: n == CONFIG):  # config.yaml last: a set is whole once it is there
            dest = self.out / name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(tmp / name, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(self.out / CKPT_DIR, ignore_errors=True)
        return result


def _write_synced(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def holds_set(path: Path) -> bool:
    """Whether ``path`` already holds transcoders (a finished set or some of its layers)."""
    return (path / CONFIG).is_file() or any(p.is_dir() and (p / "cfg.json").is_file() for p in path.glob("layer_*"))


def train_transcoders(
    model: Any,
    cfg: TranscoderTrainConfig | None,
    out: str | Path,
    *,
    resume: bool = False,
    model_path: str | None = None,
    progress: ProgressArg = False,
) -> TranscoderSet | dict[int, SAE]:
    """Train one transcoder per layer of ``cfg.layers`` (default: all of ``model``'s) on
    ``model``'s activations, one forward pass per batch for all layers (module docstring),
    and save them in ``out``.

    Returns the ``TranscoderSet`` when every layer was trained (saved in both layouts), else
    ``{layer: transcoder}`` (saved as ``layer_<l>/`` SAELens folders). Training runs on the
    model's device. ``resume=True`` continues the run checkpointed in ``out`` and ends with
    the same weights as an uninterrupted run (same settings and thread count). ``model_path``
    is recorded in each transcoder's metadata (what ``mechscope transcoders eval`` loads by
    default; default the model's name). ``progress`` (``mechscope.progress``) sees one
    "training" phase of ``steps`` steps, with the mean and worst training-batch FVU, the mean
    L0 and the tokens read every ``log_every`` steps (each layer's rows are in its training log).

    Refuses (one sentence, nothing written; ``check_start``): layers the model lacks; ``resume``
    without a checkpoint in ``out``; a fresh run into a folder holding a checkpoint or transcoders.
    """
    check_config(cfg, TranscoderTrainConfig, "train_transcoders")
    cfg = cfg or TranscoderTrainConfig()
    out = Path(out)
    check_start(model, cfg, out, resume)
    run = _Run(model, cfg, out, model_path, as_progress(progress))
    out.mkdir(parents=True, exist_ok=True)
    return run.run(resume)


def check_start(model: Any, cfg: TranscoderTrainConfig, out: str | Path, resume: bool = False) -> None:
    """``train_transcoders``' refusals about the model and ``out`` (one sentence each): layers the
    model lacks or that have no MLP input norm, ``resume`` without a checkpoint in ``out``, a fresh
    run into a folder holding a checkpoint or transcoders. The CLI calls it before it announces the
    run (the context length it has checked against the model already)."""
    out = Path(out)
    check_layers(model, cfg)
    if out.exists() and not out.is_dir():
        raise MechscopeError(f"{out} is a file; --out must name a folder.")
    ckpt = out / CKPT_DIR / LATEST
    if resume:
        if not out.is_dir():
            raise MechscopeError(f"--resume: {out} does not exist; pass the --out of the run to continue.")
        if not ckpt.is_file():
            what = "a finished transcoder set" if holds_set(out) else "no checkpoint"
            raise MechscopeError(f"--resume: {out} holds {what} and nothing to resume; use a new --out to train again.")
    elif out.is_dir():
        if ckpt.is_file():
            raise MechscopeError(f"{out} holds a checkpoint of an earlier run; add --resume to continue it, or choose a new --out.")
        if holds_set(out):
            raise MechscopeError(f"{out} already holds transcoders; choose a new --out.")
