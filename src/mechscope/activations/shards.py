"""Harvest activations to safetensors shards once; train any number of SAEs from them.

``harvest(model, corpus, cfg, out_dir, n_tokens)`` packs the corpus into contexts (in order,
unshuffled), runs the model only up to the last hooked layer, and writes every
``contexts_per_shard`` contexts' rows as ``shard_00000.safetensors`` ({hook: [rows, d]} plus
``tokens`` [rows], the token id at each row). Each shard is written to a temporary name and
renamed, and ``manifest.json`` (model and its weights fingerprint, hooks, widths, dtype, token
counts, corpus spec, store settings, finished shards) is rewritten after each, so a killed
harvest resumes: shards already on disk are skipped (their contexts are re-tokenised, never
re-run). Asking the same folder for more tokens later extends the harvest with further shards.

``ShardStore(out_dir)`` serves ``next_batch(n) -> {hook: [n, d]}`` like ``ActivationStore``:
each epoch visits the shards in a new random order, ``buffer_shards`` at a time, and serves the
rows of those shards in one random permutation; epochs repeat without end.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from mechscope.activations.config import TOKENS_KEY
from mechscope.activations.corpus import changed_corpus, corpus_digest
from mechscope.activations.store import Harvester, StoreConfig, pack_contexts
from mechscope.errors import MechscopeError
from mechscope.progress import ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.models import Model

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Settings that must match for a resumed harvest to continue the same stream.
_SAME = ("model", "hooks", "context_len", "skip_first", "dtype", "corpus")


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def harvest(
    model: Model,
    corpus: Iterable[str],
    cfg: StoreConfig,
    out_dir: str | Path,
    n_tokens: int,
    shard_tokens: int = 32768,
    corpus_spec: str | None = None,
    progress: ProgressArg = True,
) -> dict[str, Any]:
    """Write at least ``n_tokens`` rows per hook to ``out_dir`` (resuming); returns the manifest."""
    out = Path(out_dir)
    if n_tokens < 1:
        raise MechscopeError(f"--tokens must be at least 1 (rows per hook to harvest); got {n_tokens}.")
    if cfg.sink_ratio is not None:
        raise MechscopeError("shards store the contexts' own token ids, not sink marks; harvest with sink_ratio None.")
    harvester = Harvester(model, cfg)  # checks the hook names before anything is written
    out.mkdir(parents=True, exist_ok=True)
    rpc = cfg.rows_per_context
    old = _read_manifest(out) if (out / MANIFEST).is_file() else None
    # contexts per shard; a resumed or extended harvest keeps the one it started with
    cps = int(old["contexts_per_shard"]) if old else max(1, -(-min(shard_tokens, n_tokens) // rpc))
    n_shards = -(-n_tokens // (cps * rpc))
    spec = corpus_spec or getattr(corpus, "spec", None) or type(corpus).__name__
    if hasattr(corpus, "split") and getattr(corpus, "split", "all") != "all":
        spec = f"{spec} [{corpus.split}]"
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "model": model.summary.name, "model_fingerprint": model.fingerprint(),
        "hooks": list(cfg.hooks),
        "d": harvester.dims(), "dtype": cfg.dtype, "context_len": cfg.context_len, "skip_first": cfg.skip_first,
        "corpus": spec, "corpus_digest": corpus_digest(corpus), "contexts_per_shard": cps, "rows_per_shard": cps * rpc, "n_tokens_requested": n_tokens,
        "store": cfg.to_dict(), "shards": [], "n_tokens": 0, "complete": False,
    }
    if old is not None:
        diff = [k for k in _SAME if old.get(k) != manifest.get(k)]
        if old.get("model_fingerprint") not in (None, manifest["model_fingerprint"]):  # older harvests recorded none
            diff.append("model_fingerprint")
        if not diff and None not in (old.get("corpus_digest"), manifest["corpus_digest"]) \
                and old.get("corpus_digest") != manifest["corpus_digest"]:  # older harvests recorded none
            raise changed_corpus(str(out), spec)
        if diff:
            raise MechscopeError(
                f"'{out}' holds a harvest with different settings ({', '.join(diff)}); use another --out folder."
            )
        manifest["shards"] = [s for s in old["shards"] if _shard_ok(out / s["file"], s.get("rows"), cfg.hooks)]
    done = {s["file"] for s in manifest["shards"]}
    _write_manifest(out, manifest)

    bar = as_progress(progress).phase("harvest", total=n_shards * cps * rpc, unit="tok")
    contexts = pack_contexts(model.tokenizer, _cycle(corpus), cfg.context_len)
    try:
        for i in range(n_shards):
            block = list(itertools.islice(contexts, cps))
            if not block:
                break
            name = _shard_name(i)
            if name in done:
                bar.advance(len(block) * rpc)
                continue
            parts: dict[str, list[torch.Tensor]] = {h: [] for h in cfg.hooks}
            for j in range(0, len(block), cfg.batch_size):
                tokens = torch.tensor(block[j : j + cfg.batch_size], dtype=torch.long)
                rows = harvester.run(tokens)
                for h in cfg.hooks:
                    parts[h].append(rows[h].to("cpu"))
                bar.advance(tokens.shape[0] * rpc)
            tensors = {h: torch.cat(p).contiguous() for h, p in parts.items()}
            tensors[TOKENS_KEY] = torch.tensor(block, dtype=torch.int32)[:, cfg.skip_first :].reshape(-1).contiguous()
            tmp = out / (name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, out / name)
            manifest["shards"].append({"file": name, "rows": int(tensors[TOKENS_KEY].shape[0])})
            manifest["shards"].sort(key=lambda s: s["file"])
            _write_manifest(out, manifest)
    finally:
        bar.close()
    manifest["n_tokens"] = sum(s["rows"] for s in manifest["shards"])
    manifest["complete"] = manifest["n_tokens"] >= n_tokens
    _write_manifest(out, manifest)
    return manifest


def _cycle(corpus: Iterable[str]) -> Iterator[str]:
    """The corpus again and again (a harvest may want more tokens than it holds)."""
    while True:
        n = 0
        for doc in corpus:
            n += 1
            yield doc
        if n == 0:
            raise MechscopeError("The corpus holds no documents; pass a corpus with text.")


def _write_manifest(out: Path, manifest: dict) -> None:
    manifest["n_tokens"] = sum(s["rows"] for s in manifest["shards"])
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def _read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        raise MechscopeError(f"No activation shards in '{out}' (no {MANIFEST}); run a harvest into it first.")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MechscopeError(f"'{path}' is not valid JSON ({exc.msg}); delete the folder and harvest again.") from exc
    if m.get("schema_version") != SCHEMA_VERSION or "shards" not in m:
        raise MechscopeError(f"'{path}' is not a mechscope activation manifest (schema {SCHEMA_VERSION}).")
    return m


class ShardStore:
    """Activations read back from harvested shards: ``next_batch(n) -> {hook: [n, d]}``."""

    def __init__(
        self,
        out_dir: str | Path,
        hooks: list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 4,
        device: str | None = None,
        dtype: str | None = None,
    ):
        self.dir = Path(out_dir)
        self.manifest = _read_manifest(self.dir)
        self.files = [s["file"] for s in self.manifest["shards"] if (self.dir / s["file"]).is_file()]
        if not self.files:
            raise MechscopeError(f"'{self.dir}' has a manifest but no shard files; run the harvest again.")
        self.hooks = list(hooks or self.manifest["hooks"])
        unknown = [h for h in self.hooks if h not in self.manifest["hooks"]]
        if unknown:
            raise MechscopeError(
                f"The shards in '{self.dir}' hold no hook {', '.join(unknown)} (they hold {', '.join(self.manifest['hooks'])})."
            )
        self.shuffle, self.buffer_shards = shuffle, max(1, buffer_shards)
        self.device = torch.device(device) if device else torch.device("cpu")
        from mechscope.activations.store import DTYPES

        self.dtype = DTYPES[dtype] if dtype else None
        self._gen = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._order: list[str] = []
        self._out: dict[str, torch.Tensor] | None = None
        self._pos = 0

    @property
    def dims(self) -> dict[str, int]:
        return {h: int(self.manifest["d"][h]) for h in self.hooks}

    @property
    def n_tokens(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"] if s["file"] in self.files)

    def _load_group(self) -> None:
        if not self._order:
            if self._out is not None or self.epoch > 0 or self._pos:
                self.epoch += 1
            idx = torch.randperm(len(self.files), generator=self._gen).tolist() if self.shuffle else range(len(self.files))
            self._order = [self.files[i] for i in idx]
        group, self._order = self._order[: self.buffer_shards], self._order[self.buffer_shards :]
        loaded = [_load_shard(self.dir / f) for f in group]
        out = {h: torch.cat([t[h] for t in loaded]) for h in self.hooks + [TOKENS_KEY]}
        if self.shuffle:
            perm = torch.randperm(out[TOKENS_KEY].shape[0], generator=self._gen)
            out = {h: t[perm] for h, t in out.items()}
        self._out = {h: t.to(self.device, self.dtype or t.dtype) if h != TOKENS_KEY else t for h, t in out.items()}
        self._pos = 0

    def next_batch(self, n_tokens: int, with_tokens: bool = False) -> dict[str, torch.Tensor]:
        """The next ``n_tokens`` rows of every hook (cycling through epochs); with ``with_tokens``
        also ``"tokens"`` [n_tokens], the token id at each row."""
        keys = self.hooks + ([TOKENS_KEY] if with_tokens else [])
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in keys}
        need = n_tokens
        while need > 0:
            if self._out is None or self._pos >= self._out[TOKENS_KEY].shape[0]:
                self._load_group()
            out = self._out
            assert out is not None  # _load_group always loads a group (it cycles epochs)
            k = min(need, out[TOKENS_KEY].shape[0] - self._pos)
            for h in keys:
                parts[h].append(out[h][self._pos : self._pos + k])
            self._pos += k
            need -= k
        return {h: torch.cat(p) if len(p) > 1 else p[0] for h, p in parts.items()}

    def batches(self, n_tokens: int, n_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        for _ in itertools.count() if n_batches is None else range(n_batches):
            yield self.next_batch(n_tokens)

    def info(self) -> dict[str, Any]:
        return {k: self.manifest[k] for k in ("model", "hooks", "d", "dtype", "context_len", "corpus", "n_tokens")} | {
            "shards": len(self.files)
        }


def _shard_ok(path: Path, rows: Any, hooks: list[str]) -> bool:
    """Whether a listed shard is whole: a readable safetensors file (``safe_open`` refuses one
    cut short of what its header promises) holding every hook and the token ids with the rows
    the manifest records. A resumed harvest writes the others again (a sweep found a truncated
    shard counted as done, and training then failed on it)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            if not {*hooks, TOKENS_KEY} <= keys:
                return False
            n = f.get_slice(TOKENS_KEY).get_shape()[0]
            return all(f.get_slice(h).get_shape()[0] == n for h in hooks) and (rows is None or n == rows)
    except Exception:  # safetensors raises its own error type for a damaged or truncated file
        return False


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard's tensors, or one sentence naming the damaged file."""
    try:
        return load_file(str(path))
    except Exception as e:
        if type(e).__name__ != "SafetensorError" and not isinstance(e, OSError):
            raise
        raise MechscopeError(f"the activation shard {path} is damaged ({str(e).splitlines()[0]}); run the same "
                             "mechscope sae harvest again, which writes it again.") from None
