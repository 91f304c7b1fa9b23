"""Save and load SAEs in SAELens's on-disk layout, so SAEs move both ways.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, and ``threshold`` for JumpReLU; each
architecture's ``tensor_shapes`` lists them). Architecture names map as SAELens 6 registers
them (each architecture class in ``mechscope.sae.archs`` names its own): relu -> ``standard``
(``transcoder`` for transcoders), topk -> ``topk``, jumprelu -> ``jumprelu``
(``jumprelu_transcoder``), and batchtopk -> ``jumprelu`` with its learned threshold (what
BatchTopK is at inference; SAELens stores it the same way), remembered as batchtopk in
``metadata.mechscope_architecture``. A TopK transcoder has no SAELens class; it is saved as
``topk_transcoder`` (mechscope only).

Only safetensors is ever read: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mechscope.errors import MechscopeError
from mechscope.sae.archs import from_saelens, get_architecture, saelens_names
from mechscope.sae.model import SAE, SAEConfig

if TYPE_CHECKING:
    from mechscope.models import Model

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def saelens_cfg(cfg: SAEConfig) -> dict[str, Any]:
    """The ``cfg.json`` dict SAELens's ``SAE.load_from_disk`` reads."""
    arch = get_architecture(cfg.architecture)()
    meta = {
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "mechscope_architecture": cfg.architecture,
        **({"hook_name_out": cfg.hook_name_out} if cfg.is_transcoder else {}),
        **arch.saelens_metadata(cfg),
        **cfg.metadata,
    }
    out: dict[str, Any] = {
        "architecture": arch.saelens_architecture(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input and not cfg.is_transcoder),
        "normalize_activations": "none",  # any input scaling is folded into the weights at save
        "reshape_activations": "none",
        "metadata": meta,
    }
    out.update(arch.saelens_keys(cfg))
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
    return out


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` into ``path`` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: getattr(sae, n).detach().to("cpu").contiguous() for n in sae.arch.tensor_shapes(sae.cfg)}
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CFG_FILE).write_text(json.dumps(saelens_cfg(sae.cfg), indent=2))
    return path


def _read_cfg(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise MechscopeError(f"{path} is not an SAE folder; pass a folder holding {CFG_FILE} and {WEIGHTS_FILE}.")
    f = path / CFG_FILE
    if not f.is_file():
        raise MechscopeError(f"{path} has no {CFG_FILE}; an SAE folder (SAELens layout) holds {CFG_FILE} and {WEIGHTS_FILE}.")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise MechscopeError(f"{f} is not valid JSON (line {exc.lineno}: {exc.msg}); fix or re-save the SAE.") from None
    if not isinstance(raw, dict):
        raise MechscopeError(f"{f} must hold a JSON object with d_in, d_sae and architecture.")
    return raw


def config_from_saelens(raw: dict[str, Any], where: str = CFG_FILE) -> SAEConfig:
    """An ``SAEConfig`` from a SAELens ``cfg.json`` dict (v6 layout, or older flat keys)."""
    missing = [k for k in ("d_in", "d_sae") if k not in raw]
    if missing:
        raise MechscopeError(f"{where} lacks {', '.join(missing)}; an SAE config needs d_in, d_sae and architecture.")
    meta = dict(raw.get("metadata") or {})
    arch_name = raw.get("architecture", "standard")
    found = from_saelens(arch_name, meta.get("mechscope_architecture")) if isinstance(arch_name, str) else None
    if found is None:
        raise MechscopeError(
            f"{where}: SAE architecture {arch_name!r} is not supported; mechscope reads "
            f"{', '.join(saelens_names())}."
        )
    arch_cls, transcoder = found
    norm = raw.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise MechscopeError(
            f"{where}: normalize_activations={norm!r} is not supported; fold the scaling into the weights "
            "(SAELens: fold_activation_norm_scaling_factor) and save again."
        )
    if raw.get("rescale_acts_by_decoder_norm"):
        raise MechscopeError(f"{where}: rescale_acts_by_decoder_norm=true is not supported; fold the decoder norms and save again.")
    known = {"model_name", "hook_name", "hook_name_out", "mechscope_architecture", "k", "sae_lens_version", "sae_lens_training_version"}
    k = raw.get("k", meta.get("k"))
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=arch_cls.name,
        k=int(k) if k is not None and arch_cls.uses_k else None,
        hook_name=str(meta.get("hook_name") or raw.get("hook_name") or ""),
        model_name=str(meta.get("model_name") or raw.get("model_name") or ""),
        d_out=int(raw["d_out"]) if transcoder else None,
        hook_name_out=str(meta.get("hook_name_out") or raw.get("hook_name_out") or "") if transcoder else None,
        dtype=str(raw.get("dtype", "float32")).replace("torch.", ""),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)) and not transcoder,
        metadata={k2: v for k2, v in meta.items() if k2 not in known},
    )


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by mechscope or SAELens (safetensors only)."""
    path = Path(path)
    raw = _read_cfg(path)
    cfg = config_from_saelens(raw, str(path / CFG_FILE))
    if cfg.dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise MechscopeError(f"{path / CFG_FILE}: dtype {cfg.dtype!r} is not a float type mechscope can load.")
    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        pickles = [p.name for p in path.glob("*.pt")] + [p.name for p in path.glob("*.pth")]
        hint = f" ({', '.join(pickles)} is a pickle file, which mechscope never loads: convert it to safetensors)" if pickles else ""
        raise MechscopeError(f"{path} has no {WEIGHTS_FILE}{hint}.")
    try:
        tensors = load_file(str(wfile))
    except (SafetensorError, OSError) as exc:
        raise MechscopeError(f"{wfile} is not a readable safetensors file ({exc}); re-save the SAE.") from None
    sae = SAE(cfg)
    want = sae.arch.tensor_shapes(cfg)
    for name, shape in want.items():
        if name not in tensors:
            raise MechscopeError(f"{wfile} lacks the tensor {name!r} (it has {', '.join(sorted(tensors)) or 'none'}); a {cfg.architecture} SAE needs {', '.join(want)}.")
        if tuple(tensors[name].shape) != shape:
            raise MechscopeError(
                f"{wfile}: {name} has shape {list(tensors[name].shape)} but cfg.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {list(shape)}; the weights and config do not belong together."
            )
    with torch.no_grad():
        for name in want:
            getattr(sae, name).copy_(tensors[name].to(getattr(sae, name).dtype))
    return sae.to(device)


def check_sae_fits(sae: SAE, model: Model) -> None:
    """Clear error when the SAE's hook is not in the model or has another width, or when the SAE
    records the weights fingerprint of another model (``metadata.model_fingerprint``, written at
    training: an SAE of another model of the same width would otherwise be read as this one's)."""
    from mechscope.models.hooks import check_hook_name

    cfg = sae.cfg
    for hook, width in ((cfg.hook_name, cfg.d_in), (cfg.hook_name_out, cfg.out_dim)):
        if not hook:
            continue
        check_hook_name(model, hook)
        d = _hook_width(model, hook)
        if d is not None and d != width:
            raise MechscopeError(
                f"the SAE expects width {width} at {hook}, but {model.summary.name} has width {d} there; "
                "use an SAE trained on this model and hook."
            )
    check_same_weights(cfg.metadata.get("model_fingerprint"), model, "the SAE", cfg.model_name)


def check_same_weights(recorded: object, model: Model, what: str, trained_on: str = "") -> None:
    """One sentence when ``recorded`` (a ``Model.fingerprint`` saved with a trained artefact) is
    not ``model``'s. Nothing recorded (SAELens's SAEs, older mechscope ones): nothing to check."""
    if not isinstance(recorded, str) or not recorded or recorded == model.fingerprint():
        return
    on = f" ({trained_on})" if trained_on else ""
    raise MechscopeError(
        f"{what} was trained on a model{on} whose weights differ from {model.summary.name}'s (fingerprint {recorded} vs "
        f"{model.fingerprint()}; a float16 load of the same weights differs too, load float32 or bfloat16); pass the "
        "model it was trained on with --model, or, to apply it to these weights on purpose (e.g. a fine-tune), delete "
        "metadata.model_fingerprint from its cfg.json."
    )


def _hook_width(model: Model, hook: str) -> int | None:
    """Width of a hook's activation, read off one tiny forward pass (cached per model)."""
    cache = model.__dict__.setdefault("_hook_widths", {})
    if hook not in cache:
        seen: dict[str, int] = {}

        def grab(t, hook):  # noqa: ANN001
            seen["d"] = t.shape[-1]

        ids = torch.tensor([[model.tokenizer.eos_token_id or 0] * 2], device=model.device)
        with torch.no_grad():
            model.bridge.run_with_hooks(ids, fwd_hooks=[(hook, grab)])
        cache[hook] = seen.get("d")
    return cache[hook]
