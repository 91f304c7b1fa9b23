"""Build the API reference from the docstrings into docs/api/ (generated; never committed).

    .venv/bin/python docs/build_api.py

Needs pdoc (``pip install -e ".[docs]"``). Works offline: it imports mechscope's modules but
loads no model. Every public module is documented, not only what the packages' ``__all__``
re-export (pdoc's own walk stops there), and docs/api/index.html lists them all.
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pdoc  # noqa: E402
import pdoc.render  # noqa: E402

import mechscope  # noqa: E402

HERE = Path(__file__).resolve().parent


def public_modules() -> list[str]:
    found = pkgutil.walk_packages(mechscope.__path__, "mechscope.")
    return ["mechscope"] + sorted(m.name for m in found if not any(p.startswith("_") for p in m.name.split(".")))


def main(out: Path = HERE / "api") -> int:
    modules = public_modules()
    shutil.rmtree(out, ignore_errors=True)
    pdoc.render.configure(docformat="restructuredtext", template_directory=HERE / "pdoc-templates",
                          footer_text=f"mechscope {mechscope.__version__}")
    with warnings.catch_warnings():
        # Each module is named explicitly, so pdoc's own walk of a package meets some twice.
        warnings.filterwarnings("ignore", message="The module specification .* has already been added")
        pdoc.pdoc(*modules, output_directory=out)
    print(f"docs/api: {len(modules)} modules -> {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
