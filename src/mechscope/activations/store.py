"""Stream activations from a text corpus: pack, run the model only as far as needed, shuffle.

1. Tokenise documents in order and pack them into fixed-length contexts, documents separated
   by one separator token (``<|endoftext|>`` where the vocabulary has it, else EOS); no padding.
2. Run the bridge on ``batch_size`` contexts with a capturing hook on every requested hook
   point; the hook that completes the set raises a private exception, so the forward stops
   there and no layer above the last hooked one is computed (a test counts hook calls).
   Split q/k/v inputs and per-head results are switched off unless a hook needs them.
3. Drop the first ``skip_first`` positions of each context (the attention sink) and append
   the rows [batch * (context_len - skip_first), d] to a fixed-size buffer.
4. With ``shuffle``: when the buffer is full, permute it and serve half of it, then refill
   that half (the usual SAE-training buffer: served rows mix old and new contexts). Without
   it rows come out in token order. Rows of different hooks always share one permutation,
   so paired hooks (a transcoder's ``ln2.hook_normalized`` -> ``hook_mlp_out``) stay aligned.

Memory is the buffer, ``buffer_tokens * sum(d) * itemsize``, whatever the number of tokens.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from mechscope.activations.config import DTYPE_NAMES, SINK_TOKEN, TOKENS_KEY, StoreConfig
from mechscope.errors import MechscopeError
from mechscope.models.hooks import check_hook_name, needs_split_attention, parse_hook, resid_post
from mechscope.models.load import plain_attention, position_limit
from mechscope.progress import ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.models import Model

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""Storage dtypes of activations by name."""


def separator_id(tokenizer) -> int:
    """The document separator: ``<|endoftext|>`` if the vocabulary has it, else EOS, else BOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    raise MechscopeError("The tokenizer has no EOS or BOS token to separate documents with.")


def special_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, pad, chat markers, ...) and of the
    document separator: the tokens whose rows ``exclude_special`` options leave out. In packed
    contexts the separator sits mid-context and, like position 0, acts as an attention sink
    with outputs far larger than any text token's (the embedded model's layer-11 MLP: norm
    ~15,800 against ~400 for text; SAELens's ``exclude_special_tokens`` is the same idea)."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    with contextlib.suppress(MechscopeError):
        ids.add(separator_id(tokenizer))
    return sorted(ids)


def pack_contexts(tokenizer, documents: Iterable[str], context_len: int, docs_per_call: int = 16) -> Iterator[list[int]]:
    """Token ids of consecutive contexts: documents tokenised, each followed by the separator,
    concatenated and cut every ``context_len`` tokens (a final partial context is dropped)."""
    sep = separator_id(tokenizer)
    buf: list[int] = []
    for docs in _chunks(documents, docs_per_call):
        for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            buf.extend(ids)
            buf.append(sep)
        while len(buf) >= context_len:
            yield buf[:context_len]
            del buf[:context_len]


def _chunks(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for d in documents:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def sink_hooks(model: Model, deepest: int) -> list[str]:
    """The hooks ``sink_positions`` reads: the residual stream after blocks 0..``deepest``,
    checked against ``model`` (one sentence, naming ``--sink-ratio 0``, where one is missing)."""
    names = [resid_post(layer) for layer in range(deepest + 1)]
    for h in names:
        try:
            check_hook_name(model, h)
        except MechscopeError as e:
            raise MechscopeError(f"{e.args[0].rstrip('.')}; the attention-sink test needs it (pass --sink-ratio 0 to skip that test).") from None
    return names


def sink_positions(norms: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """Attention sinks among a batch's positions: ``norms`` holds, per block, the residual
    stream's norm after it at every position, ``[batch, pos]`` (``sink_hooks``: every block up to
    the deepest one read); a position is a sink where, in any block, its norm is more than
    ``ratio`` times that block's median over its own context's positions -> ``[batch, pos]``
    bool. Per context, not over the batch (a helper's sweep found the batch median made which
    rows training and ``transcoders eval`` leave out depend on ``--batch-size``; at the default
    ratio the two agree on the embedded model, where sinks stand 66x above text and text at most
    13.2x, see below).

    Why. Language models park attention on a few positions whose residual stream carries
    "massive activations" (Sun et al. 2024): position 0, document separators and, on the embedded
    model, a delimiter at position 1 when position 0 is one too. One MLP writes them (the embedded
    model's layer 11: ~770x a text token's output norm) and late ones remove them (layer 28:
    ~70x), so a few such rows outweigh all the text in a squared error. Measured on the embedded
    model (400 held-out contexts, ``docs/decisions.md``): every sink's largest ratio over blocks
    0-29 is at least 66x (reached from block 11 on), no text position's exceeds 3.1x after block 11,
    and the largest text ratio in any block is 13.2x (block 2, where no sink stands out either); so
    a set whose deepest layer is 10 or lower marks none, and its MLPs' sink outputs are ordinary."""
    if not norms:
        raise MechscopeError("the sink test needs the residual norms of at least one block.")
    marked = torch.zeros_like(norms[0], dtype=torch.bool)
    for n in norms:
        marked |= n > ratio * n.float().median(dim=-1, keepdim=True).values
    return marked


