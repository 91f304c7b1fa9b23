"""The shared value checks: ``errors.check_number_fields``, ``errors.check_at_least``,
``heads.config.check_toy_model`` and ``models.tokens.ids_outside``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mechscope.errors import MechscopeError, check_at_least, check_number_fields
from mechscope.heads.config import check_toy_model
from mechscope.models.tokens import ids_outside


@dataclass
class _Cfg:
    n: int = 1
    edges: int | None = None
    share: float = 0.5
    name: str = "x"
    path: str | None = None


@pytest.mark.parametrize("kw, kwargs, message", [
    (dict(n="5"), {}, "_Cfg.n must be an integer; got '5' (a str)."),
    (dict(n=True), {}, "_Cfg.n must be an integer; got True (a bool)."),
    (dict(edges=2.5), {"integer": "a whole number"}, "_Cfg.edges must be a whole number (or None); got 2.5 (a float)."),
    (dict(share="0.5"), {}, "_Cfg.share must be a number; got '0.5' (a str)."),
    (dict(name=None), {"strings": ("name", "path")}, "_Cfg.name must be a string; got None (a NoneType)."),
    (dict(path=3), {"strings": ("name", "path")}, "_Cfg.path must be a string (or None); got 3 (an int)."),
])
def test_check_number_fields_names_the_field_and_the_type(kw, kwargs, message):
    with pytest.raises(MechscopeError) as e:
        check_number_fields(_Cfg(**kw), **kwargs)
    assert str(e.value) == message


def test_check_number_fields_passes_good_values_and_unnamed_strings():
    check_number_fields(_Cfg(n=3, edges=None, share=1, path=None), strings=("name", "path"))
    check_number_fields(_Cfg(name=None))  # text fields are checked only when named in ``strings``


def test_check_at_least_reports_the_first_value_below():
    check_at_least(("--a", 1), ("--b", 5))
    with pytest.raises(MechscopeError, match=r"^--b must be at least 1; got 0\.$"):
        check_at_least(("--a", 1), ("--b", 0), ("--c", -1))
    with pytest.raises(MechscopeError, match=r"^--ctx-len must be at least 2; got 1\.$"):
        check_at_least(("--ctx-len", 1), least=2)


@pytest.mark.parametrize("steps, layers, heads, d_model", [(0, 2, 4, 128), (10, 0, 4, 128), (10, 2, 0, 128),
                                                           (10, 2, 4, 2), (10, 2, 3, 128)])
def test_check_toy_model_refuses_in_one_sentence(steps, layers, heads, d_model):
    with pytest.raises(MechscopeError, match=r"^train-toy needs steps >= 1, layers >= 1 and d_model divisible by the "
                                             r"number of heads\.$"):
        check_toy_model(steps, layers, heads, d_model)
    check_toy_model(10, 2, 4, 128)


def test_ids_outside():
    assert ids_outside(torch.tensor([0, 3, 9]), 10) is None
    assert ids_outside(torch.tensor([], dtype=torch.long), 10) is None
    assert ids_outside(torch.tensor([[0, 10], [2, 3]]), 10) == (0, 10)
    assert ids_outside(torch.tensor([-1, 3]), 10) == (-1, 3)
    assert ids_outside(torch.tensor([-1, 3]), None) == (-1, 3)
    assert ids_outside(torch.tensor([0, 10**6]), None) is None
