"""Self-contained HTML reports.

``write_circuit_report(data, path)`` renders a parsed ``circuit.json`` (schema version 1) into
one HTML file with inline CSS, JS and SVG: no network access is needed to view it, and every
string that comes from the data (model tokens, prompt, names) is HTML-escaped.
"""

from __future__ import annotations

from mechscope.report.html import render_circuit_report, write_circuit_report

__all__ = ["render_circuit_report", "write_circuit_report"]
