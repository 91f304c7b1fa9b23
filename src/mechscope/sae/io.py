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

Loading refuses tensors the architecture does not hold and NaN or infinite weights, in one
sentence each. A pre-6 SAELens ``scaling_factor`` (``"finetuning_scaling_factor": true``) is
folded into ``W_dec``'s rows, so reconstructions are SAELens's and the features are the
unscaled ones (``_scaling_factor``).

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
from mechscope.sae.archs import Architecture, from_saelens, get_architecture, saelens_names
from mechscope.sae.model import FLOAT_DTYPES, SAE, SAEConfig

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
        raw = json.loads(f.read_bytes().decode("utf-8-sig"))  # a byte-order mark (a Windows editor's) is allowed
    except UnicodeDecodeError as exc:
        raise MechscopeError(f"{f} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise MechscopeError(f"{f} is not valid JSON (line {exc.lineno}: {exc.msg}); fix or re-save the SAE.") from None
    if not isinstance(raw, dict):
        raise MechscopeError(f"{f} must hold a JSON object with d_in, d_sae and architecture.")
    return raw


def _whole(raw: dict[str, Any], key: str, where: str, what: str) -> int:
    """``raw[key]`` as an int: a JSON whole number, else one sentence naming the key."""
    v = raw.get(key)
    if isinstance(v, bool) or not (isinstance(v, int) or isinstance(v, float) and v.is_integer()):
        raise MechscopeError(f"{where}: {key} must be a whole number ({what}), got {v!r}; fix it in the cfg.json.")
    return int(v)


def _activation_fn(raw: dict[str, Any], arch_cls: type[Architecture], where: str) -> tuple[type[Architecture], int | None]:
    """SAELens before 6 saved TopK SAEs as ``"architecture": "standard"`` with
    ``"activation_fn_str": "topk"`` and ``"activation_fn_kwargs": {"k": K}`` (SAELens 6 reads
    them as ``topk``, ``handle_pre_6_0_config``): the architecture class and k such a config
    means (k None where the config does not set it this way). ``"relu"`` or no key changes
    nothing; any other activation is refused."""
    key = "activation_fn_str" if "activation_fn_str" in raw else "activation_fn"
    fn = raw.get(key)
    if fn is None or fn == "relu":
        return arch_cls, None
    if fn != "topk":
        raise MechscopeError(f"{where}: {key}={fn!r} is not supported; mechscope reads SAEs whose activation is 'relu' or 'topk'.")
    if arch_cls.name not in ("relu", "topk"):
        raise MechscopeError(f"{where}: {key}='topk' does not fit architecture {raw.get('architecture')!r}; "
                             "a TopK SAE has architecture 'standard' or 'topk'.")
    kwargs = raw.get("activation_fn_kwargs")
    if not isinstance(kwargs, dict) or "k" not in kwargs:
        raise MechscopeError(f"{where}: {key}='topk' needs activation_fn_kwargs.k (the number of active features per token).")
    return get_architecture("topk"), _whole(kwargs, "k", where, "active features per token, in activation_fn_kwargs")


def _missing_architecture(raw: dict[str, Any], meta: dict[str, Any], where: str) -> str:
    """The SAELens ``architecture`` name a ``cfg.json`` without one means: the one
    ``metadata.mechscope_architecture`` names (as a transcoder where ``d_out`` is set), else
    SAELens's default ``standard``. A ``k`` with no architecture anywhere is refused (a TopK
    SAE would otherwise load as ReLU); pre-6 ``activation_fn_str: topk`` is ``_activation_fn``'s."""
    mech = meta.get("mechscope_architecture")
    if mech is not None:
        cls = get_architecture(mech) if isinstance(mech, str) else None
        name = (cls.saelens_transcoder_name if "d_out" in raw else cls.saelens_name) if cls else None
        if not name:
            raise MechscopeError(f"{where} has no architecture key and metadata.mechscope_architecture={mech!r} names no "
                                 f"architecture mechscope reads; add \"architecture\" ({', '.join(saelens_names())}) to it.")
        return name
    if "k" in raw or "k" in meta:
        raise MechscopeError(f"{where} sets k but names no architecture, so it is unclear how k applies; add "
                             "\"architecture\": \"topk\" (or the SAE's architecture) to it.")
    return "standard"


def config_from_saelens(raw: dict[str, Any], where: str = CFG_FILE) -> SAEConfig:
    """An ``SAEConfig`` from a SAELens ``cfg.json`` dict (v6 layout, or older flat keys:
    ``hook_point``, ``activation_fn_str``). A value of the wrong type is refused in one sentence
    naming its key."""
    missing = [k for k in ("d_in", "d_sae") if k not in raw]
    if missing:
        raise MechscopeError(f"{where} lacks {', '.join(missing)}; an SAE config needs d_in, d_sae and architecture.")
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise MechscopeError(f"{where}: metadata must be a JSON object (with hook_name, model_name, ...), got {meta!r}.")
    meta = dict(meta)
    arch_name = raw.get("architecture")
    if arch_name is None:
        arch_name = _missing_architecture(raw, meta, where)
    found = from_saelens(arch_name, meta.get("mechscope_architecture")) if isinstance(arch_name, str) else None
    if found is None:
        raise MechscopeError(
            f"{where}: SAE architecture {arch_name!r} is not supported; mechscope reads "
            f"{', '.join(saelens_names())}."
        )
    arch_cls, transcoder = found
    arch_cls, old_k = _activation_fn(raw, arch_cls, where)
    norm = raw.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise MechscopeError(
            f"{where}: normalize_activations={norm!r} is not supported; fold the scaling into the weights "
            "(SAELens: fold_activation_norm_scaling_factor) and save again."
        )
    reshape = raw.get("reshape_activations", meta.get("reshape_activations", "none")) or "none"
    if reshape != "none":
        raise MechscopeError(
            f"{where}: reshape_activations={reshape!r} is not supported; mechscope's SAEs read one vector per token at "
            "their hook, not each head's output concatenated (hook_z SAEs); use an SAE of a residual, MLP or attention-out hook."
        )
    if raw.get("rescale_acts_by_decoder_norm"):
        raise MechscopeError(f"{where}: rescale_acts_by_decoder_norm=true is not supported; fold the decoder norms and save again.")
    b_dec_in = raw.get("apply_b_dec_to_input", True)
    if not isinstance(b_dec_in, bool):
        raise MechscopeError(f"{where}: apply_b_dec_to_input must be true or false (a JSON boolean), got {b_dec_in!r}.")
    known = {"model_name", "hook_name", "hook_name_out", "mechscope_architecture", "k", "sae_lens_version", "sae_lens_training_version"}
    k: int | None = None
    if arch_cls.uses_k:
        if old_k is not None:
            k = old_k
        elif "k" in raw or "k" in meta:
            k = _whole(raw if "k" in raw else meta, "k", where, "active features per token")
    hook_name = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or ""
    for key, value in (("hook_name", hook_name), ("hook_name_out", meta.get("hook_name_out") or raw.get("hook_name_out"))):
        if value and not isinstance(value, str):  # 5 would be read as the hook '5'
            raise MechscopeError(f"{where}: {key} must be a hook name (a string such as 'blocks.6.hook_resid_post'), "
                                 f"got {value!r}.")
    dtype = str(raw.get("dtype", "float32")).replace("torch.", "")
    if dtype not in FLOAT_DTYPES:
        raise MechscopeError(f"{where}: dtype {dtype!r} is not a float type mechscope can load.")
    return SAEConfig(
        d_in=_whole(raw, "d_in", where, "the input width"),
        d_sae=_whole(raw, "d_sae", where, "the number of features"),
        architecture=arch_cls.name,
        k=k,
        hook_name=str(hook_name),
        model_name=str(meta.get("model_name") or raw.get("model_name") or ""),
        d_out=_whole(raw, "d_out", where, "a transcoder's output width") if transcoder else None,
        hook_name_out=str(meta.get("hook_name_out") or raw.get("hook_name_out") or "") if transcoder else None,
        dtype=dtype,
        apply_b_dec_to_input=b_dec_in and not transcoder,
        metadata={k2: v for k2, v in meta.items() if k2 not in known},
    )


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by mechscope or SAELens (safetensors only)."""
    from mechscope.models.load import check_device

    device = check_device(device)
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
    # The shapes are checked before the module is built: a cfg.json whose widths disagree with its
    # tensors (d_sae: 10**12) would otherwise allocate those widths first.
    want = get_architecture(cfg.architecture)().tensor_shapes(cfg)
    scale = _scaling_factor(raw, tensors, wfile, cfg.d_sae)
    unknown = sorted(set(tensors) - set(want))
    if unknown:
        raise MechscopeError(f"{wfile} holds tensors mechscope does not know ({', '.join(unknown)}; a {cfg.architecture} SAE "
                             f"holds {', '.join(want)}), so it cannot tell what they change; remove them or fold them into the weights.")
    for name, shape in want.items():
        if name not in tensors:
            raise MechscopeError(f"{wfile} lacks the tensor {name!r} (it has {', '.join(sorted(tensors)) or 'none'}); a {cfg.architecture} SAE needs {', '.join(want)}.")
        if not tensors[name].is_floating_point():  # a copy_ would cast whole numbers silently: an SAE of nonsense
            raise MechscopeError(f"{wfile} holds {tensors[name].dtype} values in {name}, so the SAE is unusable; its weights "
                                 "must be floating point: re-train, re-download or re-save it as float32.")
        if tuple(tensors[name].shape) != shape:
            raise MechscopeError(
                f"{wfile}: {name} has shape {list(tensors[name].shape)} but cfg.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {list(shape)}; the weights and config do not belong together."
            )
    sae = SAE(cfg)
    with torch.no_grad():
        for name in want:
            getattr(sae, name).copy_(tensors[name].to(getattr(sae, name).dtype))
        if scale is not None:  # SAELens decodes (f * scaling_factor) @ W_dec: the same as f @ (scaling_factor[:, None] * W_dec)
            sae.W_dec.copy_((tensors["W_dec"].double() * scale.double()[:, None]).to(sae.W_dec.dtype))
    bad = [name for name in want if not torch.isfinite(getattr(sae, name)).all()]
    if bad:
        raise MechscopeError(f"{wfile}: {', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN or infinite values (as {cfg.dtype}), "
                             "so every figure computed from the SAE would be undefined; re-train, re-download or re-save it.")
    return sae.to(device)


_SCALING_NAMES = ("scaling_factor", "finetuning_scaling_factor")


def _scaling_factor(raw: dict[str, Any], tensors: dict[str, torch.Tensor], wfile: Path, d_sae: int) -> torch.Tensor | None:
    """SAELens before 6 could store a per-feature ``scaling_factor [d_sae]`` (or, saved from the
    module, ``finetuning_scaling_factor``) that, with ``"finetuning_scaling_factor": true``, it
    multiplies into the feature activations before decoding. Returns the factor to fold into
    ``W_dec``'s rows (removed from ``tensors``), or None: all ones means nothing (SAELens drops it
    too) and a factor the config does not switch on is refused, as SAELens refuses it. After
    folding, reconstructions are SAELens's exactly and the features (``encode``) are the
    unscaled ones, SAELens's ``encode`` output."""
    found = [n for n in _SCALING_NAMES if n in tensors]
    if not found:
        return None
    if len(found) > 1:
        raise MechscopeError(f"{wfile} holds both scaling_factor and finetuning_scaling_factor; keep one of them.")
    t = tensors.pop(found[0])
    if not t.is_floating_point():
        raise MechscopeError(f"{wfile} holds {t.dtype} values in {found[0]}, so the SAE is unusable; re-save it as float32.")
    if tuple(t.shape) != (d_sae,):
        raise MechscopeError(f"{wfile}: {found[0]} has shape {list(t.shape)} but d_sae={d_sae} implies [{d_sae}]; "
                             "the weights and config do not belong together.")
    if not torch.isfinite(t).all():
        raise MechscopeError(f"{wfile}: {found[0]} holds NaN or infinite values; re-train, re-download or re-save the SAE.")
    if torch.allclose(t.float(), torch.ones_like(t, dtype=torch.float32)):
        return None
    if raw.get("finetuning_scaling_factor") is not True:
        raise MechscopeError(f"{wfile} holds a {found[0]} that is not all ones but cfg.json does not set "
                             "\"finetuning_scaling_factor\": true; set it if the factor applies, or remove the tensor.")
    return t


