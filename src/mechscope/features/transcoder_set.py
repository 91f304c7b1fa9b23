"""A transcoder set: one transcoder per layer, MLP input -> MLP output (Dunefsky et al. 2024;
the replacement model of Ge et al. 2024 and circuit tracing, Ameisen et al. 2025).

Layer ``l``'s transcoder reads the MLP's input (the second norm's output,
``blocks.l.ln2.hook_normalized``) and predicts its output (``blocks.l.hook_mlp_out``); every
transcoder is an ``SAE`` with ``d_out`` set (``mechscope.sae.model``), so any architecture of
``mechscope.sae.archs`` works, including the ``skip_*`` ones with a linear skip from input to
output (``W_skip [d_out, d_in]``, output ``+= x @ W_skip.T``, in both layouts and in memory).

On disk (``save_transcoders`` / ``load_transcoders``): one SAELens-layout folder per layer
(``layer_{l}/cfg.json`` + ``sae_weights.safetensors``, what the SAE commands read) and, beside
them, circuit-tracer's layout: ``config.yaml`` (``model_kind: transcoder_set``,
``feature_input_hook``, ``feature_output_hook``, ``transcoders``: the per-layer files) and
``layer_{l}.safetensors`` with its tensor names (``W_enc`` [d_sae, d_in], ``W_dec``
[d_sae, d_out], ``b_enc``, ``b_dec``, optional ``W_skip`` [d_out, d_in] and
``activation_function.threshold``). A folder holding only circuit-tracer's files loads too;
one whose files have ``W_skip`` loads as the ``skip_*`` form of its activation, and files with
thresholds but no ``activation_function`` in ``config.yaml`` load as JumpReLU (as circuit-tracer
reads them). Like ``load_sae``, loading refuses in one sentence other tensors, tensors of
other shapes, NaN or infinite values, and a ``jump_relu`` set without its thresholds.

The input hook of circuit-tracer's files. mechscope's transcoders read the *pure* normalised
input (``ln2.hook_normalized``: the norm before its gain and bias), which circuit-tracer's
TransformerLens backend knows but its nnsight backend (the one that loads models outside
TransformerLens's list, such as SmolLM2) does not: for Llama it reads ``mlp.hook_in``, the
norm's output with its gain (and bias) applied. So ``save_transcoders(..., model=m)`` writes
circuit-tracer's files for ``mlp.hook_in`` with the norm folded into the encoder (and the skip):
``W_enc' = W_enc / g``, ``b_enc' = b_enc - (b / g) W_enc``, ``W_skip' = W_skip / g``,
``b_dec' = b_dec - W_skip (b / g)``, and loading such a folder unfolds them (it needs the
model). Without a model (or with a norm gain of zero, which cannot be folded out again; a
warning says so) the files read ``ln2.hook_normalized`` as before. Measured: a graph
computed by circuit-tracer 0.5.0 (nnsight backend) from the folded files equals mechscope's to
2e-6 of its largest edge, with identical replacement and completeness scores
(``tests/integration/test_circuit_tracer_interop.py``). circuit-tracer 0.5.0 reads only ReLU
and JumpReLU single-layer transcoders (``activation_function`` in ``config.yaml`` is ignored), so
a TopK set loads there as ReLU: train with ``--arch relu`` or ``jumprelu`` for its use.

``mechscope.features.train.train_transcoders`` trains a set; a run over some layers only
leaves a folder with those ``layer_<l>`` folders (``load_transcoder_layers`` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError
from mechscope.models.hooks import ln_normalized, mlp_out, parse_hook
from mechscope.sae.io import check_same_weights
from mechscope.sae.model import SAE, SAEConfig

if TYPE_CHECKING:
    from mechscope.models import Model

CONFIG = "config.yaml"
PURE_INPUT = "ln2.hook_normalized"  # circuit-tracer's name (TransformerLens backend) for mechscope's input
NORMED_INPUT = "mlp.hook_in"  # the norm's output, gain and bias applied (both circuit-tracer backends)
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
THRESHOLD = "activation_function.threshold"  # a JumpReLU's thresholds in circuit-tracer's files
CT_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip", THRESHOLD, "k")  # what circuit-tracer's layer files hold
_ACTIVATIONS = {"relu": "relu", "topk": "topk", "jump_relu": "jumprelu", "jumprelu": "jumprelu"}


def check_mlp_input_norm(model: Model, hook: str) -> None:
    """One sentence when the model has no norm of its own before the MLP at ``hook`` (a
    transcoder's input): Phi, Falcon and Cohere share the attention's, OLMo-2 has none."""
    if hook not in model.bridge.hook_dict:
        raise MechscopeError(f"transcoders read each MLP's own input norm ({hook}), which {model.summary.architecture} does not have "
                             "(its MLP shares the attention's norm, or reads the residual stream with no norm before it); use a model "
                             "with a norm before each MLP.")


def mlp_input_norms(model: Model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each block's second norm's gain and bias ([d_model] each, float32 on the CPU; ones and
    zeros where the norm has none): ``mlp.hook_in = ln2.hook_normalized * gain + bias``."""
    out = []
    d = model.summary.d_model
    for block in model.bridge.blocks:
        mod = getattr(block.ln2, "_original_component", block.ln2)
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        g = torch.ones(d) if w is None else w.detach().float().cpu()
        if w is not None and "gemma" in type(mod).__name__.lower():
            g = 1.0 + g  # Gemma's RMSNorm scales by (1 + weight)
        out.append((g, torch.zeros(d) if b is None else b.detach().float().cpu()))
    return out


@dataclass
class TranscoderSet:
    """Per-layer transcoders of one model; ``layers[l]`` replaces block ``l``'s MLP."""

    layers: list[SAE]
    model_name: str = ""

    def __post_init__(self) -> None:
        if not self.layers:
            raise MechscopeError("a transcoder set needs at least one layer.")
        for i, tc in enumerate(self.layers):
            if not tc.cfg.is_transcoder:
                raise MechscopeError(f"layer {i} of the set is an SAE, not a transcoder (it has no output hook).")
            if parse_hook(tc.cfg.hook_name).layer != i or parse_hook(tc.cfg.hook_name_out or "").layer != i:
                raise MechscopeError(
                    f"layer {i}'s transcoder reads {tc.cfg.hook_name} -> {tc.cfg.hook_name_out}; a set needs "
                    f"layer {i}'s MLP input and output there (the set's layers must be in order, none missing)."
                )

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_sae(self) -> list[int]:
        return [tc.cfg.d_sae for tc in self.layers]

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The transcoder's output that reads its input directly (a linear skip), [..., d_out];
        zero for architectures without one."""
        tc = self.layers[layer]
        f0 = torch.zeros(*x.shape[:-1], tc.cfg.d_sae, dtype=tc.W_dec.dtype, device=x.device)
        return tc.decode(f0, x) - tc.decode(f0, torch.zeros_like(x))

    def check_fits(self, model: Model) -> None:
        """One sentence when the set does not belong to ``model`` (layers, widths)."""
        s = model.summary
        check_mlp_input_norm(model, ln_normalized(0, 2))
        if self.n_layers != s.n_layers:
            raise MechscopeError(
                f"the transcoder set has {self.n_layers} layers but {s.name} has {s.n_layers}; "
                "use a set trained on this model (mechscope transcoders train)."
            )
        for i, tc in enumerate(self.layers):
            if tc.cfg.d_in != s.d_model or tc.cfg.out_dim != s.d_model:
                raise MechscopeError(
                    f"layer {i}'s transcoder maps width {tc.cfg.d_in} -> {tc.cfg.out_dim} but {s.name}'s MLPs "
                    f"read and write width {s.d_model}; use a set trained on this model."
                )
            check_same_weights(tc.cfg.metadata.get("model_fingerprint"), model, f"layer {i}'s transcoder", tc.cfg.model_name)

    def to(self, device) -> "TranscoderSet":
        self.layers = [tc.to(device) for tc in self.layers]
        return self


def random_transcoders(model: Model, d_sae: int, architecture: str = "topk", k: int | None = 8, seed: int = 0,
                       skip: bool = False, scale: float = 1.0) -> TranscoderSet:
    """Random transcoders for every layer of ``model`` (for tests and smoke runs): Gaussian
    encoders and unit-norm decoders; ``skip`` uses the ``skip_<architecture>`` form with a
    random linear skip."""
    from mechscope.sae.archs import get_architecture, skip_variant

    d = model.summary.d_model
    g = torch.Generator().manual_seed(seed)
    arch = skip_variant(architecture) if skip else architecture
    layers = []
    for layer in range(model.summary.n_layers):
        cfg = SAEConfig(d_in=d, d_sae=d_sae, architecture=arch, k=k if get_architecture(arch).uses_k else None,
                        hook_name=ln_normalized(layer, 2), hook_name_out=mlp_out(layer), d_out=d,
                        model_name=model.summary.name, apply_b_dec_to_input=False, metadata={"seed": seed + layer})
        tc = SAE(cfg)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, d_sae, generator=g) * scale / d**0.5)
            tc.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1 * scale)
            tc.b_dec.copy_(torch.randn(d, generator=g) * 0.05)
            if hasattr(tc, "W_skip"):
                tc.W_skip.copy_(torch.randn(*tc.W_skip.shape, generator=g) * 0.1 / d**0.5 if skip else torch.zeros_like(tc.W_skip))
        layers.append(tc.to(model.device))
    return TranscoderSet(layers, model.summary.name)


# ---------------------------------------------------------------------------------- disk


def save_transcoders(tset: TranscoderSet, path: str | Path, model: Model | None = None) -> Path:
    """Write the set in both layouts (module docstring); returns the folder. With ``model``,
    circuit-tracer's files read ``mlp.hook_in`` (the norm folded in, what both its backends
    load); without, ``ln2.hook_normalized``."""
    from safetensors.torch import save_file

    from mechscope.sae.io import save_sae

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    norms = None
    if model is not None:
        tset.check_fits(model)
        norms = mlp_input_norms(model)
        tiny = [i for i, (g, _) in enumerate(norms) if bool((g.abs() < 1e-6 * g.abs().max().clamp_min(1e-30)).any())]
        if tiny:  # a (near-)zero gain cannot be folded out again without loss: keep the pure input
            import warnings

            warnings.warn(f"layer {tiny[0]}'s MLP norm has a (near-)zero gain, so circuit-tracer's files read "
                          "ln2.hook_normalized (its TransformerLens backend only), not mlp.hook_in.", stacklevel=2)
            norms = None
    files = []
    for i, tc in enumerate(tset.layers):
        save_sae(tc, path / f"layer_{i}")
        W_enc, b_enc, b_dec = tc.W_enc.detach().float().cpu(), tc.b_enc.detach().float().cpu(), tc.b_dec.detach().float().cpu()
        W_skip = tc.W_skip.detach().float().cpu() if hasattr(tc, "W_skip") else None  # [d_out, d_in]
        if norms is not None:
            g, b = norms[i]
            shift = b / g
            b_enc = b_enc - shift @ W_enc
            W_enc = W_enc / g[:, None]
            if W_skip is not None:
                b_dec = b_dec - W_skip @ shift
                W_skip = W_skip / g[None, :]
        t = {"W_enc": W_enc.T, "W_dec": tc.W_dec.detach().float().cpu(), "b_enc": b_enc, "b_dec": b_dec}
        if tc.arch.threshold_saved:
            t[THRESHOLD] = tc.threshold.detach().float().cpu()
        if W_skip is not None:
            t["W_skip"] = W_skip
        save_file({k: v.contiguous() for k, v in t.items()}, str(path / f"layer_{i}.safetensors"))
        files.append(f"layer_{i}.safetensors")
    from mechscope.sae.archs import without_skip

    arch = without_skip(tset.layers[0].cfg.architecture)
    lines = [
        "model_kind: transcoder_set",
        f"model_name: {tset.model_name!r}",
        f"feature_input_hook: {PURE_INPUT if norms is None else NORMED_INPUT}",
        "feature_output_hook: hook_mlp_out",
        "scan: mechscope",
    ]
    if arch == "topk":
        lines += ["activation_function: topk", f"k: {tset.layers[0].cfg.k}"]
    elif arch in ("jumprelu", "batchtopk"):
        lines += ["activation_function: jump_relu"]
    else:
        lines += [f"activation_function: {arch}"]
    lines += ["transcoders:"] + [f"  - {f}" for f in files]
    (path / CONFIG).write_text("\n".join(lines) + "\n")
    return path


def load_transcoders(path: str | Path, device: str | torch.device = "cpu", model: Model | None = None) -> TranscoderSet:
    """A set from a folder written by ``save_transcoders`` (the per-layer SAELens folders) or
    one in circuit-tracer's layout (``config.yaml`` + safetensors); never unpickles. A
    circuit-tracer set reading ``mlp.hook_in`` needs ``model`` (its norms are unfolded)."""
    path = Path(path)
    found = load_transcoder_layers(path, device, model)
    idx = sorted(found)
    if idx != list(range(len(idx))):
        missing = sorted(set(range(max(idx) + 1)) - set(idx))
        raise MechscopeError(f"{path} lacks layer_{missing[0]}: a transcoder set needs every layer from 0.")
    layers = [found[i] for i in idx]
    return TranscoderSet(layers, layers[0].cfg.model_name)


def load_transcoder_layers(path: str | Path, device: str | torch.device = "cpu", model: Model | None = None) -> dict[int, SAE]:
    """Every transcoder in a set folder, by layer, gaps allowed (what a training run over some
    layers leaves); each checked to read its layer's MLP input and predict its output."""
    from mechscope.sae.io import load_sae

    path = Path(path)
    if not path.is_dir():
        raise MechscopeError(f"{path} is not a folder; pass a transcoder set folder (mechscope transcoders train --out DIR).")
    folders = sorted((p for p in path.glob("layer_*") if p.is_dir()), key=lambda p: _layer_of(p.name))
    if folders:
        check_listed_layers(path, {_layer_of(p.name) for p in folders})
        found = {_layer_of(p.name): load_sae(p, device) for p in folders}
    elif (path / CONFIG).is_file():
        found = dict(enumerate(_load_circuit_tracer(path, device, model).layers))
    else:
        raise MechscopeError(f"{path} holds neither layer_<l> folders nor a {CONFIG}; it is not a transcoder set.")
    for i, tc in found.items():
        if not tc.cfg.is_transcoder:
            raise MechscopeError(f"{path}/layer_{i} is an SAE, not a transcoder (it has no output hook).")
        if parse_hook(tc.cfg.hook_name).layer != i or parse_hook(tc.cfg.hook_name_out or "").layer != i:
            raise MechscopeError(
                f"{path}/layer_{i} reads {tc.cfg.hook_name} -> {tc.cfg.hook_name_out}, not layer {i}'s MLP input and output."
            )
    return found


