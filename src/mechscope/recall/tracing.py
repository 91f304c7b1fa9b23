"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

1. Clean run: p(target) at the last position; cache every layer's residual stream
   (``hook_resid_post``), MLP output and attention output at every position.
2. Corrupted runs: Gaussian noise N(0, (noise * sigma)^2) added to the token embeddings of the
   subject, sigma = std of the embeddings of the facts list's subject tokens (ROME's
   ``noise_level = 3 * std``); ``samples`` noise draws, shared by every restoration.
3. Restored runs: the corrupted run with one clean state put back: the residual stream at
   (layer, position), or the MLP / attention outputs of a window of layers around a layer at
   one position. p(target) of each, averaged over the noise draws -> [n_layers, pos] per kind.
   Positions before the subject are not run: the noise cannot reach them (causal attention),
   so restoring them gives exactly the corrupted probability, which fills those columns.

All runs are batched (one row per restoration x noise draw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import check_config
from mechscope.models.hooks import EMBED, attn_out, mlp_out, resid_post
from mechscope.models.tokens import check_token_id, one_prompt
from mechscope.recall.config import RecallConfig, check_subject_positions, window_layers
from mechscope.recall.engine import Row, _Stop, clean_states, run_rows

if TYPE_CHECKING:
    from mechscope.models import Model

KIND_HOOK = {"resid": resid_post, "mlp": mlp_out, "attn": attn_out}
"""The hook (a function of the layer) each kind of state is restored at."""


@dataclass
class Trace:
    """p(target): clean, corrupted (mean over draws) and restored [len(layers), pos] per kind
    (row i is layer ``layers[i]``: its residual stream, or the window of MLP / attention
    outputs around it)."""

    clean_prob: float
    corrupt_prob: float
    restored: dict[str, torch.Tensor]
    noise_std: float
    window: int
    layers: list[int]

    @property
    def note(self) -> str:
        """One sentence when the noise did not lower p(target), so no restoration can show anything."""
        if self.corrupt_prob < self.clean_prob:
            return ""
        return (f"the noise on the subject did not lower p(target) (corrupted {self.corrupt_prob:.3g} >= clean "
                f"{self.clean_prob:.3g}), so the trace carries no information; try another subject span or a model "
                "that knows the fact.")

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """Restored minus corrupted p(target) [len(layers), pos] (ROME's indirect effect)."""
        return self.restored[kind] - self.corrupt_prob

    def to_dict(self) -> dict[str, Any]:
        """Every number as plain JSON (``recall.json``'s ``causal_tracing``)."""
        d: dict[str, Any] = {
            "clean_prob": self.clean_prob, "corrupt_prob": self.corrupt_prob, "noise_std": self.noise_std, "window": self.window,
            "layers": self.layers, "restored_prob": {k: v.tolist() for k, v in self.restored.items()},
            "axes": "[layer index into layers][position]; resid: hook_resid_post of that layer; mlp/attn: outputs of the window around it",
        }
        if self.note:
            d["note"] = self.note
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        """The trace ``to_dict`` wrote, exactly: the restored probabilities are float32, as
        ``causal_trace`` makes them, and float32 values survive JSON's doubles unchanged."""
        return cls(clean_prob=d["clean_prob"], corrupt_prob=d["corrupt_prob"],
                   restored={k: torch.tensor(v, dtype=torch.float32) for k, v in d["restored_prob"].items()},
                   noise_std=d["noise_std"], window=d["window"], layers=list(d["layers"]))


SUBJECT_CONTEXT = "The"


def subject_ids(tokenizer: Any, subject: str) -> list[int]:
    """The ids of " " + ``subject`` as it reads after a word (``SUBJECT_CONTEXT``), no special
    tokens. A SentencePiece tokenizer that marks word starts with "▁" (Llama-2, Mistral v0.1)
    encodes " France" alone as '▁', '▁France', in context as '▁France'; byte-level BPE gives
    the same ids either way. Where the subject merges into the context word, its own ids
    without the pieces that decode to only whitespace."""
    from mechscope.models.tokens import continuation

    ids = continuation(tokenizer, SUBJECT_CONTEXT, " " + subject)
    if ids is None:
        ids = [i for i in tokenizer(" " + subject, add_special_tokens=False)["input_ids"] if tokenizer.decode([i]).strip()]
    return [int(i) for i in ids]


@torch.no_grad()
def embedding_std(model: Model, subjects: list[str]) -> float:
    """Std of the token embeddings of ``subjects`` (each as it reads after a word, see
    ``subject_ids``), as ROME, read where the noise is added (``hook_embed``): models that
    scale their embeddings (Gemma by sqrt(d_model)) are measured after the scaling, not on the
    unscaled table."""
    ids = [i for s in subjects for i in subject_ids(model.tokenizer, s)]
    seen: list[torch.Tensor] = []

    def grab(x, hook):  # noqa: ANN001
        seen.append(x.detach().float().reshape(-1, x.shape[-1]))
        raise _Stop  # nothing past the embedding is needed

    n_ctx = int(model.summary.n_ctx or 64)
    step = max(1, min(64, n_ctx))
    for a in range(0, len(ids), step):  # short runs: within any model's context
        try:
            model.bridge.run_with_hooks(torch.tensor([ids[a:a + step]], device=model.device), fwd_hooks=[(EMBED, grab)])
        except _Stop:
            pass
    return float(torch.cat(seen).std())


def noise_bank(n: int, n_pos: int, d_model: int, std: float, seed: int) -> torch.Tensor:
    """[n, n_pos, d_model] Gaussian noise with the given std, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_pos, d_model, generator=g) * std


@torch.no_grad()
def causal_trace(model: Model, tokens: torch.Tensor, subject_pos: list[int], target_id: int, noise_std: float,
                 cfg: RecallConfig | None = None) -> Trace:
    """Causal trace of one prompt, tokens [1, pos]; ``noise_std`` = noise * embedding std."""
    check_config(cfg, RecallConfig, "causal_trace")
    cfg = cfg or RecallConfig()
    tokens = one_prompt(model, tokens, "causal_trace")
    target_id = check_token_id(model, target_id, "causal_trace")
    subject_pos = check_subject_positions(subject_pos, tokens.shape[1], "causal_trace")
    L, P = model.summary.n_layers, tokens.shape[1]
    window, _ = cfg.windows(L)
    hooks = [KIND_HOOK[k](l) for k in cfg.kinds for l in range(L)]
    clean = clean_states(model, tokens, hooks)
    bank = noise_bank(cfg.samples, len(subject_pos), model.summary.d_model, noise_std, cfg.seed)
    rows = [Row(noise=s) for s in range(cfg.samples)]  # corrupted baseline
    layers_run = cfg.layers(L)
    index = []  # (kind, row, pos) for each block of `samples` rows
    for kind in cfg.kinds:
        for i, l in enumerate(layers_run):
            layers = [l] if kind == "resid" else list(window_layers(l, window, L))
            for p in range(subject_pos[0], P):
                index.append((kind, i, p))
                for s in range(cfg.samples):
                    rows.append(Row(noise=s, restore={KIND_HOOK[kind](j): [p] for j in layers}))
    probs = run_rows(model, tokens, target_id, rows, noise_pos=subject_pos, noise_bank=bank, clean=clean, max_rows=cfg.max_rows)
    clean_p = float(run_rows(model, tokens, target_id, [Row()])[0])
    corrupt = float(probs[: cfg.samples].mean())
    per = probs[cfg.samples:].view(len(index), cfg.samples).mean(1)
    restored: dict[str, torch.Tensor] = {k: torch.full((len(layers_run), P), corrupt) for k in cfg.kinds}
    for (kind, i, p), v in zip(index, per.tolist()):
        restored[kind][i, p] = v
    return Trace(clean_prob=clean_p, corrupt_prob=corrupt, restored=restored, noise_std=noise_std, window=window,
                 layers=layers_run)
