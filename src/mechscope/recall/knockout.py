"""Attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations in
Auto-Regressive Language Models", section 3).

Block the attention edges from the last position to a set of key positions in a window of
layers around layer l (their pre-softmax scores set to -inf, so the last position's attention
renormalises over the other keys) and measure the relative change of p(target):
(p_knockout - p_clean) / p_clean, for every window centre l. Key sets:

- ``subject``: the subject's positions;
- ``non_subject``: every other position except the last (Geva's "non-subject" edges);
- ``non_subject_matched``: as many non-subject positions as the subject has (a seeded random
  draw among them, never the first position), the control with the same number of blocked edges;
- ``first``: the first position alone, when it is not part of the subject. A model without a
  BOS token (SmolLM2, GPT-2) parks most attention on the first token (an "attention sink"), so
  blocking it measures that, not the flow of information; it is kept out of the matched
  control and reported on its own;
- ``last``: the last position itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import check_config
from mechscope.models.check import require_attention_edits
from mechscope.models.tokens import check_token_id, one_prompt
from mechscope.recall.config import RecallConfig, check_subject_positions, window_layers
from mechscope.recall.engine import Row, run_rows

if TYPE_CHECKING:
    from mechscope.models import Model

GROUPS = ("subject", "non_subject", "non_subject_matched", "first", "last")


@dataclass
class Knockout:
    """Relative change of p(target) [len(layers)] per key group (window centred on each of
    ``layers``)."""

    clean_prob: float
    relative_change: dict[str, torch.Tensor]
    positions: dict[str, list[int]]
    window: int
    layers: list[int]

    def to_dict(self) -> dict[str, Any]:
        """Every number as plain JSON (``recall.json``'s ``attention_knockout``)."""
        return {
            "clean_prob": self.clean_prob, "window": self.window, "layers": self.layers, "key_positions": self.positions,
            "relative_change": {g: v.tolist() for g, v in self.relative_change.items()},
            "axes": "[window centre: index into layers]; (p_knockout - p_clean) / p_clean",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Knockout:
        """The knockout ``to_dict`` wrote, exactly: the curves are float32, as ``attention_knockout``
        makes them (probabilities from the float32 unembedding), and survive JSON unchanged."""
        return cls(clean_prob=d["clean_prob"],
                   relative_change={g: torch.tensor(v, dtype=torch.float32) for g, v in d["relative_change"].items()},
                   positions={g: list(v) for g, v in d["key_positions"].items()}, window=d["window"], layers=list(d["layers"]))


def key_groups(n_pos: int, subject_pos: list[int], seed: int = 0) -> dict[str, list[int]]:
    """The key positions of each knockout group (empty groups are dropped)."""
    last = n_pos - 1
    non = [p for p in range(n_pos - 1) if p not in subject_pos]
    rng = random.Random(seed)
    pool = [p for p in non if p != 0]
    matched = sorted(rng.sample(pool, min(len(subject_pos), len(pool))))
    groups = {"subject": [p for p in subject_pos if p != last], "non_subject": non, "non_subject_matched": matched,
              "first": [0] if 0 in non else [], "last": [last]}
    return {k: v for k, v in groups.items() if v}


@torch.no_grad()
def attention_knockout(model: Model, tokens: torch.Tensor, subject_pos: list[int], target_id: int,
                       cfg: RecallConfig | None = None) -> Knockout:
    """Knockout curves of one prompt, tokens [1, pos]."""
    check_config(cfg, RecallConfig, "attention_knockout")
    require_attention_edits(model, "attention_knockout")
    cfg = cfg or RecallConfig()
    tokens = one_prompt(model, tokens, "attention_knockout")
    target_id = check_token_id(model, target_id, "attention_knockout")
    subject_pos = check_subject_positions(subject_pos, tokens.shape[1], "attention_knockout")
    L = model.summary.n_layers
    _, window = cfg.windows(L)
    groups = key_groups(tokens.shape[1], subject_pos, cfg.seed)
    layers = cfg.layers(L)
    rows = [Row()]
    for keys in groups.values():
        for l in layers:
            rows.append(Row(block={j: keys for j in window_layers(l, window, L)}))
    probs = run_rows(model, tokens, target_id, rows, max_rows=cfg.max_rows)
    clean = float(probs[0])
    rel = ((probs[1:] - clean) / max(clean, 1e-12)).view(len(groups), len(layers))
    return Knockout(clean_prob=clean, relative_change={g: rel[i] for i, g in enumerate(groups)}, positions=groups,
                    window=window, layers=layers)