def check_sae_fits(sae: SAE, model: Model) -> None:
    """Clear error when the SAE names no hook, when its hook is not in the model, holds no single
    vector per token (``check_vector_hook``) or has another width, or when the SAE records the
    weights fingerprint of another model (``metadata.model_fingerprint``, written at training: an
    SAE of another model of the same width would otherwise be read as this one's)."""
    from mechscope.models.hooks import check_hook_name

    cfg = sae.cfg
    if not cfg.hook_name:
        raise MechscopeError("the SAE names no hook (metadata.hook_name in its cfg.json is missing or empty); "
                             "set it to the hook the SAE reads, e.g. blocks.6.hook_resid_post.")
    if cfg.d_out is not None and not cfg.hook_name_out:
        raise MechscopeError("the transcoder names no output hook (metadata.hook_name_out in its cfg.json is missing or empty); "
                             "set it to the hook it writes, e.g. blocks.6.hook_mlp_out.")
    for hook, width in ((cfg.hook_name, cfg.d_in), (cfg.hook_name_out, cfg.out_dim)):
        if not hook:
            continue
        try:
            check_hook_name(model, hook)
        except MechscopeError as exc:  # the SAE's own record, not a name the user typed
            raise MechscopeError(f"The SAE reads or writes hook '{hook}' (its cfg.json), which {model.summary.name} lacks, so it "
                                 f"belongs to another model or layout; use an SAE trained on this model. ({exc})") from None
        check_vector_hook(model, hook)
        d = hook_width(model, hook)
        if d is not None and d != width:
            raise MechscopeError(
                f"the SAE expects width {width} at {hook}, but {model.summary.name} has width {d} there; "
                "use an SAE trained on this model and hook."
            )
    check_same_weights(cfg.metadata.get("model_fingerprint"), model, "the SAE", cfg.model_name)
    if not cfg.metadata.get("model_fingerprint"):
        check_same_family(cfg.model_name, model, "the SAE")