def context_sinks(norms: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """``sink_positions`` per context: ``norms`` [batch, pos] per block -> [batch, pos] bool, each
    context judged against its own medians over positions 1.. (position 0, never a candidate,
    stays out of them and unmarked), so the result does not depend on how contexts are batched."""
    marked = torch.zeros_like(norms[0], dtype=torch.bool)
    marked[:, 1:] = sink_positions([n[:, 1:] for n in norms], ratio)
    return marked


class _Stop(Exception):
    """Raised by the last capturing hook to end the forward pass early."""


def check_context_fits(model: Model, context_len: int, option: str = "--context-len") -> None:
    """One sentence when contexts of ``context_len`` tokens are longer than ``model`` takes.
    Learned position embeddings (GPT-2) have no row past n_ctx; rotary models run on, as
    transformers lets them (``position_limit``)."""
    n_ctx = position_limit(model)
    if n_ctx is not None and context_len > n_ctx:
        raise MechscopeError(f"contexts of {context_len} tokens are longer than {model.summary.name} takes ({n_ctx} positions); "
                             f"give {option} {n_ctx} or less.")


class Harvester:
    """Runs the model on token contexts and returns the hooked activations as rows."""

    def __init__(self, model: Model, cfg: StoreConfig):
        for h in cfg.hooks:
            check_hook_name(model, h)
        check_context_fits(model, cfg.context_len)
        self.model, self.cfg = model, cfg
        self.needs_split = any(needs_split_attention(h) for h in cfg.hooks)
        self.dtype = DTYPES[cfg.dtype]
        self.device = torch.device(cfg.device) if cfg.device else model.device
        self.hook_calls = 0  # capturing-hook calls, for tests
        self._dims: dict[str, int] | None = None
        # With sink_ratio: the residual stream after every block up to the deepest hooked one
        # (the forward runs through them anyway), norms only.
        self.sink_hooks: list[str] = []
        if cfg.sink_ratio is not None:
            deepest = max((layer for h in cfg.hooks if (layer := parse_hook(h).layer) is not None), default=None)
            if deepest is None:
                raise MechscopeError("sink_ratio needs a hook inside a block (blocks.L....); the sink test reads the residual "
                                     "stream after blocks 0..L. Leave sink_ratio at None for these hooks.")
            self.sink_hooks = sink_hooks(model, deepest)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, skip_first: int | None = None) -> dict[str, torch.Tensor]:
        """Activations for ``tokens`` [batch, pos] -> {hook: [batch * (pos - skip_first), d]}
        (and ``TOKENS_KEY``: [rows] token ids, ``SINK_TOKEN`` at sinks with ``sink_ratio``)."""
        got: dict[str, torch.Tensor] = {}
        norms: dict[str, torch.Tensor] = {}
        n = len(self.cfg.hooks) + len(self.sink_hooks)

        def done() -> bool:  # every capture but the current one is in: nothing needs to run after it
            return len(got) + len(norms) == n - 1

        def make(name: str):
            def capture(t: torch.Tensor, hook=None):
                self.hook_calls += 1
                if name not in got and done():
                    got[name] = t
                    raise _Stop
                got[name] = t.detach().clone()  # later layers must not see (or change) our copy
                return None

            return capture

        def make_norm(name: str):
            def capture(t: torch.Tensor, hook=None):
                self.hook_calls += 1
                last = name not in norms and done()
                norms[name] = t.detach().float().norm(dim=-1)  # [batch, pos]
                if last:
                    raise _Stop
                return None

            return capture

        mode = contextlib.nullcontext() if self.needs_split else plain_attention(self.model)
        with mode:
            try:
                self.model.bridge.run_with_hooks(
                    tokens.to(self.model.device),
                    fwd_hooks=[(h, make(h)) for h in self.cfg.hooks] + [(h, make_norm(h)) for h in self.sink_hooks],
                )
            except _Stop:
                pass
        missing = [h for h in self.cfg.hooks if h not in got] + [h for h in self.sink_hooks if h not in norms]
        if missing:
            raise MechscopeError(
                f"The hook(s) {', '.join(missing)} did not fire in a forward pass; pick hook points the "
                "model computes (see `mechscope hooks`)."
            )
        k = self.cfg.skip_first if skip_first is None else skip_first
        out = {}
        for h in self.cfg.hooks:
            t = got[h][:, k:]  # [batch, pos - k, ...]
            out[h] = t.reshape(t.shape[0] * t.shape[1], -1).to(self.device, self.dtype)  # [rows, d]
        if self.cfg.with_tokens:
            ids = tokens[:, k:].to(self.device)
            if self.cfg.sink_ratio is not None:
                sinks = sink_positions([norms[h][:, k:] for h in self.sink_hooks], self.cfg.sink_ratio)
                ids = ids.masked_fill(sinks.to(ids.device), SINK_TOKEN)
            out[TOKENS_KEY] = ids.reshape(-1)  # [rows]
        return out

    def dims(self) -> dict[str, int]:
        """Width of each hook's rows, from a two-token probe (run once)."""
        if self._dims is None:
            probe = torch.full((1, 2), separator_id(self.model.tokenizer), dtype=torch.long)
            got = self.run(probe, skip_first=0)
            self._dims = {h: int(got[h].shape[1]) for h in self.cfg.hooks}
        return dict(self._dims)


