"""Subject enrichment (Geva et al. 2023, section 4): how many subject-related tokens the
representation of the subject's last token encodes at each layer.

1. Related tokens of a subject, from the model itself (Geva et al. used Wikipedia paragraphs;
   mechscope has no corpus, so it asks the model): greedy continuations of ``gen_tokens``
   tokens of three prompts ("{s} is", "{s} is known for", "Facts about {s}:"). Every generated
   token, normalised (stripped, lower-cased), counts when it is alphabetic, at least 3
   letters long, not a stopword and not part of the subject's own name.
2. Project the residual stream after each layer (``hook_resid_post``) at the subject's last
   token to the vocabulary (final norm + unembedding) and take the ``top_k`` tokens. With a
   tuned lens (``tuned``, ``mechscope.lens.tuned``), each layer's state goes through that
   layer's translator first (the logit lens reads only the last layers on SmolLM2).
3. Attribute rate at a layer = the fraction of those top-k tokens whose normalised form is in
   the related set. The control rate uses another subject's related set: enrichment means the
   rate rises above the control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mechscope.models.hooks import resid_post
from mechscope.models.tokens import token_texts
from mechscope.models.unembed import final_norm, project
from mechscope.recall.engine import clean_states, greedy_continuations
from mechscope.recall.tracing import subject_ids

if TYPE_CHECKING:
    from mechscope.models import Model

PROMPTS = ("{s} is", "{s} is known for", "Facts about {s}:")

STOPWORDS = frozenset(
    """the and for are but not you all any can had her was one our out has him his how its may new now old see
    two who did get let put say she too use with that this from they will have been were what when your which their
    there than then them these those into also more most some such only other over very just about after before
    being both each here many much same should would could while where whom whose because between through during
    under above below again further once off own why known facts fact called well first made make like one two three
    year years people time way used uses many often part known based""".split()
)


def normalise(token: str) -> str:
    """Lower-cased, stripped form of a token, or '' when it cannot count as a related word."""
    t = token.strip().lower()
    return t if len(t) >= 3 and t.isalpha() and t not in STOPWORDS else ""


def related_tokens(model: Model, subjects: list[str], n_tokens: int = 24) -> list[set[str]]:
    """For each subject, the normalised tokens the model generates about it (greedy, batched;
    see the module docstring)."""
    tok = model.tokenizer
    prompts = [p.format(s=s) for s in subjects for p in PROMPTS]
    conts = greedy_continuations(model, prompts, n_tokens)
    out = []
    for k, subject in enumerate(subjects):
        own = {normalise(tok.decode([i])) for i in subject_ids(tok, subject)}  # as in tracing's noise std
        own |= {normalise(w) for w in subject.split()}
        words = {normalise(tok.decode([i])) for c in conts[k * len(PROMPTS):(k + 1) * len(PROMPTS)] for i in c}
        out.append(words - own - {""})
    return out


@torch.no_grad()
def subject_projections(model: Model, tokens: torch.Tensor, subject_last: int, top_k: int = 50, tuned=None) -> list[list[str]]:
    """The top-k tokens (decoded) of the residual stream after each layer at ``subject_last``,
    read by the logit lens or, with ``tuned``, by that tuned lens."""
    L = model.summary.n_layers
    hooks = [resid_post(l) for l in range(L)]
    st = clean_states(model, tokens, hooks)
    x = torch.stack([st[h][subject_last] for h in hooks])  # [L, d_model]
    if tuned is not None:
        x = torch.stack([tuned.translate(x[l], tuned.layer_of(h)) for l, h in enumerate(hooks)])
    ids = project(model, x, final_norm(model, ranks_only=True)).topk(top_k, dim=-1).indices  # [L, k]
    return [token_texts(model.tokenizer, row) for row in ids.tolist()]


def attribute_rate(top_tokens: list[list[str]], related: set[str]) -> torch.Tensor:
    """[n_layers]: fraction of each layer's top tokens whose normalised form is in ``related``."""
    return torch.tensor([sum(normalise(t) in related for t in row) / max(1, len(row)) for row in top_tokens])


@dataclass
class Enrichment:
    """Attribute rate per layer [n_layers] against the subject's related set and a control set."""

    rate: torch.Tensor
    control_rate: torch.Tensor
    related: list[str]
    control_subject: str
    top_tokens: list[list[str]]  # [n_layers][top_k]

    def to_dict(self) -> dict[str, Any]:
        """Every number and token as plain JSON (``recall.json``'s ``subject_enrichment``)."""
        return {"rate": self.rate.tolist(), "control_rate": self.control_rate.tolist(), "control_subject": self.control_subject,
                "related_tokens": self.related, "top_tokens": self.top_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Enrichment:
        """The enrichment ``to_dict`` wrote, exactly: the rates are float32, as ``attribute_rate``
        makes them."""
        return cls(rate=torch.tensor(d["rate"], dtype=torch.float32), control_rate=torch.tensor(d["control_rate"], dtype=torch.float32),
                   related=list(d["related_tokens"]), control_subject=d["control_subject"],
                   top_tokens=[list(row) for row in d["top_tokens"]])


def subject_enrichment(model, tokens: torch.Tensor, subject: str, subject_last: int, control_subject: str,
                       top_k: int = 50, gen_tokens: int = 24, related: set[str] | None = None,
                       control: set[str] | None = None, tuned=None) -> Enrichment:
    """Enrichment of one prompt's subject; ``related``/``control`` sets are built when not given;
    ``tuned``: a tuned lens to read the layers with (default: the logit lens)."""
    if related is None or control is None:
        related, control = related_tokens(model, [subject, control_subject], gen_tokens)
    top = subject_projections(model, tokens, subject_last, top_k, tuned)
    return Enrichment(rate=attribute_rate(top, related), control_rate=attribute_rate(top, control),
                      related=sorted(related), control_subject=control_subject, top_tokens=top)
