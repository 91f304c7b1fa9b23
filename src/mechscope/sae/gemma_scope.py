"""Convert a Gemma Scope SAE (``params.npz``) into an SAE folder mechscope and SAELens read.

Gemma Scope (Lieberum et al. 2024) ships each JumpReLU SAE as one ``params.npz`` in a folder
such as ``layer_12/width_16k/average_l0_82`` of a repository named ``gemma-scope-2b-pt-res``
(``-mlp`` for MLP outputs, ``-att`` for attention's per-head outputs). The arrays are
``W_enc [d_model, d_sae]``, ``W_dec [d_sae, d_model]``, ``b_enc [d_sae]``, ``b_dec [d_model]``
and ``threshold [d_sae]``; the encoder reads the activation as it is (no ``b_dec`` subtracted)
and keeps ``relu(pre)`` where ``pre > threshold``. That is mechscope's ``jumprelu`` with
``apply_b_dec_to_input`` false once the threshold is clamped at 0 (below 0 the ReLU decides,
which is the same as a threshold of 0), so the conversion is exact.

The arrays are read with ``numpy.load(allow_pickle=False)``: an ``.npz`` is a zip of ``.npy``
arrays, and without pickles numpy reads numbers only (an object array is refused). The result
is saved as ``cfg.json`` + ``sae_weights.safetensors`` (``mechscope sae convert``).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from mechscope.errors import MechscopeError
from mechscope.sae.model import SAE, SAEConfig

ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_SITES = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out"}


def infer_hook(path: Path) -> str | None:
    """The hook a Gemma Scope file reads, from its path: a ``layer_N`` folder and a repository
    folder ending in ``-res`` or ``-mlp`` (e.g. ``gemma-scope-2b-pt-res``, also as the Hugging
    Face cache writes it, ``models--google--gemma-scope-2b-pt-res``); None when the path does
    not say. Attention SAEs (``-att``) read per-head outputs, which mechscope's SAEs do not."""
    parts = [p.lower() for p in path.resolve().parts]
    layer = next((m.group(1) for p in reversed(parts) if (m := re.fullmatch(r"layer_(\d+)", p))), None)
    site = next((m.group(1) for p in reversed(parts) if (m := re.search(r"gemma-scope.*-(res|mlp|att|transcoders)(?:$|-)", p))), None)
    if site in ("att", "transcoders"):
        what = "attention SAEs read each head's output (hook_z), which mechscope's SAEs do not" if site == "att" else \
            "Gemma Scope transcoders are not converted (only residual-stream and MLP-output SAEs are)"
        raise MechscopeError(f"{path} is a Gemma Scope {site} file: {what}.")
    if layer is None or site is None:
        return None
    return _SITES[site].format(layer=layer)


def check_npz_file(path: Path) -> None:
    """One sentence when ``path`` is not a file that can hold arrays (missing, a folder, not a zip
    archive): said first, before anything read from its path (which hook it reads) is judged."""
    if path.is_dir():
        raise MechscopeError(f"{path} is a folder; give the params.npz file inside it (a Gemma Scope SAE).")
    if not path.is_file():
        raise MechscopeError(f"no such file: {path} does not exist; give the params.npz file of a Gemma Scope SAE.")
    if not zipfile.is_zipfile(path):  # numpy would try a non-zip file as a pickle
        raise MechscopeError(f"{path} is not a readable .npz file (not a zip archive of arrays); download it again.")


def read_params(path: Path) -> dict[str, np.ndarray]:
    """The five arrays of a Gemma Scope ``params.npz`` (float, all finite), or one sentence on what is wrong."""
    check_npz_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [a for a in ARRAYS if a not in f.files]
            if missing:
                raise MechscopeError(f"{path} lacks {', '.join(missing)} (it has {', '.join(f.files) or 'nothing'}); "
                                     f"a Gemma Scope SAE holds {', '.join(ARRAYS)}.")
            out = {a: f[a] for a in ARRAYS}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise MechscopeError(f"{path} is not a readable .npz file ({exc}); download it again.") from None
    except ValueError as exc:  # numpy refuses object arrays without pickles
        raise MechscopeError(f"{path} holds an array numpy cannot read without unpickling ({exc}); mechscope never unpickles.") from None
    bad = [a for a, v in out.items() if not np.issubdtype(v.dtype, np.floating)]
    if bad:
        raise MechscopeError(f"{path}: {', '.join(bad)} must be float arrays (got {', '.join(str(out[a].dtype) for a in bad)}).")
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float32 is refused below, without numpy's warning
        bad = [a for a, v in out.items() if not np.isfinite(v).all() or not np.isfinite(v.astype(np.float32)).all()]
    if bad:
        raise MechscopeError(f"{path}: {', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN or infinite values (as float32), "
                             "so the SAE would give undefined figures; download it again.")
    return out


def gemma_scope_sae(npz: str | Path, hook: str | None = None, model_name: str = "", metadata: dict | None = None) -> SAE:
    """The SAE in ``npz`` (a Gemma Scope ``params.npz``), to save with ``sae.io.save_sae``.
    ``hook``: the hook it reads (default: from the path, ``infer_hook``); ``metadata`` is added
    to its config's (e.g. ``model_path``)."""
    npz = Path(npz)
    check_npz_file(npz)
    hook = hook or infer_hook(npz)
    if not hook:
        raise MechscopeError(f"cannot tell which hook {npz} reads (no layer_N folder inside a gemma-scope-...-res or -mlp "
                             "folder in its path); pass it with --hook, e.g. blocks.12.hook_resid_post.")
    p = read_params(npz)
    if p["W_enc"].ndim != 2:
        raise MechscopeError(f"{npz}: W_enc has shape {list(p['W_enc'].shape)}, but an encoder is a matrix [d_in, d_sae]; "
                             "the file is not a Gemma Scope SAE.")
    d_in, d_sae = p["W_enc"].shape
    if not d_in or not d_sae:
        raise MechscopeError(f"{npz}: W_enc has shape {list(p['W_enc'].shape)}, an SAE with "
                             f"{'no features (d_sae 0)' if not d_sae else 'no input dimensions (d_in 0)'}; the file is empty.")
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in want.items():
        if p[name].shape != shape:
            raise MechscopeError(f"{npz}: {name} has shape {list(p[name].shape)}, but W_enc {list(p['W_enc'].shape)} implies "
                                 f"{list(shape)}; the arrays do not belong to one SAE.")
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="jumprelu", hook_name=hook, model_name=model_name,
                    apply_b_dec_to_input=False,
                    metadata={"converted_from": f"Gemma Scope {npz.name}", "source_path": str(npz.resolve()), **(metadata or {})})
    sae = SAE(cfg)
    with torch.no_grad():
        for name in ARRAYS:
            t = torch.from_numpy(np.ascontiguousarray(p[name])).float()
            getattr(sae, name).copy_(t.clamp(min=0.0) if name == "threshold" else t)
    return sae
