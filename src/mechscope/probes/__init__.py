"""Linear probes with control tasks (Hewitt and Liang 2019): what a layer encodes linearly, and
whether a probe learned it or only memorised word types.

    from mechscope.probes import ProbeConfig, builtin_labels, run_probe
    data = builtin_labels(model, "capitalised", ProbeConfig())
    res = run_probe(model, data, ProbeConfig(hook="resid_post"))
    print(res.table())                     # accuracy, control accuracy, selectivity by layer

The config (``probes.config``, no torch) is imported with the package; the rest loads on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.probes.config import BUILTIN_LABELS, ProbeConfig

__all__ = ["BUILTIN_LABELS", "LabelSet", "ProbeConfig", "ProbeResult", "builtin_labels", "fit_logistic",
           "labels_from_file", "run_probe"]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.probes.fit import fit_logistic
    from mechscope.probes.labels import LabelSet, builtin_labels, labels_from_file
    from mechscope.probes.run import ProbeResult, run_probe

lazy_exports(__name__, {
    "LabelSet": "labels", "builtin_labels": "labels", "labels_from_file": "labels",
    "fit_logistic": "fit",
    "ProbeResult": "run", "run_probe": "run",
})
