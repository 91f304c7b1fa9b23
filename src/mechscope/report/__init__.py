"""Self-contained HTML report pages, built from saved results (never from live tensors).

One module per page, each with ``render_<page>(data) -> str`` (a pure function: the result's
saved dict in, the HTML page out) and ``write_<page>(data, path) -> Path``:

- ``circuit``: ``circuit.json`` of ``mechscope discover``
- ``heads``: ``heads.json`` (+ ``example_patterns``) of ``mechscope heads``
- ``dynamics``: ``dynamics.json`` of ``mechscope dynamics`` (``write_dynamics`` also writes ``dynamics.svg``)
- ``lens``: ``lens.json`` of ``mechscope lens``
- ``recall``: ``recall.json`` of ``mechscope recall`` (one fact or the facts list)
- ``dashboard``: ``dashboard.json`` of ``mechscope sae dashboard``
- ``sae_eval``: ``eval.json`` of ``mechscope sae eval``

Every page is built from one toolkit: ``toolkit`` (escaping, ``fmt``, tables, cards, the JSON data
block, the page shell and the assets) and ``charts`` (heatmap, line chart, bars, histogram, axis
ticks). CSS and JS live in ``report/assets/`` (package data, read with ``importlib.resources``)
and are inlined into the page, so a page needs no network. Every string from the data is
escaped; model tokens are data, never markup.
"""

from __future__ import annotations
