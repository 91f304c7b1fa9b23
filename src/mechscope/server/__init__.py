"""``mechscope serve``: a local, read-only web UI over a unit database and run folders.

    from mechscope.server import create_app, serve
    serve("runs/", db="units.db", port=8000)      # http://127.0.0.1:8000

``app`` (Starlette routes, pages, JSON API), ``store`` (the database opened read-only),
``runs`` (run folders under a directory, their nodes, traversal-safe file lookup). The server
sits beside ``report`` and ``cli`` in the layering: it imports from everything below.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.server.app import create_app, serve
    from mechscope.server.runs import find_runs
    from mechscope.server.store import ReadOnlyUnitDB

lazy_exports(__name__, {"create_app": "app", "serve": "app", "find_runs": "runs", "ReadOnlyUnitDB": "store"})

__all__ = ["ReadOnlyUnitDB", "create_app", "find_runs", "serve"]
