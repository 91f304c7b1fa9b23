"""The local explainer: the loaded model itself writes the description (transformers generation).

The prompt is the server explainer's (``base.SYSTEM_PROMPT`` + ``base.explain_prompt``), put
through the tokenizer's chat template when it has one (the embedded SmolLM2-135M-Instruct
does), else as plain ``system / user / "Explanation:"`` text. Sample 0 is greedy; further
samples are drawn at ``temperature`` with a seeded generator, so a run is reproducible.
Generation runs on the plain Hugging Face model (``mechscope.explain.plain``): the bridge's
wrapped model keeps no key/value cache, so ``generate`` through it goes wrong.

Quality: a 135M model writes weak descriptions (often a paraphrase of the instructions or one
of the highlighted tokens); that is expected, and the scores with their shuffled control say
how weak. Point ``--explainer server`` at a stronger model for useful descriptions.
"""

from __future__ import annotations

from typing import Any

from mechscope.explain.explainers.base import (
    MAX_EXEMPLARS,
    SYSTEM_PROMPT,
    Explainer,
    UnitFailed,
    explain_prompt,
    parse_description,
)
from mechscope.explain.types import Exemplar, UnitRecord


class LocalExplainer(Explainer):
    """Descriptions generated in process by ``model`` (a ``mechscope.models.Model``, a name, or a ``PlainLM``)."""

    name = "local"

    def __init__(self, model: Any, temperature: float = 0.7, max_new_tokens: int = 40, seed: int = 0):
        from mechscope.explain.plain import plain_lm

        self.model, self.temperature, self.max_new_tokens, self.seed = plain_lm(model), temperature, max_new_tokens, seed

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def settings(self) -> dict[str, Any]:
        return {"model": self.model.name, "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed}

    def prompt_ids(self, unit: UnitRecord, train: list[Exemplar], n: int = MAX_EXEMPLARS) -> list[int]:
        tok = self.model.tokenizer
        user = explain_prompt(unit, train, n)
        if getattr(tok, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            return list(ids)
        return tok(f"{SYSTEM_PROMPT}\n\n{user}\nExplanation:", add_special_tokens=True)["input_ids"]

    def fitting_prompt(self, unit: UnitRecord, train: list[Exemplar]) -> list[int]:
        """The prompt's token ids with as many exemplars as fit the model's positions together with
        the tokens to generate: ``MAX_EXEMPLARS``, halved while it overflows (as the server
        explainer does), or ``UnitFailed`` when even one does not fit (a sweep found a GPT-2-style
        model's generation failing with an IndexError past its last position)."""
        from mechscope.models.load import hf_position_limit

        limit, n = hf_position_limit(self.model.hf), MAX_EXEMPLARS
        while True:
            ids = self.prompt_ids(unit, train, n)
            if limit is None or len(ids) + self.max_new_tokens <= limit:
                return ids
            shown = min(n, len(train))
            if shown <= 1:
                raise UnitFailed(f"the local explainer's model {self.model.name} reads at most {limit} positions, but the prompt of "
                                 f"unit {unit.unit.key} with {'one exemplar' if shown else 'no exemplar'} takes {len(ids)} tokens and "
                                 f"{self.max_new_tokens} more are generated; use a model with a longer context or the server explainer.")
            n = shown // 2

    def explain(self, unit: UnitRecord, train: list[Exemplar], n_samples: int = 1) -> list[str]:
        import torch

        hf = self.model.hf
        tok = self.model.tokenizer
        ids = torch.tensor([self.fitting_prompt(unit, train)], device=self.model.device)  # [1, pos]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out: list[str] = []
        with torch.no_grad():
            for s in range(max(1, n_samples)):
                kw: dict[str, Any] = {"do_sample": False}
                if s > 0:
                    torch.manual_seed(self.seed + s)
                    kw = {"do_sample": True, "temperature": self.temperature, "top_k": 50}
                gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                  pad_token_id=pad, top_p=None, **kw)  # [1, pos + new]
                text = parse_description(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
                if text and text not in out:
                    out.append(text)
        return out or ["(no description)"]