# Model families a name can be told by without a doubt, and the class names (lower case, the
# start of ModelSummary.architecture) of the models of each family.
_FAMILIES = {"gpt2": ("gpt2",), "pythia": ("gptneox",), "llama": ("llama",), "gemma": ("gemma",),
             "qwen": ("qwen",), "mistral": ("mistral",)}


def check_same_family(model_name: str, model: Model, what: str) -> None:
    """One sentence when ``model_name`` (an SAE's cfg ``model_name``, recorded without a weights
    fingerprint, as SAELens's are) names a model family other than ``model``'s architecture:
    'gpt2' on a Llama. Decided only where it is certain: the name holds exactly one family
    marker (gpt2, pythia, llama, gemma, qwen, mistral) and the model's architecture class is
    known; a name without one (a local folder, 'tiny-stories-1M') or equal to the model's own
    name or source is accepted, so a hub id of the same model ('gpt2', 'gpt2-small') still fits a
    local folder of it."""
    if not model_name or model_name in (model.summary.name, model.summary.source):
        return
    flat = model_name.lower().replace("-", "").replace("_", "")
    named = [fam for fam in _FAMILIES if fam in flat]
    arch = str(getattr(model.summary, "architecture", "") or "").lower()
    known = [fam for fam, prefixes in _FAMILIES.items() if arch.startswith(prefixes)]
    if len(named) != 1 or len(known) != 1 or named == known:
        return
    raise MechscopeError(
        f"{what} was trained on {model_name!r}, a {named[0]} model, but {model.summary.name} is a "
        f"{model.summary.architecture}; pass the model it was trained on with --model, or use an SAE trained on this one."
    )


