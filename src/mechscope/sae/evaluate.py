"""Evaluate an SAE (or transcoder) on held-out text: reconstruction, sparsity, downstream loss.

Metrics (SAELens / the field's usual definitions; positions before ``skip_first`` are left
clean and out of the statistics, as in training, because the first position of a context is
an attention sink with an outlying norm):
- ``l0``: mean number of active features per token;
- ``mse``: mean over tokens of the summed squared error; ``fvu``: that over the summed
  variance of the activations (1 - explained variance); ``cos``: mean cosine similarity;
- ``ce_clean``, ``ce_sae`` (reconstruction spliced in at the hook), ``ce_zero`` (the hook's
  activation replaced by zeros) and ``ce_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``
  (undefined, NaN in Python and null in JSON, when zeroing leaves the loss unchanged);
- ``kl``: mean KL(clean || spliced) of the next-token distributions;
- feature density (fraction of tokens a feature fires on): ``dead`` (never fired here) and
  ``dense`` (> 10%) fractions, and a log10-density histogram.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.activations import StoreConfig, get_corpus, pack_contexts
from mechscope.activations.store import check_context_fits
from mechscope.errors import MechscopeError
from mechscope.models.check import require_model
from mechscope.models.load import position_limit, reading_mode
from mechscope.models.tokens import ids_outside
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import json_safe, write_json
from mechscope.sae.io import check_sae_fits
from mechscope.sae.model import SAE

if TYPE_CHECKING:
    from mechscope.models import Model

SCHEMA_VERSION = 1
DENSE = 0.1


@dataclass
class SAEEval:
    """The numbers of one evaluation, plus the feature densities for the histogram."""

    tokens: int
    l0: float
    mse: float
    fvu: float
    cos: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    kl: float
    dead_frac: float
    dense_frac: float
    density_hist: dict[str, list[float]] = field(default_factory=dict)  # edges (log10), counts
    sae: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values: an undefined one (NaN) is ``None`` (null)."""
        return json_safe({"schema_version": SCHEMA_VERSION, **asdict(self)})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(path, self.to_dict(), indent=2)


def recovered(zero: float, spliced: float, clean: float) -> float:
    """CE loss recovered, (zero - spliced) / (zero - clean): where the spliced loss lies on the
    line from the zero-ablated loss (0) to the clean one (1), also when zeroing lowers the loss
    (a random model); NaN (undefined) when the two ends coincide."""
    return (zero - spliced) / (zero - clean) if abs(zero - clean) > 1e-9 * max(1.0, abs(clean)) else math.nan


