"""The lazy packages' ``if TYPE_CHECKING:`` import blocks (what mypy and IDEs read) list exactly
the names their lazy tables serve, from the same submodules: a name added to one and not the
other fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import mechscope

SRC = Path(mechscope.__file__).parent


def _type_checking_imports(tree: ast.Module) -> dict[str, str]:
    """{name: module} imported under ``if TYPE_CHECKING:`` at module level."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), ast.dump(imp)
                for alias in imp.names:
                    out[alias.asname or alias.name] = imp.module
    return out


def _lazy_table(tree: ast.Module) -> dict[str, str] | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
            return ast.literal_eval(node.args[1])
    return None


def test_every_lazy_package_declares_its_exports_for_type_checkers():
    packages = 0
    for init in sorted(SRC.rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        table = _lazy_table(tree)
        if table is None:
            continue
        packages += 1
        pkg = ".".join(init.parent.relative_to(SRC.parent).parts)
        expected = {name: f"{pkg}.{mod}" for name, mod in table.items()}
        assert _type_checking_imports(tree) == expected, init


    assert packages >= 10


def test_top_level_type_checking_block_matches_the_lazy_table():
    tree = ast.parse((SRC / "__init__.py").read_text())
    expected = {name: f"mechscope.{sub}" for name, sub in mechscope._LAZY.items()}
    assert _type_checking_imports(tree) == expected
