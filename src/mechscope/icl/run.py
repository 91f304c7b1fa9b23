"""``fewshot_knockout``: few-shot accuracy, then the position-group knockout sweeps (and their
random controls) over every window of layers, on the prompts the model gets right.

With ``checkpoint`` (a folder), each finished prompt's curves go to ``icl-partial.json`` there,
and a rerun with the same settings, model weights and prompts (a hash of their tokens: an
edited task file starts afresh) resumes after the last one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from mechscope.errors import MechscopeError, check_config
from mechscope.icl.config import FewShotConfig
from mechscope.icl.fewshot import FewShotPrompt, chance_level, check_task, fewshot_accuracy, sample_prompts
from mechscope.icl.knockout import Edge, block_edges, matched_edges, random_edges, sweep_edges
from mechscope.icl.result import FewShotResult
from mechscope.models.load import context_overrun
from mechscope.progress import ProgressArg, as_progress
from mechscope.recall.config import window_layers

PARTIAL = "icl-partial.json"


def prompt_curves(model, prompt: FewShotPrompt, cfg: FewShotConfig, seed: int) -> dict[str, dict]:
    """{sweep: {"effect" | "control" | "matched": [windows], "n_edges": int, "n_matched": int}} of one prompt."""
    L = model.summary.n_layers
    width, centres = cfg.window_size(L), cfg.layers(L)
    sets: list[tuple[str, str, list[Edge]]] = []
    for s_i, s in enumerate(cfg.sweeps):
        edges = sweep_edges(prompt, s)
        sets.append((s, "effect", edges))
        sets.append((s, "control", random_edges(len(prompt.ids), len(edges), edges, seed=seed * 1009 + s_i)))
        sets.append((s, "matched", matched_edges(edges, seed=seed * 1009 + s_i)))
    rows: list[dict[int, list[Edge]]] = [{}]
    for _, _, edges in sets:
        rows += [{lay: edges for lay in window_layers(c, width, L)} for c in centres]
    probs = block_edges(model, prompt.ids, prompt.target_id, rows, cfg.max_rows)
    clean = float(probs[0])
    rel = ((probs[1:] - clean) / max(clean, 1e-12)).view(len(sets), len(centres))
    out: dict[str, dict] = {}
    for i, (s, part, edges) in enumerate(sets):
        d = out.setdefault(s, {"n_edges": len(edges), "clean_prob": clean})
        d[part] = rel[i].tolist()
        if part == "matched":
            d["n_matched"] = len(edges)
    return out


def _read_partial(where: Path | None, key: dict) -> dict[str, dict]:
    if where is None or not (where / PARTIAL).is_file():
        return {}
    try:
        d = json.loads((where / PARTIAL).read_text())
    except json.JSONDecodeError:
        return {}
    return d.get("done", {}) if d.get("key") == key else {}


def _write_partial(where: Path, key: dict, done: dict) -> None:
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / (PARTIAL + ".tmp")
    tmp.write_text(json.dumps({"key": key, "done": done}))
    os.replace(tmp, where / PARTIAL)


def fewshot_knockout(model, cfg: FewShotConfig | None = None, *, checkpoint: str | Path | None = None,
                     progress: ProgressArg = False) -> FewShotResult:
    """Accuracy of ``cfg.n`` few-shot prompts of ``cfg.task``, then the knockout sweeps on up to
    ``cfg.max_knockout`` prompts the model gets right. Refuses (one sentence) to knock out when
    accuracy is not ``cfg.min_above_chance`` above chance, unless ``cfg.force``."""
    from mechscope.models import require_model

    require_model(model, "fewshot_knockout")
    check_config(cfg, FewShotConfig, "fewshot_knockout")
    cfg = cfg or FewShotConfig()
    t0 = time.time()
    cfg.window_size(model.summary.n_layers)  # refuses a window wider than the model before any work
    if cfg.knockout:
        from mechscope.models.check import require_attention_edits

        require_attention_edits(model, "icl's position-group knockout (--accuracy-only runs without it)")
    task = check_task(cfg.task, cfg.shots, cfg.ambiguous)
    prompts = sample_prompts(model.tokenizer, task, cfg.shots, cfg.n, cfg.seed, cfg.ambiguous)
    longest = max(len(p.ids) for p in prompts)
    if (n_ctx := context_overrun(model, longest)) is not None:
        raise MechscopeError(f"The longest '{task.name}' prompt has {longest} tokens, more than the model's context of "
                             f"{n_ctx}; use fewer --shots or shorter examples.")
    probs, top = fewshot_accuracy(model, prompts, cfg.max_rows)
    acc, chance = float(top.float().mean()), chance_level(model.tokenizer, task, prompts)
    if chance >= 1.0 and not cfg.force:  # accuracy-only too: every prompt would count as right
        raise MechscopeError(f"Every answer of '{task.name}' starts with the same token "
                             f"({model.tokenizer.decode([prompts[0].target_id])!r}), so the first token tells none apart; "
                             "use answers that differ in their first token, or pass --force.")
    if acc < chance + cfg.min_above_chance and cfg.knockout and not cfg.force:
        raise MechscopeError(f"The model gets {int(top.sum())} of {len(prompts)} '{task.name}' prompts right ({acc:.2f}, chance "
                             f"{chance:.2f}), not {cfg.min_above_chance} above chance; try more --shots or another task, or pass --force.")
    kept = [i for i in range(len(prompts)) if top[i]][:cfg.max_knockout] if cfg.knockout else []
    if not kept and cfg.knockout:
        raise MechscopeError(f"The model gets none of the {len(prompts)} '{task.name}' prompts right, so there is nothing to knock out.")
    L = model.summary.n_layers
    # The prompts themselves (so an edited task file is not resumed) and the weights' fingerprint.
    made_of = hashlib.sha1(json.dumps([[p.ids, p.target_id, p.groups] for p in prompts]).encode()).hexdigest()[:16]
    key = {"settings": cfg.to_dict(), "model": model.summary.name, "fingerprint": model.fingerprint(), "prompts": made_of}
    where = Path(checkpoint) if checkpoint is not None else None
    done = _read_partial(where, key)
    bar = as_progress(progress if kept else False).phase("knockout sweeps", total=len(kept), unit="prompt",
                                                         initial=sum(str(i) in done for i in kept))
    for i in kept:
        if str(i) not in done:
            done[str(i)] = prompt_curves(model, prompts[i], cfg, cfg.seed + i)
            if where is not None:
                _write_partial(where, key, done)
            bar.advance()
    bar.close()
    curves: dict[str, dict] = {}
    for s in cfg.sweeps if kept else ():
        eff = torch.tensor([done[str(i)][s]["effect"] for i in kept])  # [prompts, windows]
        ctl = torch.tensor([done[str(i)][s]["control"] for i in kept])
        mat = torch.tensor([done[str(i)][s]["matched"] for i in kept])
        curves[s] = {"effect": eff.mean(0).tolist(), "control": ctl.mean(0).tolist(), "matched": mat.mean(0).tolist(),
                     "effect_per_prompt": eff.tolist(), "control_per_prompt": ctl.tolist(), "matched_per_prompt": mat.tolist(),
                     "n_edges": [done[str(i)][s]["n_edges"] for i in kept], "n_matched": [done[str(i)][s]["n_matched"] for i in kept],
                     "clean_prob": [done[str(i)][s]["clean_prob"] for i in kept]}
    rows = []
    for i, p in enumerate(prompts):
        row = {"text": p.text, "query": p.query, "answer": p.answer, "target_id": p.target_id, "prob": float(probs[i]),
               "correct": bool(top[i]), "knocked_out": i in kept, "groups": p.groups}
        if p.alt_answer is not None:
            row["alternative_answer"] = p.alt_answer
        rows.append(row)
    info = {"name": task.name, "source": task.source, "n_pairs": len(task.pairs),
            "ambiguous": "examples: capital == largest city except one; query: capital != largest city" if cfg.ambiguous else None}
    return FewShotResult(model=model.summary.to_dict(), settings=cfg.to_dict(), task=info, prompts=rows, accuracy=acc,
                         chance=chance, window=cfg.window_size(L), layers=cfg.layers(L), n_layers=L, curves=curves,
                         seconds=time.time() - t0)