def _ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-token next-token loss [b, pos-1]."""
    lp = logits[:, :-1].float().log_softmax(-1)
    return -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def check_context_len(context_len: int | None, option: str = "--context-len") -> None:
    """Refuse contexts shorter than 2 tokens (None: the default, fine): the first position is
    left out and a loss needs the token after, so nothing would be measured (a division by zero)."""
    if context_len is not None and context_len < 2:
        raise MechscopeError(f"{option} must be at least 2 (the first token is left out and a loss needs the next one); "
                             f"got {context_len}.")


def check_token_ids(model: Model, tokens: Any) -> None:
    """One sentence when ``tokens`` is not a tensor of integer token ids within ``model``'s
    vocabulary (a float tensor or an id past the vocabulary fails deep in the embedding)."""
    if not isinstance(tokens, Tensor):
        raise MechscopeError(f"tokens must be a torch.Tensor of token ids [n_contexts, ctx_len]; got a {type(tokens).__name__}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise MechscopeError(f"tokens must hold integer token ids (torch.long), not {tokens.dtype}; convert with tokens.long() "
                             "or build them with the model's tokenizer.")
    if (span := ids_outside(tokens, model.summary.d_vocab)) is not None:
        raise MechscopeError(f"tokens hold ids from {span[0]} to {span[1]}, outside {model.summary.name}'s "
                             f"vocabulary (0 to {model.summary.d_vocab - 1}); build them with this model's tokenizer.")


@torch.no_grad()
def evaluate_sae(model: Model, sae: SAE, tokens: Tensor, *, batch_size: int = 8, skip_first: int = 1,
                 progress: ProgressArg = False) -> SAEEval:
    """Evaluate ``sae`` on ``tokens`` [n_contexts, ctx_len] (held-out text)."""
    require_model(model, "evaluate_sae")
    if not isinstance(sae, SAE):
        raise MechscopeError(f"evaluate_sae needs an SAE (mechscope.sae.load_sae(path)), got a {type(sae).__name__}.")
    if isinstance(skip_first, bool) or not isinstance(skip_first, int) or skip_first < 0:
        raise MechscopeError(f"skip_first must be a whole number of at least 0 (leading positions left out); got {skip_first!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MechscopeError(f"batch_size must be a whole number of at least 1; got {batch_size!r}.")
    check_token_ids(model, tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < skip_first + 1 or tokens.shape[1] < 2:
        raise MechscopeError(f"the tokens to evaluate on have shape {list(tokens.shape)}; give at least one context of "
                             f"{max(2, skip_first + 1)} or more tokens.")
    if (n_pos := position_limit(model)) is not None and tokens.shape[1] > n_pos:
        raise MechscopeError(f"the tokens hold contexts of {tokens.shape[1]} tokens, longer than {model.summary.name} takes "
                             f"({n_pos} positions); cut them to {n_pos} tokens or fewer.")
    check_sae_fits(sae, model)
    cfg = sae.cfg
    bridge = model.bridge
    dev = model.device
    sae = sae.to(dev)
    hook_in, hook_out = cfg.hook_name, (cfg.hook_name_out if cfg.is_transcoder else cfg.hook_name)
    sums: dict[str, float] = dict(n=0, l0=0.0, mse=0.0, cos=0.0, ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl=0.0, ce_n=0)
    fired = torch.zeros(cfg.d_sae, dtype=torch.float64, device=dev)
    y_sum = torch.zeros(cfg.out_dim, dtype=torch.float64, device=dev)
    y_sq = torch.zeros((), dtype=torch.float64, device=dev)
    bar = as_progress(progress).phase("evaluating", total=tokens.shape[0], unit="ctx")
    with reading_mode(model, *(h for h in (hook_in, hook_out) if h)):  # the mode the activation store trained it in: BLOOM feeds
        # hook_attn_out only with plain attention (session 39: sae eval found nothing there)
        for start in range(0, tokens.shape[0], batch_size):
            toks = tokens[start : start + batch_size].to(dev)
            store: dict[str, Tensor] = {}

            def grab_in(t, hook):  # noqa: ANN001
                store["x"] = t.detach()

            def grab_out(t, hook):  # noqa: ANN001
                store["y"] = t.detach()

            clean_logits = bridge.run_with_hooks(toks, fwd_hooks=[(hook_in, grab_in), (hook_out, grab_out)])
            x, y = store["x"][:, skip_first:], store["y"][:, skip_first:]
            f = sae.encode(x)
            y_hat = sae.decode(f, x)

            def splice(t, hook):  # noqa: ANN001
                t = t.clone()
                t[:, skip_first:] = y_hat.to(t.dtype)
                return t

            def zero(t, hook):  # noqa: ANN001
                t = t.clone()
                t[:, skip_first:] = 0
                return t

            sae_logits = bridge.run_with_hooks(toks, fwd_hooks=[(hook_out, splice)])
            zero_logits = bridge.run_with_hooks(toks, fwd_hooks=[(hook_out, zero)])
            # Statistics over positions >= skip_first; losses over the predictions *of* the tokens there,
            # made from position skip_first - 1 on (the transcoder evaluation's convention too).
            lo = max(skip_first, 1) - 1
            ce_c, ce_s, ce_z = (_ce(l, toks)[:, lo:] for l in (clean_logits, sae_logits, zero_logits))
            lp_c = clean_logits[:, skip_first:].float().log_softmax(-1)
            lp_s = sae_logits[:, skip_first:].float().log_softmax(-1)
            kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)
            err = (y - y_hat).float()
            n = x.shape[0] * x.shape[1]
            sums["n"] += n
            sums["l0"] += float((f > 0).sum())
            sums["mse"] += float(err.pow(2).sum())
            sums["cos"] += float(torch.nn.functional.cosine_similarity(y_hat.float(), y.float(), dim=-1).sum())
            sums["ce_clean"] += float(ce_c.sum())
            sums["ce_sae"] += float(ce_s.sum())
            sums["ce_zero"] += float(ce_z.sum())
            sums["ce_n"] += ce_c.numel()
            sums["kl"] += float(kl.sum())
            fired += (f > 0).flatten(0, 1).sum(0).double()
            yf = y.flatten(0, 1).double()
            y_sum += yf.sum(0)
            y_sq += yf.pow(2).sum()
            bar.advance(toks.shape[0])
    bar.close()
    n, m = int(sums["n"]), int(sums["ce_n"])
    var = float(y_sq / n - (y_sum / n).pow(2).sum())  # summed per-dimension variance
    density = (fired / n).cpu()
    ce_clean, ce_sae, ce_zero = sums["ce_clean"] / m, sums["ce_sae"] / m, sums["ce_zero"] / m
    logd = torch.log10(density.clamp_min(1e-10))
    edges = [-10.0] + [e / 2 for e in range(-14, 1)]  # "never" bin, then 10^-7 .. 1 in half-decades
    counts = [float(((logd >= edges[i]) & (logd < edges[i + 1])).sum()) for i in range(len(edges) - 1)]
    counts[-1] += float((logd >= edges[-1]).sum())
    return SAEEval(
        tokens=n,
        l0=sums["l0"] / n,
        mse=sums["mse"] / n,
        fvu=(sums["mse"] / n) / var if var > 0 else math.nan,
        cos=sums["cos"] / n,
        ce_clean=ce_clean,
        ce_sae=ce_sae,
        ce_zero=ce_zero,
        ce_recovered=recovered(ce_zero, ce_sae, ce_clean),
        kl=sums["kl"] / n,
        dead_frac=float((density == 0).float().mean()),
        dense_frac=float((density > DENSE).float().mean()),
        density_hist={"log10_edges": edges, "counts": counts},
        sae={"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k,
             "hook_name": cfg.hook_name, "hook_name_out": cfg.hook_name_out, "model_name": cfg.model_name},
        settings={"skip_first": skip_first, "contexts": int(tokens.shape[0]), "ctx_len": int(tokens.shape[1])},
    )


def evaluate_on_corpus(model: Model, sae: SAE, corpus: str | None = None, *, n_tokens: int = 32_768,
                       context_len: int | None = None, batch_size: int = 8, progress: ProgressArg = False) -> SAEEval:
    """Evaluate ``sae`` on the held-out split of ``corpus`` (``activations.get_corpus``; default
    the embedded corpus, whose train split SAEs are trained on): ``n_tokens // context_len``
    contexts (at least one) of ``context_len`` tokens (default: min(128, the model's context), as
    the CLI's). ``settings["corpus"]`` names the text."""
    from mechscope.models.load import default_length

    if n_tokens < 1:
        raise MechscopeError(f"--tokens must be at least 1 (held-out tokens to evaluate on); got {n_tokens}.")
    require_model(model, "evaluate_on_corpus")
    if context_len is None:
        context_len = default_length(model, StoreConfig.context_len)
    check_context_len(context_len)
    check_context_fits(model, context_len, "context_len")
    n_ctx = max(1, n_tokens // context_len)
    ctx = list(itertools.islice(pack_contexts(model.tokenizer, get_corpus(corpus, split="heldout"), context_len), n_ctx))
    if not ctx:
        raise MechscopeError("the held-out corpus yields no full context; use a larger corpus or a smaller --context-len.")
    r = evaluate_sae(model, sae, torch.tensor(ctx), batch_size=batch_size, progress=progress)
    r.settings["corpus"] = (corpus or "embedded") + " (held-out split)"
    return r
