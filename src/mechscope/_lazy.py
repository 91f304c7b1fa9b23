"""Lazy package exports: a method package's ``__init__`` imports only its torch-free
``config`` module and loads every other exported name from its submodule on first use.

Why: the CLI builds its options from the config dataclasses' defaults (``DiscoverConfig.n``)
when it starts, and ``mechscope --help`` should not import torch to do so. Importing
``mechscope.circuits.config`` runs ``mechscope/circuits/__init__.py``, so that file must not
import the torch-based modules eagerly.

``from mechscope.circuits import discover`` keeps meaning the function: importing a submodule
makes it an attribute of its package, and where a package exports a function named like the
submodule that defines it (``circuits.discover``, ``circuits.acdc``, ``heads.dynamics``), the
package keeps the function, as an eager ``from .discover import discover`` did.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_EXPORTS = "_lazy_exports"


class _LazyPackage(ModuleType):
    def __getattr__(self, name: str):
        where = self.__dict__.get(_EXPORTS, {}).get(name)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{where}"), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, ModuleType) and self.__dict__.get(_EXPORTS, {}).get(name) == name:
            value = getattr(value, name)  # the import system announcing submodule `name`: keep the function
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.__dict__.get(_EXPORTS, {})))


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Make ``package`` (call with ``__name__`` from its ``__init__``) load each name in
    ``exports`` (name -> submodule that defines it) on first access."""
    module = sys.modules[package]
    module.__dict__[_EXPORTS] = dict(exports)
    module.__class__ = _LazyPackage
