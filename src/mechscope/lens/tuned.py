"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with
the Tuned Lens"): one affine translator per layer, decoded through the model's own final norm
and unembedding.

    lens = load_tuned_lens("tl-dir", model)           # checked against the model
    logits = lens.logits(model, h, layer)             # h [..., d_model] at lens.hooks[layer]

1. Translator l maps the residual stream h at ``lens.hooks[l]`` to ``h + A_l h + b_l``
   (``A_l`` [d_model, d_model] stored as [out, in], like ``torch.nn.Linear``; ``b_l``
   [d_model]). ``A_l = 0, b_l = 0`` is the identity, so an untrained lens IS the logit lens
   (a test checks equality, not closeness: the decoding is ``models.unembed.project``, the
   logit lens's own function).
2. ``reads`` says which hook translator l reads: ``resid_post`` (``blocks.l.hook_resid_post``,
   the residual stream after block l: mechscope's default, whose last translator reads the
   final residual and so is the identity) or ``resid_pre`` (``blocks.l.hook_resid_pre``,
   entering block l: the tuned-lens package's layout, whose translator 0 reads the embeddings).
   ``layer_of`` maps any residual hook onto the translator that reads it (``resid_post(l)`` is
   ``resid_pre(l + 1)``; the final residual needs no translator).

On disk (``save`` / ``load``): ``tuned_lens.json`` (``schema_version``, the model's name,
``d_model``, ``n_layers``, ``d_vocab``, ``reads``, the hook names, provenance and training
settings) + ``tuned_lens.safetensors`` with ``layers.{l}.weight`` [d_model, d_model] (A_l,
[out, in]) and ``layers.{l}.bias`` [d_model]. Nothing is ever unpickled.

Translators of the PyPI ``tuned-lens`` package (AlignmentResearch/tuned-lens, ``TunedLens.save``):
a folder with ``config.json`` (``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``,
``bias``, ``base_model_revision``, ``unembed_hash``, ``lens_type``) and ``params.pt``, a pickled
``torch.nn.ModuleList`` state dict with ``{i}.weight`` [d_model, d_model] ([out, in]) and
``{i}.bias`` [d_model] for i in 0..num_hidden_layers-1; translator i reads Hugging Face's
``hidden_states[i]`` (the embeddings for i = 0, else block i-1's output), i.e. ``resid_pre(i)``,
and adds its output to its input (``h + Linear(h)``), exactly as here. ``convert_tuned_lens``
(``mechscope tuned-lens convert PARAMS.pt --out DIR``) reads ``params.pt`` with
``torch.load(weights_only=True)`` only (which refuses pickled objects other than tensors and
plain containers, so no code in the file can run) and writes mechscope's layout. A folder
holding ``config.json`` + ``params.safetensors`` (the same keys, converted to safetensors by
any other means) loads directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import MechscopeError
from mechscope.models.hooks import FINAL_NORM_IN, parse_hook, resid_post, resid_pre
from mechscope.models.unembed import FinalNorm, final_norm, project

if TYPE_CHECKING:
    from mechscope.models import Model

SCHEMA_VERSION = 1
JSON_FILE = "tuned_lens.json"
WEIGHTS_FILE = "tuned_lens.safetensors"
PKG_CONFIG = "config.json"
PKG_WEIGHTS = "params.safetensors"


class TunedLens(torch.nn.Module):
    """One affine translator per layer: ``weight`` [n_layers, d_model, d_model] (A_l as [out,
    in]) and ``bias`` [n_layers, d_model]; zeros are the identity (the logit lens)."""

    def __init__(self, model: dict[str, Any], n_layers: int, d_model: int, reads: str = "resid_post",
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 info: dict[str, Any] | None = None):
        super().__init__()
        if reads not in ("resid_post", "resid_pre"):
            raise MechscopeError(f"reads='{reads}' is not a translator input; use resid_post or resid_pre.")
        self.model_info = {"name": model.get("name"), "d_model": d_model, "n_layers": n_layers, "d_vocab": model.get("d_vocab")}
        if model.get("fingerprint"):  # the weights' hash (``Model.fingerprint``): tells apart two models of one name
            self.model_info["fingerprint"] = model["fingerprint"]
        if model.get("source"):  # where it was loaded from (an absolute folder for a local model): what eval reloads
            self.model_info["source"] = model["source"]
        self.reads = reads
        self.weight = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model) if weight is None else weight.float().clone())
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model) if bias is None else bias.float().clone())
        if self.weight.shape != (n_layers, d_model, d_model) or self.bias.shape != (n_layers, d_model):
            raise MechscopeError(f"translator shapes {tuple(self.weight.shape)}, {tuple(self.bias.shape)} do not match "
                                 f"{n_layers} layers of width {d_model}.")
        self.info: dict[str, Any] = dict(info or {})

    @classmethod
    def identity(cls, model: Model, reads: str = "resid_post") -> "TunedLens":
        """Zero translators for ``model`` (the logit lens)."""
        s = model.summary
        return cls({**s.to_dict(), "fingerprint": model.fingerprint()}, s.n_layers, s.d_model, reads).to(model.device)

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    @property
    def hooks(self) -> list[str]:
        """The hook translator l reads, for every l."""
        make = resid_post if self.reads == "resid_post" else resid_pre
        return [make(l) for l in range(self.n_layers)]

    def layer_of(self, hook: str) -> int | None:
        """The translator that reads residual hook ``hook`` (``None``: the final residual,
        read as it is); a clear error for hooks that are not residual streams."""
        L = self.n_layers
        if hook == FINAL_NORM_IN:
            return None
        layer, site = parse_hook(hook)
        if layer is None or site not in ("hook_resid_pre", "hook_resid_post") or not 0 <= layer < L:
            raise MechscopeError(f"'{hook}' is not a residual stream the tuned lens reads; use blocks.l.hook_resid_pre or "
                                 f"blocks.l.hook_resid_post with l in 0..{L - 1}.")
        if self.reads == "resid_post":
            if site == "hook_resid_post":
                return layer
            if layer == 0:
                raise MechscopeError(f"this tuned lens reads resid_post only; it has no translator for '{hook}' (the embeddings).")
            return layer - 1
        if site == "hook_resid_pre":
            return layer
        return None if layer == L - 1 else layer + 1

    def extra_repr(self) -> str:  # printed inside TunedLens(...), as torch modules do
        return (f"model={self.model_info.get('name')!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"reads={self.reads!r}")

    def translate(self, h: torch.Tensor, layer: int | None) -> torch.Tensor:
        """``h + A_l h + b_l`` for h [..., d_model] (float32); ``layer`` None: h unchanged."""
        h = h.float()
        if layer is None:
            return h
        return h + h @ self.weight[layer].T + self.bias[layer]

    def translate_all(self, h: torch.Tensor) -> torch.Tensor:
        """Every translator at once: h [n, n_layers, d_model] (row l read at hooks[l]) -> same shape."""
        h = h.float()
        return h + torch.einsum("nli,loi->nlo", h, self.weight) + self.bias

    def logits(self, model, h: torch.Tensor, layer: int | None, norm: FinalNorm | None = None) -> torch.Tensor:
        """Logits [..., d_vocab] of h [..., d_model] read at ``hooks[layer]``: translated, then the
        final norm (own scale) and the unembedding."""
        return project(model, self.translate(h.to(self.weight.device), layer), norm or final_norm(model))

    # ------------------------------------------------------------------ model checks
    def check_fits(self, model: Model) -> None:
        """Raise one sentence unless these translators were made for ``model``."""
        s = model.summary
        mi = self.model_info
        where = f" (from {self.info['path']})" if self.info.get("path") else ""
        if mi["d_model"] != s.d_model or mi["n_layers"] != s.n_layers or (mi.get("d_vocab") not in (None, s.d_vocab)):
            raise MechscopeError(
                f"these translators{where} are for {mi.get('name') or 'another model'} ({mi['n_layers']} layers of width "
                f"{mi['d_model']}), not {s.name} ({s.n_layers} layers of width {s.d_model}); train a tuned lens for this "
                "model with `mechscope tuned-lens train`."
            )
        if mi.get("name") and not _same_name(str(mi["name"]), s.name):
            raise MechscopeError(
                f"these translators{where} were trained for {mi['name']}, not {s.name}; train a tuned lens for this model "
                "with `mechscope tuned-lens train` (or pass the model they were trained for with --model)."
            )
        if mi.get("fingerprint") and mi["fingerprint"] != model.fingerprint():
            raise MechscopeError(
                f"these translators{where} were trained for another model also called {s.name} (its weights differ); train a "
                "tuned lens for this model with `mechscope tuned-lens train` (or pass the model they were trained for with --model)."
            )

    def is_finite(self) -> bool:
        """Whether every weight and bias is a finite number (no NaN, no inf)."""
        return bool(torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all())

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": "tuned-lens", "model": self.model_info, "reads": self.reads,
                "hooks": self.hooks, "translator": "h -> h + A_l h + b_l; layers.{l}.weight is A_l as [out, in]",
                **{k: v for k, v in self.info.items() if k != "path"}}

    def save(self, out_dir: str | Path) -> Path:
        """Write ``tuned_lens.json`` + ``tuned_lens.safetensors`` into ``out_dir``, as one
        (``results.save_with_json``: a run killed between them is refused on load)."""
        from mechscope.results import save_with_json

        out = Path(out_dir)
        if not self.is_finite():
            raise MechscopeError(f"these translators hold NaN or inf values, so nothing was saved to {out}; train them again "
                                 "with a lower --lr.")
        tensors = {}
        for l in range(self.n_layers):
            tensors[f"layers.{l}.weight"] = self.weight[l].detach().float().cpu().contiguous()
            tensors[f"layers.{l}.bias"] = self.bias[l].detach().float().cpu().contiguous()
        save_with_json(out, JSON_FILE, self.to_dict(), WEIGHTS_FILE, tensors)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "TunedLens":
        """Translators from a folder written by ``save`` (or a tuned-lens package folder with
        ``config.json`` + ``params.safetensors``)."""
        p = Path(path)
        if p.is_file() and p.name == JSON_FILE:
            p = p.parent
        if not p.is_dir():
            raise MechscopeError(f"No tuned lens at '{path}'; pass the folder `mechscope tuned-lens train` wrote.")
        if not (p / JSON_FILE).is_file():
            if (p / PKG_CONFIG).is_file() and (p / PKG_WEIGHTS).is_file():
                return _load_package_layout(p)
            hint = (" (params.pt is a pickle: convert it with `mechscope tuned-lens convert params.pt --out DIR`)"
                    if (p / "params.pt").is_file() else "")
            raise MechscopeError(f"'{p}' holds no {JSON_FILE}{hint}; pass the folder `mechscope tuned-lens train` wrote.")
        from mechscope.results import read_result_json

        d, where = read_result_json(p, JSON_FILE, SCHEMA_VERSION, "mechscope tuned-lens train")
        mi: dict[str, Any] = d["model"] if isinstance(d.get("model"), dict) else {}
        L, D = _count(mi, "n_layers", where), _count(mi, "d_model", where)
        from mechscope.results import check_tensors_match

        check_tensors_match(d, p / WEIGHTS_FILE, str(path))
        t = _read_safetensors(p / WEIGHTS_FILE)
        weight, bias = _stack(t, L, D, "layers.", p / WEIGHTS_FILE)
        info = {k: v for k, v in d.items() if k not in ("schema_version", "kind", "model", "reads", "hooks", "translator")}
        info["path"] = str(p)
        return cls(mi, L, D, d.get("reads", "resid_post"), weight, bias, info)


