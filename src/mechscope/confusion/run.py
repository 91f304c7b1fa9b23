"""``run_confusion``: the whole language-confusion pipeline on one model.

1. Generate greedily (``cfg.n_tokens``) for every prompt through the chat template; score the
   responses (LCB line-level and word-level pass rates, share with an English line) and find
   each generation's confusion point (``points``).
2. Split the prompts: within each language, even-numbered prompts *find* the neurons, the others
   are *held out* for measuring the edit.
3. Lens: at every confusion point, the probability and rank of the confusion token read at each
   layer (the tuned lens when translators are given, else the logit lens); the control is the
   token generated at the same relative position in the generations without a switch.
4. Neuron attribution (``attribution.neuron_gains``) at the find split's confusion points and,
   as the contrast, at its non-confused generations' matched positions. Offline there is no
   multilingual-tuned twin of the model (the paper's contrast), so the ranking is the mean
   accumulated gain over confused prefixes minus the same over non-confused prefixes: neurons
   that push the English token at a switch more than they push whatever comes next in a
   generation that stays in the language.
   With ``cfg.english_budget``, the ranking is walked down and neurons whose zeroing alone costs
   English text more than their share of the budget are passed over (``english.spare_english``).
5. Edit: zero the top ``cfg.top_n`` neurons, and as the control as many random neurons with the
   same count per layer (seeded); regenerate everything and measure again, with the cost on
   English (``cost.CostProbe``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.confusion.attribution import Prefix, accumulate, lens_readout, neuron_gains
from mechscope.confusion.config import ConfusionConfig, check_top_n
from mechscope.confusion.cost import CostProbe, relative_change
from mechscope.confusion.edit import Neuron, down_projections, zeroed_neurons
from mechscope.confusion.english import english_contexts, spare_english
from mechscope.confusion.generate import chat_ids, greedy_generate
from mechscope.confusion.metrics import ResponseCheck, check_response, english_words, pass_rates
from mechscope.confusion.points import confusion_point, matched_position
from mechscope.confusion.prompts import LangPrompt
from mechscope.confusion.result import ConfusionResult
from mechscope.errors import MechscopeError, check_config
from mechscope.models.load import context_overrun
from mechscope.models.tokens import token_texts
from mechscope.partial import Partial, digest, model_key
from mechscope.progress import ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.models import Model



def generation_points(tokenizer: Any, gens: list[list[int]]) -> list[int | None]:
    """The confusion point of each generation (``points.confusion_point``) on its tokens' texts
    as they read in running text (``token_texts``): ``decode([i])`` drops the leading space of a
    SentencePiece word-start piece (Llama-2, Mistral v0.1), and the joined text, without its
    spaces, would hold no English run of words."""
    return [confusion_point(token_texts(tokenizer, g)) for g in gens]


def _layers(model: Model, cfg: ConfusionConfig) -> list[int]:
    L = model.summary.n_layers
    if cfg.layers is not None:
        if cfg.layers[-1] >= L:
            raise MechscopeError(f"--layers names layer {cfg.layers[-1]}, but the model has layers 0-{L - 1}.")
        return list(cfg.layers)
    if cfg.last_layers > L:
        raise MechscopeError(f"--last-layers {cfg.last_layers} is more than the model's {L} layers; give at most {L} (0: all).")
    return list(range(L - cfg.last_layers, L)) if cfg.last_layers and cfg.last_layers < L else list(range(L))


def _rates(checks: list[ResponseCheck], prompts: list[LangPrompt], keep: list[int] | None = None) -> dict[str, Any]:
    idx = list(range(len(prompts))) if keep is None else keep
    out: dict[str, Any] = {"all": pass_rates(checks[i] for i in idx), "by_lang": {}}
    for lang in dict.fromkeys(p.lang for p in prompts):
        out["by_lang"][lang] = pass_rates(checks[i] for i in idx if prompts[i].lang == lang)
    return out


def _split(prompts: list[LangPrompt]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        k = seen.get(p.lang, 0)
        seen[p.lang] = k + 1
        out.append("find" if k % 2 == 0 else "heldout")
    return out


def random_like(top: list[Neuron], d_mlp: int, seed: int) -> list[Neuron]:
    """As many random neurons per layer as ``top`` has there, none of them in ``top`` (seeded);
    fewer where a layer has fewer neurons outside ``top`` (``run_confusion`` notes it)."""
    g = torch.Generator().manual_seed(seed)
    chosen = set(top)
    out: list[Neuron] = []
    per_layer: dict[int, int] = {}
    for layer, _ in top:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    for layer, k in sorted(per_layer.items()):
        free = torch.tensor([n for n in range(d_mlp) if (layer, n) not in chosen])
        pick = free[torch.randperm(len(free), generator=g)[:k]]
        out += [(layer, int(n)) for n in pick]
    return out


def run_confusion(model: Model, prompts: list[LangPrompt], cfg: ConfusionConfig | None = None, tuned: Any = None,
                  progress: ProgressArg = False, english: frozenset[str] | None = None,
                  checkpoint: str | Path | None = None) -> ConfusionResult:
    """Generate, measure, attribute, edit and measure again (see the module docstring).
    ``english``: the word list for WPR (default ``metrics.english_words()``). ``checkpoint``: a
    folder where each finished stage (each generation run, the lens, each layer's attribution,
    each cost) is kept (``mechscope.partial``); a rerun with the same settings, weights, prompts
    and lens resumes after them, and ``Partial.clear`` on the folder's ``confusion`` pieces
    removes them (the CLI does once the result is saved)."""
    from mechscope.explain.plain import plain_lm

    check_config(cfg, ConfusionConfig, "run_confusion")
    cfg = cfg or ConfusionConfig()
    prog = as_progress(progress)
    if not prompts:
        raise MechscopeError("No prompts to run; pass a prompt file with at least one prompt.")
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, LangPrompt) for p in prompts):
        raise MechscopeError("run_confusion takes its prompts as LangPrompt(prompt, lang) objects (mechscope.confusion.prompts), "
                             "e.g. [LangPrompt('Wie geht es dir?', 'de')], or read them with load_prompts(FILE).")
    t0 = time.time()
    layers = _layers(model, cfg)
    d_mlp = model.summary.d_mlp
    check_top_n(cfg.top_n, len(layers) * d_mlp)
    down_projections(model.bridge.original_model)  # an unsupported layout fails before any work
    if tuned is not None:
        tuned.check_fits(model)
    tok = model.tokenizer
    ids = [chat_ids(tok, p.prompt) for p in prompts]
    for p, x in zip(prompts, ids):
        if (n_ctx := context_overrun(model, len(x) + cfg.n_tokens)) is not None:
            raise MechscopeError(f"The prompt {p.prompt[:40]!r} has {len(x)} tokens; with {cfg.n_tokens} new tokens that is more "
                                 f"than the model's context of {n_ctx}: shorten it or lower --n-tokens.")
    words = english if english is not None else english_words()
    key = {"settings": cfg.to_dict(), "layers": layers, "model": model_key(model),
           "prompts": digest([[p.lang, x] for p, x in zip(prompts, ids)]),
           "tuned": digest([tuned.reads, tuned.weight, tuned.bias]) if tuned is not None else None}
    done = Partial(checkpoint, "confusion", key)
    if done.found:  # said, not saved: a resumed run's result is the uninterrupted one's
        prog.note(f"resuming: {done.found} finished stages of an earlier run with the same settings read from {checkpoint}")
    if done.discarded:
        prog.note(f"{checkpoint} held stages of a run with other settings, weights, prompts or lens; they were discarded")
    probe = CostProbe(model, cfg.ioi_n, cfg.ppl_contexts, cfg.ppl_len, cfg.seed, cfg.facts_n)  # built before any generation
    plain = plain_lm(model)
    split = _split(prompts)
    heldout = [i for i, s in enumerate(split) if s == "heldout"]
    timing: dict[str, float] = {}

    def generate(neurons: list[Neuron], stage: str) -> tuple[list[list[int]], list[ResponseCheck], list[int | None]]:
        t = time.time()
        piece = stage.replace(" ", "-")
        gens = done.get(piece)
        if gens is None:
            with zeroed_neurons([plain.hf], neurons), prog.phase(stage, total=len(ids), unit="prompt") as bar:
                gens = done.put(piece, greedy_generate(plain.hf, plain.tokenizer, ids, cfg.n_tokens, cfg.batch_size, bar=bar))
        checks = [check_response(tok.decode(g, skip_special_tokens=True), p.lang, words, cfg.threshold, cfg.min_words)
                  for g, p in zip(gens, prompts)]
        points = generation_points(tok, gens)
        timing[stage] = time.time() - t
        return gens, checks, points

    gens, checks, points = generate([], "generate")
    confused = [i for i, c in enumerate(points) if c is not None]
    steady = [i for i, c in enumerate(points) if c is None and len(gens[i]) >= 2]
    rel = sum((points[i] or 0) / max(len(gens[i]), 1) for i in confused) / len(confused) if confused else 0.5

    def prefix(i: int) -> Prefix:
        cp = points[i]
        pos = cp if cp is not None else matched_position(rel, len(gens[i]))
        return Prefix(ids[i] + gens[i][:pos], gens[i][pos])

    notes: list[str] = []
    t = time.time()
    lens_name = "tuned" if tuned is not None else "logit"
    lens: dict[str, Any] = {"lens": lens_name, "n_confused": len(confused), "n_control": len(steady), "relative_position": rel}
    for name, group in (("confused", confused), ("control", steady)):
        if group:
            read = done.get(f"lens-{name}")
            if read is None:
                pr, rk = lens_readout(model, [prefix(i) for i in group], tuned)
                read = done.put(f"lens-{name}", {"mean_prob": pr.mean(0).tolist(), "median_rank": rk.float().median(0).values.tolist(),
                                                 "top1_share": (rk == 0).float().mean(0).tolist()})
            lens[name] = read
    timing["lens"] = time.time() - t

    find_conf = [i for i in confused if split[i] == "find"]
    find_ctrl = [i for i in steady if split[i] == "find"]
    top: list[dict[str, Any]] = []
    rand: list[Neuron] = []
    conf_total = torch.zeros(len(layers), d_mlp)
    ctrl_total = torch.zeros(len(layers), d_mlp)
    if not find_conf:
        notes.append("No generation of the find split switched to English, so there are no confusion points to "
                     "attribute and nothing was edited.")
    else:
        t = time.time()
        g = neuron_gains(model, [prefix(i) for i in find_conf + find_ctrl], layers,  # one pass: each layer's map is built once
                         progress=prog, partial=done)
        conf_total, conf_count = accumulate(g[:len(find_conf)], cfg.per_prompt)
        if find_ctrl:
            ctrl_total, _ = accumulate(g[len(find_conf):], cfg.per_prompt)
        else:
            notes.append("Every generation of the find split switched to English: the ranking has no non-confused contrast.")
        score = conf_total / len(find_conf) - (ctrl_total / len(find_ctrl) if find_ctrl else 0)
        eng_costs: dict[Neuron, float] = {}
        if cfg.english_budget is None:
            v, flat = score.flatten().topk(cfg.top_n)
        else:
            ranking = [divmod(f, d_mlp) for f in score.flatten().argsort(descending=True)[:cfg.max_tries].tolist()]
            got = done.get("english-spare")
            if got is None:
                with prog.phase("sparing English (zeroing cost per neuron)", total=len(ranking), unit="neuron") as bar:
                    kept, spent = spare_english(plain.hf, [(layers[j], n) for j, n in ranking],
                                                english_contexts(model, cfg.english_contexts, cfg.ppl_len),
                                                cfg.top_n, cfg.english_budget, cfg.max_tries, bar=bar)
                got = done.put("english-spare", {"kept": kept, "costs": [[l, n, c] for (l, n), c in spent.items()]})
            eng_costs = {(int(l), int(n)): float(c) for l, n, c in got["costs"]}
            row = {l: j for j, l in enumerate(layers)}
            flat = torch.tensor([row[l] * d_mlp + n for l, n in got["kept"]], dtype=torch.long)
            v = score.flatten()[flat]
            if len(flat) < cfg.top_n:
                notes.append(f"Only {len(flat)} of the {len(eng_costs)} best-ranked neurons cost English at most their share of "
                             f"the {cfg.english_budget:g} budget each; the edit zeroes those {len(flat)}, not {cfg.top_n}.")
        for s_, f in zip(v.tolist(), flat.tolist()):
            j, n = divmod(f, d_mlp)
            top.append({"layer": layers[j], "neuron": n, "score": s_, "confused": float(conf_total[j, n]) / len(find_conf),
                        "control": float(ctrl_total[j, n]) / len(find_ctrl) if find_ctrl else 0.0,
                        "count": int(conf_count[j, n]),
                        **({"english_cost": eng_costs[(layers[j], n)]} if eng_costs else {})})
        if top and (n_pos := sum(x["score"] > 0 for x in top)) < len(top):
            notes.append(f"Only {n_pos} of the {len(top)} neurons zeroed have a positive score (more for the English token at "
                         f"confused points than at non-confused ones); the other {len(top) - n_pos} were taken by rank alone, "
                         "so a smaller --top-n edits only neurons with evidence.")
        rand = random_like([(x["layer"], x["neuron"]) for x in top], d_mlp, cfg.seed)
        if len(rand) < len(top):
            notes.append(f"The random control has {len(rand)} neurons, not {len(top)}: some layers hold fewer neurons outside the "
                         f"top {len(top)} than the top has there, so its effects and costs are not of the same size; give a "
                         "smaller --top-n or more layers.")
        timing["attribute"] = time.time() - t

    t = time.time()
    costs: dict[str, Any] = {}
    prog.note("cost on English (IOI, facts, perplexity) of the unedited model")
    costs["baseline"] = done.get("cost-baseline") or done.put("cost-baseline", probe.measure())
    notes += probe.skipped
    conditions: dict[str, Any] = {"baseline": {"rates": _rates(checks, prompts), "heldout": _rates(checks, prompts, heldout),
                                               "texts": [tok.decode(g_, skip_special_tokens=True) for g_ in gens],
                                               "points": points, "checks": [c.to_dict() for c in checks]}}
    timing["cost"] = time.time() - t
    if top:
        for name, neurons in (("top", [(x["layer"], x["neuron"]) for x in top]), ("random", rand)):
            g2, c2, p2 = generate(neurons, f"generate {name}")
            conditions[name] = {"rates": _rates(c2, prompts), "heldout": _rates(c2, prompts, heldout),
                                "texts": [tok.decode(x, skip_special_tokens=True) for x in g2], "points": p2,
                                "checks": [c.to_dict() for c in c2]}
            t = time.time()
            prog.note(f"cost on English of the {name} edit")
            costs[name] = done.get(f"cost-{name}") or done.put(f"cost-{name}", probe.measure(neurons))
            costs[name]["relative_change"] = relative_change(costs[name], costs["baseline"])
            timing["cost"] += time.time() - t
    timing["total"] = time.time() - t0
    return ConfusionResult(
        model=model.summary.to_dict(), settings={**cfg.to_dict(), "layers": layers, "lens": lens_name,
                                                 "ranking": "confused minus non-confused mean accumulated gain"
                                                 + ("" if cfg.english_budget is None else
                                                    f", sparing neurons over their share of a {cfg.english_budget:g} English budget")},
        prompts=[{"prompt": p.prompt, "lang": p.lang, "split": s} for p, s in zip(prompts, split)],
        cp_tokens=[token_texts(tok, [gens[i][points[i]]])[0] if points[i] is not None else None for i in range(len(prompts))],  # type: ignore[index]
        conditions=conditions, lens=lens, top=top, random=[list(x) for x in rand], costs=costs,
        confused_scores=conf_total, control_scores=ctrl_total, timing=timing, notes=notes,
    )