def check_listed_layers(path: Path, have: set[int]) -> None:
    """A folder with a ``config.yaml`` holds a whole set (training writes it last, only for a
    complete one): refuse one whose config lists a layer that has no ``layer_<l>`` folder, which
    would otherwise pass for a set trained on some layers and be evaluated without it."""
    import yaml

    try:
        cfg = yaml.safe_load((path / CONFIG).read_text()) if (path / CONFIG).is_file() else None
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return  # not ours to judge here: the per-layer folders are what loads
    listed = cfg.get("transcoders") if isinstance(cfg, dict) else None
    if not isinstance(listed, list):
        return
    try:
        want = {_layer_of(Path(str(f)).name) for f in listed}
    except MechscopeError:
        return
    missing = sorted(want - have)
    if missing:
        raise MechscopeError(f"{path} lacks layer_{missing[0]} (its {CONFIG} lists {len(want)} layers, a whole set, but only "
                             f"{len(have)} have a layer_<l> folder); copy the set again or train it again.")


def _layer_of(name: str) -> int:
    try:
        return int(name.split("_", 1)[1].split(".")[0])
    except (IndexError, ValueError):
        raise MechscopeError(f"cannot read a layer number from {name!r}; name per-layer files layer_<l>.") from None


def _load_circuit_tracer(path: Path, device, model: Model | None = None) -> TranscoderSet:
    import yaml
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = yaml.safe_load((path / CONFIG).read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MechscopeError(f"{path / CONFIG} is not valid YAML ({what}{where}); fix or remove that file.") from None
    if not isinstance(cfg, dict):
        raise MechscopeError(
            f"{path / CONFIG} holds a YAML {_yaml_kind(cfg)}, not a mapping of settings (model_kind: transcoder_set, "
            "feature_input_hook, feature_output_hook, transcoders: a list of layer files); fix or remove that file."
        )
    if cfg.get("model_kind") != "transcoder_set":
        raise MechscopeError(f"{path / CONFIG}: model_kind is {cfg.get('model_kind')!r}; only 'transcoder_set' is supported.")
    in_hook, out_hook = str(cfg.get("feature_input_hook", PURE_INPUT)), str(cfg.get("feature_output_hook", "hook_mlp_out"))
    if in_hook not in (PURE_INPUT, NORMED_INPUT) or out_hook not in OUTPUT_HOOKS:
        raise MechscopeError(
            f"{path / CONFIG}: the set reads {in_hook} -> {out_hook}, but mechscope's transcoders replace the MLP "
            f"(input {PURE_INPUT} or {NORMED_INPUT}, output {' or '.join(OUTPUT_HOOKS)})."
        )
    norms, mname = None, ""
    if in_hook == NORMED_INPUT:
        if model is None:
            raise MechscopeError(
                f"{path / CONFIG} reads {NORMED_INPUT} (the norm's output); loading it needs the model whose norms "
                "to unfold: pass --model on the command line (model= in Python)."
            )
        norms, mname = mlp_input_norms(model), model.summary.name
    raw_listed = cfg.get("transcoders") or []
    if not isinstance(raw_listed, list) or not all(isinstance(f, str) for f in raw_listed):
        raise MechscopeError(
            f"{path / CONFIG}: transcoders must be a YAML list of per-layer file names (  - layer_0.safetensors), "
            f"got {raw_listed!r:.80}; fix it, or remove the key to read every layer_<l>.safetensors in {path}."
        )
    listed = [str(f) for f in raw_listed]
    files = listed if listed and not any(f.startswith("hf://") for f in listed) else \
        sorted((p.name for p in path.glob("layer_*.safetensors")), key=_layer_of)  # by number: layer_10 after layer_9
    if not files:
        raise MechscopeError(f"{path} has a {CONFIG} but no layer_<l>.safetensors files (hub paths are not fetched offline).")
    if files is not listed and [_layer_of(f) for f in files] != list(range(len(files))):
        missing = sorted(set(range(_layer_of(files[-1]))) - {_layer_of(f) for f in files})
        raise MechscopeError(f"{path} lacks layer_{missing[0]}.safetensors: circuit-tracer's layout needs every layer from 0.")
    if norms is not None and len(files) != len(norms):
        raise MechscopeError(f"{path} holds {len(files)} layers but {mname} has {len(norms)}; use a set trained on this model.")
    from mechscope.sae.archs import skip_variant

    act_given = cfg.get("activation_function") is not None
    act = str(cfg.get("activation_function") or "relu").lower()
    if act not in _ACTIVATIONS:
        raise MechscopeError(
            f"{path / CONFIG}: activation_function {cfg.get('activation_function')!r} is not one mechscope reads "
            f"({', '.join(_ACTIVATIONS)}); fix it (or remove it for ReLU)."
        )
    layers = []
    for i, f in enumerate(files):
        fp = path / str(f)
        try:
            t = load_file(str(fp))
        except (SafetensorError, OSError, FileNotFoundError) as exc:
            raise MechscopeError(f"{fp} is not a readable safetensors file ({exc}).") from None
        d_sae, d_in, d_out = _check_ct_tensors(fp, t)
        plain = _ct_activation(fp, t, act, act_given)
        arch = skip_variant(plain) if "W_skip" in t else plain
        k = _ct_k(fp, cfg, t) if plain == "topk" else None
        sc = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k,
                       hook_name=ln_normalized(i, 2), hook_name_out=mlp_out(i), d_out=d_out,
                       model_name=str(cfg.get("model_name", "")), apply_b_dec_to_input=False)
        W_enc, b_enc, b_dec = t["W_enc"].float().T, t["b_enc"].float(), t["b_dec"].float()
        W_skip = t["W_skip"].float() if "W_skip" in t else None
        if norms is not None:  # back from mlp.hook_in to the pure normalised input
            g, b = norms[i]
            if g.numel() != d_in:
                raise MechscopeError(f"{fp}: W_enc reads width {d_in} but {mname}'s MLPs read {g.numel()}; use a set trained on this model.")
            b_enc = b_enc + b @ W_enc
            W_enc = W_enc * g[:, None]
            if W_skip is not None:
                b_dec = b_dec + W_skip @ b
                W_skip = W_skip * g[None, :]
        tc = SAE(sc)
        with torch.no_grad():
            tc.W_enc.copy_(W_enc)
            tc.W_dec.copy_(t["W_dec"])
            tc.b_enc.copy_(b_enc)
            tc.b_dec.copy_(b_dec)
            if plain == "jumprelu":
                tc.threshold.copy_(t[THRESHOLD])
            if W_skip is not None:
                tc.W_skip.copy_(W_skip)
        layers.append(tc.to(device))
    return TranscoderSet(layers, str(cfg.get("model_name", "")))