def check_vector_hook(model: Model, hook: str) -> None:
    """One sentence when ``hook``'s activation is not one vector per token ``[batch, pos, d]``:
    attention patterns and scores (``[batch, head, query, key]``, no vector per token) and
    per-head hooks (``attn.hook_z``, ``hook_q`` ... ``[batch, pos, head, d_head]``). SAEs here
    read, reconstruct and splice one vector per token; per-head SAEs (SAELens's
    ``reshape_activations: hook_z``) are not supported."""
    shape = hook_shape(model, hook)
    if shape is None or len(shape) == 3:
        return
    kind = ("attention weights per head, [batch, head, query, key]" if hook.endswith(("hook_pattern", "hook_attn_scores"))
            else f"one vector per head, [batch, pos, head, {shape[-1]}]" if len(shape) == 4
            else f"activations of shape {list(shape)}")
    raise MechscopeError(
        f"{hook} holds {kind}, not one vector per token; SAEs read a hook such as blocks.L.hook_resid_post, "
        "blocks.L.hook_attn_out, blocks.L.hook_mlp_out or blocks.L.ln2.hook_normalized."
    )


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


def hook_width(model: Model, hook: str) -> int | None:
    """Width (last dimension) of a hook's activation; None when it did not fire."""
    shape = hook_shape(model, hook)
    return None if shape is None else shape[-1]


def hook_shape(model: Model, hook: str) -> tuple[int, ...] | None:
    """Shape of a hook's activation on two tokens, in the attention mode its readers use
    (``models.load.fired_shape``); None when it does not fire."""
    from mechscope.models.load import fired_shape

    return fired_shape(model, hook)
