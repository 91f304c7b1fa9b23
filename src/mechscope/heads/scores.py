"""Every head score for one model: the head taxonomy behind ``mechscope heads``.

1. ``n`` repeated random-token sequences ``BOS + R + R`` (|R| = ``seq_len``): previous-token,
   duplicate-token and induction (prefix-matching) scores (``heads.patterns``), and the
   repeated-half loss under mean ablation of the top induction heads one at a time and of the
   top-k together vs random k-sets (``heads.ablation``).
2. ``n_text`` windows of ``text_len`` tokens of real text (``heads.sequences.text_source``):
   the same pattern scores on text, and the model's in-context-learning score (``heads.icl``).
3. From the weights alone: copying scores of each OV circuit (``heads.copying``) and Q/K/V
   composition between heads of different layers (``heads.composition``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mechscope.graph.names import head_node
from mechscope.heads import ablation, composition, copying, icl, patterns, sequences
from mechscope.heads.config import HeadsConfig
from mechscope.heads.result import HeadsResult
from mechscope.heads.weights import head_weights
from mechscope.partial import Partial, digest, model_key
from mechscope.progress import ProgressArg, as_progress


def head_scores(model: Any, cfg: HeadsConfig | None = None, progress: ProgressArg = False,
                checkpoint: str | Path | None = None) -> HeadsResult:
    """Compute the head taxonomy of ``model`` (see module docstring); ``progress`` gets a note per step.
    ``checkpoint``: a folder where each finished step's scores are kept (``mechscope.partial``,
    job ``heads``, keyed by the settings, the weights and the token sequences); a rerun reads
    them back instead of recomputing them (the CLI's ``--out``)."""
    from mechscope.errors import check_config
    from mechscope.models import require_model

    if not (hasattr(model, "bridge") and hasattr(model, "summary")):  # duck-typed stand-ins (tests) pass
        require_model(model, "head_scores")
    check_config(cfg, HeadsConfig, "head_scores")
    cfg = cfg or HeadsConfig()
    say = as_progress(progress).note
    patterns.check_heads_visible(model)
    s = model.summary
    p = len(sequences.prefix_ids(model.tokenizer))
    rep = sequences.repeated_random(model, cfg.n, cfg.seq_len, cfg.seed)  # [n, p + 2L]
    text_len = cfg.text_len if cfg.text_len is not None else min(520, s.n_ctx - p)
    sequences.check_length(model, p + text_len, f"A text window (prefix + {text_len})", "--text-len", length=text_len)

    source, docs = sequences.text_source(cfg.text)
    text = sequences.text_windows(model, docs, cfg.n_text, text_len)
    key = {"settings": cfg.to_dict(), "model": model_key(model), "tokens": digest([rep, text]) if checkpoint is not None else None}
    done = Partial(checkpoint, "heads", key)
    if done.found:
        say(f"resuming: {done.found} finished steps read from {checkpoint}")
    if done.discarded:
        say(f"{checkpoint} held steps of a run with other settings, weights or texts; they were discarded")

    def stage(name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        got = done.get_tensors(name)
        return got if got is not None else done.put_tensors(name, compute())

    say("attention patterns on repeated random tokens")
    scores: dict[str, torch.Tensor] = dict(stage("patterns", lambda: patterns.pattern_scores(model, rep)))

    say("attention patterns and ICL score on real text")
    text_scores = stage("text-patterns", lambda: patterns.pattern_scores(model, text, batch_size=2, with_loss=True))
    for k in patterns.KINDS:
        scores[f"text_{k}"] = text_scores[k]
    icl_res = icl.icl_from_loss(text_scores["token_loss"], p)
    icl_res["n_contexts"] = len(text)

    say("copying scores (OV circuits)")
    w = head_weights(model)
    scores |= stage("copying", lambda: {
        "copying_eigen": copying.eigen_copying(w),
        "copying_top1": copying.top1_copying(w, copying.copying_tokens(model, cfg.copy_tokens, cfg.seed))})

    say("mean ablation of induction heads")
    ranking = _ranking(scores["induction"])
    n_abl = len(ranking) if cfg.ablate < 0 else min(cfg.ablate, len(ranking))

    def one_at_a_time() -> dict[str, torch.Tensor]:
        eff = ablation.ablation_effects(model, rep, cfg.seq_len, ranking[:n_abl])
        abl = torch.full((s.n_layers, s.n_heads), float("nan"))
        for l, h in ranking[:n_abl]:
            abl[l, h] = eff[head_node(l, h)]
        return {"ablation": abl}

    scores |= stage("ablation", one_at_a_time)
    k_top = min(cfg.top_k, len(ranking))
    abl_summary = done.get("topk-vs-random")
    if abl_summary is None:
        abl_summary = done.put("topk-vs-random", ablation.topk_vs_random(model, rep, cfg.seq_len, ranking, k_top, cfg.n_random, cfg.seed))

    comp: dict[str, torch.Tensor] = {}
    if cfg.composition and s.n_layers > 1:
        say("composition scores")
        comp = stage("composition", lambda: composition.composition_scores(w))

    ex = sequences.repeated_random(model, 1, min(cfg.example_len, cfg.seq_len), cfg.seed + 1)[0]
    pats = patterns.example_patterns(model, ex)
    extra: dict = {"text_windows": {"n": len(text), "tokens": int(text.shape[1])}}
    if note := _window_note(model, cfg.seq_len):
        extra["note"] = note
        say(note)
    return HeadsResult(
        model=s.to_dict(), settings=cfg.to_dict(), scores=scores, composition=comp, icl=icl_res,
        ablation=abl_summary, example_tokens=model.to_str_tokens(ex), example_patterns=pats,
        text_source=source, extra=extra,
    )


def _window_note(model: Any, seq_len: int) -> str | None:
    """A sentence when some layers' sliding window cannot reach back ``seq_len`` tokens, the
    distance from a token's repeat to its first copy: their duplicate and induction scores are 0
    by construction, not a finding."""
    from mechscope.circuits.qk import declared_window

    short: dict[int, int] = {}
    for layer in range(model.summary.n_layers):
        attn = getattr(model.bridge.blocks[layer].attn, "original_component", None)
        win = declared_window(attn, layer) if attn is not None else None
        if win is not None and win <= seq_len:
            short[layer] = win
    if not short:
        return None
    layers, win = ", ".join(str(layer) for layer in short), min(short.values())
    return (f"layer{'s' if len(short) > 1 else ''} {layers} attend{'' if len(short) > 1 else 's'} over a sliding window of "
            f"{win} tokens, no more than the repeat distance (--seq-len {seq_len}): their heads cannot see the "
            f"first copy, so their duplicate and induction scores are 0 by construction; give --seq-len below {win} to measure them.")


def _ranking(score: torch.Tensor) -> list[tuple[int, int]]:
    """All (layer, head) pairs, highest score first."""
    H = score.shape[1]
    order = torch.nan_to_num(score.flatten(), nan=-1.0).argsort(descending=True).tolist()
    return [(i // H, i % H) for i in order]