class ActivationStore:
    """Shuffled activations streamed from a corpus: ``next_batch(n) -> {hook: [n, d]}``."""

    def __init__(self, model: Model, corpus: Iterable[str], cfg: StoreConfig, progress: ProgressArg = False):
        self.cfg = cfg
        self.harvester = Harvester(model, cfg)
        self.corpus = corpus
        self._contexts = pack_contexts(model.tokenizer, self._documents(), cfg.context_len)
        self.corpus_passes = 0
        self.tokens_seen = 0  # tokens run through the model (skipped positions included)
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self._buf: dict[str, torch.Tensor] | None = None  # {hook: [buffer_tokens + slack, d]}
        self._n = 0  # valid rows in the buffer
        self._out: dict[str, torch.Tensor] | None = None
        self._out_pos = 0
        self._bar = as_progress(progress).phase("harvesting", unit="tok")

    def _documents(self) -> Iterator[str]:
        while True:
            n = 0
            for doc in self.corpus:
                n += 1
                yield doc
            if n == 0:
                raise MechscopeError("The corpus holds no documents; pass a corpus with text.")
            self.corpus_passes += 1
            if not self.cfg.repeat:
                return

    @property
    def dims(self) -> dict[str, int]:
        return self.harvester.dims()

    def _forward_batch(self) -> dict[str, torch.Tensor] | None:
        ctx = []
        for c in self._contexts:
            ctx.append(c)
            if len(ctx) == self.cfg.batch_size:
                break
        if not ctx:
            return None
        tokens = torch.tensor(ctx, dtype=torch.long)
        self.tokens_seen += tokens.numel()
        self._bar.advance(tokens.numel())
        return self.harvester.run(tokens)

    def _fill(self) -> bool:
        """Fill the buffer to ``buffer_tokens`` rows; False when the corpus is exhausted first."""
        cap = self.cfg.buffer_tokens
        while self._n < cap:
            rows = self._forward_batch()
            if rows is None:
                return False
            m = next(iter(rows.values())).shape[0]
            if self._buf is None:
                slack = self.cfg.batch_size * self.cfg.rows_per_context
                self._buf = {h: torch.empty(cap + slack, *t.shape[1:], dtype=t.dtype, device=t.device) for h, t in rows.items()}
            for h, t in rows.items():
                self._buf[h][self._n : self._n + m] = t
            self._n += m
        return True

    def _next_out(self) -> bool:
        """Move the next served chunk out of the buffer; False when nothing is left."""
        full = self._fill()
        if self._n == 0:
            return False
        buf = self._buf
        assert buf is not None  # rows in the buffer (_n > 0) mean _fill allocated it
        if not self.cfg.shuffle:
            k = min(self._n, self.cfg.buffer_tokens)
            self._out = {h: b[:k].clone() for h, b in buf.items()}
            for h, b in buf.items():  # keep the overflow (in order) at the front
                b[: self._n - k] = b[k : self._n].clone()
            self._n -= k
        else:
            perm = torch.randperm(self._n, generator=self._gen).to(next(iter(buf.values())).device)
            for h, b in buf.items():
                b[: self._n] = b[perm]
            k = self._n // 2 if full else self._n  # serve half; at the corpus's end, all
            k = max(k, 1)
            self._out = {h: b[self._n - k : self._n].clone() for h, b in buf.items()}
            self._n -= k
        self._out_pos = 0
        return True

    def next_batch(self, n_tokens: int) -> dict[str, torch.Tensor]:
        """The next ``n_tokens`` rows of every hook, {hook: [n_tokens, d]} (and their token ids
        under ``TOKENS_KEY`` with ``cfg.with_tokens``; fewer rows only at the end of a
        non-repeating corpus; an exhausted one raises StopIteration)."""
        keys = self.cfg.keys
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in keys}
        need = n_tokens
        while need > 0:
            if self._out is None or self._out_pos >= next(iter(self._out.values())).shape[0]:
                if not self._next_out():
                    break
            out = self._out
            assert out is not None  # _next_out returned True: a chunk is out
            avail = next(iter(out.values())).shape[0] - self._out_pos
            k = min(avail, need)
            for h in keys:
                parts[h].append(out[h][self._out_pos : self._out_pos + k])
            self._out_pos += k
            need -= k
        if need == n_tokens:
            raise StopIteration("the corpus is exhausted")
        return {h: torch.cat(p) if len(p) > 1 else p[0] for h, p in parts.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What, beside the number of contexts run (``tokens_seen``), fixes the stream's
        position: the rows harvested but not yet served (the shuffle buffer and the rest of
        the chunk being served, hooks by their index in ``cfg.hooks``) and the shuffle
        generator's state. ``load_state_tensors`` on a store that has skipped the same contexts
        then serves exactly the rows this one would have."""
        out = {"generator": self._gen.get_state()}
        for i, h in enumerate(self.cfg.keys):
            if self._buf is not None and self._n > 0:
                out[f"buffer.{i}"] = self._buf[h][: self._n].cpu().contiguous()
            if self._out is not None and self._out_pos < self._out[h].shape[0]:
                out[f"serving.{i}"] = self._out[h][self._out_pos :].cpu().contiguous()
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_tensors`` (see there); an empty dict changes nothing."""
        if not state:
            return
        self._gen.set_state(state["generator"])
        dev = self.harvester.device
        if "buffer.0" in state:
            rows = {h: state[f"buffer.{i}"] for i, h in enumerate(self.cfg.keys)}
            self._n = int(rows[self.cfg.hooks[0]].shape[0])
            cap = max(self.cfg.buffer_tokens, self._n) + self.cfg.batch_size * self.cfg.rows_per_context
            self._buf = {h: torch.empty(cap, *t.shape[1:], dtype=t.dtype, device=dev) for h, t in rows.items()}
            for h, t in rows.items():
                self._buf[h][: self._n] = t.to(dev)
        if "serving.0" in state:
            self._out = {h: state[f"serving.{i}"].to(dev) for i, h in enumerate(self.cfg.keys)}
            self._out_pos = 0

    def batches(self, n_tokens: int) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate ``next_batch(n_tokens)`` until a non-repeating corpus runs out."""
        while True:
            try:
                yield self.next_batch(n_tokens)
            except StopIteration:
                return

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches(4096)

    def close(self) -> None:
        self._bar.close()
