"""The baseline explainer: a short phrase built from the tokens that drive the unit, no language model.

Algorithm (deterministic; the same exemplars always give the same text):

1. Take the unit's train ``top`` exemplars (all train exemplars when there are none), at most
   ``n_top``, and their focus activations ``a_i`` (relu'd).
2. Weight every focus token (stripped, case-folded) by the sum of ``a_i`` over the exemplars
   where it is the focus token; do the same for the token just before the focus (``prev``).
3. ``share(k)`` = the weight of the ``k`` heaviest tokens / the total weight.
   - focus concentrated (``share_focus(3) >= 0.5``): ``the token(s) "X", "Y", "Z"`` (plus
     ``, mostly after "P"`` when the previous token is concentrated too);
   - focus spread but previous token stable (``share_prev(1) >= 0.5``): ``the token right
     after "P" (such as "X", "Y")``;
   - neither: ``tokens such as "X", "Y", "Z"``.

The phrase names literal tokens on purpose: the simulator (``mechscope.explain.scoring``) reads
the description next to the exemplar's tokens, and quoted tokens are what it can match.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from mechscope.explain.explainers.base import Explainer
from mechscope.explain.types import Exemplar, UnitRecord


def _weights(pairs: list[tuple[str, float]]) -> tuple[list[tuple[str, float]], float]:
    """Group tokens by their stripped, case-folded form; -> [(shown form, weight)] heaviest first, total."""
    weight: dict[str, float] = defaultdict(float)
    forms: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for tok, w in pairs:
        key = tok.strip().casefold()
        if not key:
            key = repr(tok)  # whitespace tokens: keep them apart, shown as '\n', ' '...
        weight[key] += w
        forms[key][tok.strip() or repr(tok).strip("'")] += w
    ranked = sorted(weight, key=lambda k: (-weight[k], k))
    out = [(max(forms[k], key=lambda f: (forms[k][f], f)), weight[k]) for k in ranked]
    return out, sum(weight.values())


def _quote(tokens: list[str]) -> str:
    return ", ".join(f'"{t}"' for t in tokens)


class BaselineExplainer(Explainer):
    """``the token(s) "X", "Y"`` / ``the token right after "P"`` from the top train exemplars."""

    name = "baseline"

    def __init__(self, n_top: int = 20, n_tokens: int = 3, concentrated: float = 0.5):
        self.n_top = n_top
        self.n_tokens = n_tokens
        self.concentrated = concentrated

    @property
    def settings(self) -> dict[str, Any]:
        return {"n_top": self.n_top, "n_tokens": self.n_tokens, "concentrated": self.concentrated}

    def explain(self, unit: UnitRecord, train: list[Exemplar], n_samples: int = 1) -> list[str]:
        return [self.phrase(train)]

    def phrase(self, train: list[Exemplar]) -> str:
        top = [e for e in train if e.kind == "top"] or list(train)
        top = sorted(top, key=lambda e: -e.act)[: self.n_top]
        top = [e for e in top if e.act > 0]  # a unit that never fires is not a detector of whatever token it sat on
        if not top:
            return "no activating tokens seen"
        focus, f_total = _weights([(e.tokens[e.focus], max(e.act, 0.0) or 1.0) for e in top])
        prev, p_total = _weights([(e.tokens[e.focus - 1], max(e.act, 0.0) or 1.0) for e in top if e.focus > 0])
        k = self.n_tokens
        f_share = sum(w for _, w in focus[:k]) / f_total if f_total > 0 else 0.0
        p_share = prev[0][1] / p_total if prev and p_total > 0 else 0.0
        names = [t for t, _ in focus[:k]]
        if f_share >= self.concentrated:
            text = f"the token{'s' if len(names) > 1 else ''} {_quote(names)}"
            if p_share >= self.concentrated and len(top) > 1:
                text += f', mostly after "{prev[0][0]}"'
            return text
        if p_share >= self.concentrated:
            return f'the token right after "{prev[0][0]}" (such as {_quote(names[:2])})'
        return f"tokens such as {_quote(names)}"
