"""Explainers: one interface (``Explainer``), three backends.

    baseline   the tokens that drive the unit, as a phrase; no language model (``BaselineExplainer``)
    server     any OpenAI-compatible chat endpoint through the ``openai`` client (``ServerExplainer``)
    local      the loaded model itself, transformers generation (``LocalExplainer``)

``make_explainer(name, ...)`` builds one by name, as ``mechscope describe --explainer`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mechscope._lazy import lazy_exports
from mechscope.errors import MechscopeError, near_matches
from mechscope.explain.explainers.base import Explainer, explain_prompt, normalised, parse_description
from mechscope.explain.explainers.baseline import BaselineExplainer

EXPLAINERS = ("baseline", "server", "local")

__all__ = ["EXPLAINERS", "BaselineExplainer", "Explainer", "LocalExplainer", "ServerExplainer", "explain_prompt",
           "make_explainer", "normalised", "parse_description"]


def make_explainer(name: str, *, server: str | None = None, server_model: str | None = None,
                   model: Any = None, **kwargs: Any) -> Explainer:
    """The explainer called ``name``: ``server`` needs ``server`` (URL) and ``server_model``; ``local`` a loaded ``model``."""
    if name == "baseline":
        return BaselineExplainer(**kwargs)
    if name == "server":
        if not server or not server_model:
            raise MechscopeError("--explainer server needs --server URL and --model NAME (e.g. --server http://127.0.0.1:8080/v1 --model smollm2).")
        from mechscope.explain.explainers.server import ServerExplainer

        return ServerExplainer(server, server_model, **kwargs)
    if name == "local":
        from mechscope.explain.explainers.local import LocalExplainer

        if model is None:
            raise MechscopeError("--explainer local needs a loaded model.")
        return LocalExplainer(model, **kwargs)
    raise MechscopeError(f"Unknown explainer {name!r}; choose one of {', '.join(EXPLAINERS)}.{near_matches(name, list(EXPLAINERS))}")


if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.explain.explainers.local import LocalExplainer
    from mechscope.explain.explainers.server import ServerExplainer

lazy_exports(__name__, {"LocalExplainer": "local", "ServerExplainer": "server"})  # they import openai / torch