def _yaml_kind(v: object) -> str:
    return "list" if isinstance(v, list) else "mapping" if isinstance(v, dict) else f"scalar ({v!r:.40})"


def _check_ct_tensors(fp: Path, t: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """One sentence when a circuit-tracer layer file holds a tensor mechscope does not know, lacks
    one, holds whole numbers, a tensor of the wrong shape or NaN / infinite values (the checks
    ``load_sae`` makes of SAELens files); returns ``(d_sae, d_in, d_out)``."""
    unknown = sorted(set(t) - set(CT_TENSORS))
    if unknown:
        raise MechscopeError(f"{fp} holds tensors mechscope does not know ({', '.join(unknown)}; a circuit-tracer transcoder "
                             f"holds {', '.join(CT_TENSORS[:-1])}), so it cannot tell what they change; remove them or fold "
                             "them into the weights.")
    for need in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if need not in t:
            raise MechscopeError(f"{fp} lacks {need!r}; circuit-tracer transcoders have W_enc, W_dec, b_enc, b_dec.")
    ints = [n for n, v in t.items() if n != "k" and not v.is_floating_point()]
    if ints:  # .float() would cast whole numbers silently
        raise MechscopeError(f"{fp} holds {t[ints[0]].dtype} values in {ints[0]}, so the transcoder is unusable; its "
                             "weights must be floating point: re-save them as float32.")
    for name, form in (("W_enc", "[d_sae, d_in]"), ("W_dec", "[d_sae, d_out]")):
        if t[name].dim() != 2:
            raise MechscopeError(f"{fp}: {name} has shape {list(t[name].shape)} but circuit-tracer's {name} is a matrix "
                                 f"{form}; the file is damaged or not a transcoder: re-save it.")
    d_sae, d_in = (int(n) for n in t["W_enc"].shape)
    d_out = int(t["W_dec"].shape[1])
    want = {"W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,), "W_skip": (d_out, d_in), THRESHOLD: (d_sae,)}
    for name, shape in want.items():
        if name in t and tuple(t[name].shape) != shape:
            raise MechscopeError(f"{fp}: {name} has shape {list(t[name].shape)} but W_enc {list(t['W_enc'].shape)} and W_dec "
                                 f"{list(t['W_dec'].shape)} imply {list(shape)} (circuit-tracer's W_enc [d_sae, d_in], W_dec "
                                 "[d_sae, d_out]); the file is inconsistent: re-save it.")
    bad = [n for n in CT_TENSORS[:-1] if n in t and not bool(torch.isfinite(t[n]).all())]
    if bad:
        raise MechscopeError(f"{fp}: {', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN or infinite values, so every "
                             "figure computed from the transcoder would be undefined; re-train, re-download or re-save it.")
    return d_sae, d_in, d_out


def _ct_k(fp: Path, cfg: dict, t: dict[str, torch.Tensor]) -> int:
    """A TopK set's k: config.yaml's ``k``, else a one-value ``k`` tensor in the layer file
    (circuit-tracer may store it so); one sentence when neither is a whole number >= 1."""
    if "k" in cfg:
        k, where = cfg["k"], f"{fp.parent / CONFIG}: k"
    elif "k" in t:
        k, where = (t["k"].item() if t["k"].numel() == 1 else t["k"].tolist()), f"{fp}: the k tensor"
    else:
        raise MechscopeError(f"{fp.parent / CONFIG} sets activation_function: topk but no k; add k: N, the active "
                             "features per token the set was trained with.")
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MechscopeError(f"{where} must be one whole number of at least 1 (the active features per token); got {k!r:.40}.")
    return k


def _ct_activation(fp: Path, t: dict[str, torch.Tensor], act: str, act_given: bool) -> str:
    """mechscope's architecture (without a skip) of a circuit-tracer layer file: config.yaml's
    ``activation_function``; a file with thresholds and no activation_function is a JumpReLU
    (circuit-tracer reads it so). A JumpReLU without thresholds, or thresholds that another
    activation would ignore, are refused rather than read as thresholds 0 or dropped."""
    plain = _ACTIVATIONS[act]
    has_thr = THRESHOLD in t
    if plain == "jumprelu" and not has_thr:
        raise MechscopeError(f"{fp} lacks {THRESHOLD!r}, the thresholds of the jump_relu activation that {CONFIG} sets; "
                             "add them to the file, or set activation_function: relu if the set has none.")
    if has_thr and plain != "jumprelu":
        if not act_given:
            return "jumprelu"  # circuit-tracer: a file with thresholds is a JumpReLU
        if bool((t[THRESHOLD] != 0).any()):
            raise MechscopeError(f"{fp} holds {THRESHOLD} (nonzero), which the {act} activation that {CONFIG} sets would "
                                 "ignore; set activation_function: jump_relu if the set is a JumpReLU, or remove the tensor.")
    return plain