def _same_name(a: str, b: str) -> bool:
    """Model names match when equal, ignoring case and any hub owner or folder prefix."""
    last = lambda s: str(s).rstrip("/").split("/")[-1].lower()  # noqa: E731
    return last(a) == last(b)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise MechscopeError(f"'{path}' is missing; the tuned lens folder is incomplete, so save or convert it again.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise MechscopeError(f"'{path}' is not a readable safetensors file ({exc}); save or convert the lens again.") from exc


def _stack(t: dict[str, torch.Tensor], L: int, D: int, prefix: str, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [L, D, D] and bias [L, D] from ``{prefix}{l}.weight`` / ``.bias`` (a missing bias is 0);
    one sentence for a tensor of the wrong shape or with NaN or inf in it."""
    ws, bs = [], []
    for l in range(L):
        w, b = t.get(f"{prefix}{l}.weight"), t.get(f"{prefix}{l}.bias")
        if w is None:
            raise MechscopeError(f"'{where}' has no {prefix}{l}.weight; it is not a tuned lens of {L} layers of width {D}.")
        for key, x, want in ((f"{prefix}{l}.weight", w, (D, D)), (f"{prefix}{l}.bias", b, (D,))):
            if x is None:
                continue
            if tuple(x.shape) != want:
                raise MechscopeError(f"'{where}' holds {key} of shape {tuple(x.shape)}, but a translator for a model of width "
                                     f"{D} needs {want}; it does not belong to this config, so convert or train the lens again.")
            if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
                what = f"{x.dtype} values" if not x.is_floating_point() else "NaN or inf values"
                raise MechscopeError(f"'{where}' holds {what} in {key}, so its translators are unusable; train the lens again "
                                     "(with a lower --lr if its fit diverged) or convert a sound params.pt.")
        ws.append(w.float())
        bs.append(torch.zeros(D) if b is None else b.float())

    def index(k: str) -> int:
        head = k[len(prefix):].split(".")[0] if k.startswith(prefix) else ""
        return int(head) if head.isdigit() else L

    extra = sorted(k for k in t if index(k) >= L)
    if extra:
        raise MechscopeError(f"'{where}' has tensors beyond {L} translators ({', '.join(extra[:3])}); its config does not match it.")
    return torch.stack(ws), torch.stack(bs)


def _count(cfg: dict[str, Any], key: str, where: Path) -> int:
    """``cfg[key]`` as a whole number of at least 1 (a layer count or a width), else one sentence."""
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 1:
        raise MechscopeError(f"'{where}' gives {key} = {json.dumps(v)}, which is not a whole number of at least 1; fix it "
                             "to the model's value.")
    return int(v)


def _package_config(path: Path, model_name: str | None = None) -> tuple[dict[str, Any], int, int]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MechscopeError(f"'{path}' is not a readable tuned-lens config.json ({exc}).") from exc
    if not isinstance(cfg, dict) or "num_hidden_layers" not in cfg or "d_model" not in cfg:
        raise MechscopeError(f"'{path}' is not a tuned-lens config.json with num_hidden_layers and d_model; pass the "
                             "config.json the tuned-lens package saved with --config.")
    L, D = _count(cfg, "num_hidden_layers", path), _count(cfg, "d_model", path)
    return {"name": model_name or cfg.get("base_model_name_or_path"), "d_vocab": None}, L, D


def _load_package_layout(p: Path) -> TunedLens:
    mi, L, D = _package_config(p / PKG_CONFIG)
    weight, bias = _stack(_read_safetensors(p / PKG_WEIGHTS), L, D, "", p / PKG_WEIGHTS)
    return TunedLens(mi, L, D, "resid_pre", weight, bias, {"source": "tuned-lens package layout (safetensors)", "path": str(p)})


def convert_tuned_lens(params: str | Path, out: str | Path, config: str | Path | None = None,
                       model_name: str | None = None) -> TunedLens:
    """Convert the tuned-lens package's ``params.pt`` (with its ``config.json``, by default the
    one beside it) into mechscope's layout in ``out``. The pickle is read only with
    ``torch.load(weights_only=True)``, which loads tensors and plain containers and refuses
    anything else, so the file cannot run code."""
    params = Path(params)
    if not params.is_file():
        raise MechscopeError(f"No file at '{params}'; pass the params.pt the tuned-lens package saved.")
    cfg_path = Path(config) if config else params.parent / PKG_CONFIG
    if not cfg_path.is_file():
        raise MechscopeError(f"No {PKG_CONFIG} at '{cfg_path}'; pass the tuned-lens config with --config.")
    mi, L, D = _package_config(cfg_path, model_name)
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is not the user's business
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(str(params), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused it: torch's own advice is to unpickle it anyway
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()
        why = f" ({detail[0].strip().rstrip('.')})" if "WeightsUnpickler error:" in str(exc) and detail else ""
        raise MechscopeError(f"'{params}' is not a file of tensors that torch.load(weights_only=True) reads{why}: it holds "
                             "other pickled objects, which could run code, or it is damaged, so mechscope does not load "
                             "it; pass the params.pt the tuned-lens package saved (tensors only).") from exc
    except Exception as exc:  # truncated files, non-pickles: one sentence
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MechscopeError(f"'{params}' could not be read as tensors with torch.load(weights_only=True): {first}.") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MechscopeError(f"'{params}' does not hold a state dict of tensors; it is not a tuned-lens params.pt.")
    weight, bias = _stack({str(k): v for k, v in state.items()}, L, D, "", params)
    lens = TunedLens(mi, L, D, "resid_pre", weight, bias,
                     {"source": f"converted from the tuned-lens package ({params.name}, loaded with weights_only=True)",
                      "package_config": json.loads(cfg_path.read_text())})
    lens.save(out)
    return lens


def load_tuned_lens(path: str | Path, model: Model | None = None) -> TunedLens:
    """``TunedLens.load(path)``, checked against ``model`` and moved to its device when given."""
    lens = TunedLens.load(path)
    if model is not None:
        lens.check_fits(model)
        lens = lens.to(model.device)
    return lens


def as_tuned_lens(tuned: Any, model: Model, who: str) -> TunedLens | None:
    """``tuned`` as a ``TunedLens`` for ``who``: None stays None, a folder path is loaded (and
    checked against ``model``), anything else is refused in one sentence."""
    if tuned is None or isinstance(tuned, TunedLens):
        return tuned
    if isinstance(tuned, (str, Path)):
        return load_tuned_lens(tuned, model)
    raise MechscopeError(f"{who}'s tuned must be a TunedLens (mechscope.lens.load_tuned_lens(path)) or the folder it was "
                         f"saved to; got a {type(tuned).__name__}.")
