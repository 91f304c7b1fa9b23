"""`mechscope confusion`: language confusion (Nie et al. 2025): pass rates, confusion points,
the neurons behind them, and the effect and cost of zeroing them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mechscope.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    check_out_folder,
    console,
    emit_json,
    handles_errors,
    load,
    parse_layers,
    resumable_out,
)
from mechscope.confusion.config import ConfusionConfig

_D = ConfusionConfig()


def register(app: typer.Typer) -> None:
    app.command("confusion")(confusion)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@handles_errors
def confusion(
    prompts: str = typer.Option("builtin", "--prompts", help="A JSONL file of {\"prompt\", \"lang\"} lines, or 'builtin' "
                                "(30 prompts each in de, es, fr, it)."),
    langs: str = typer.Option(",".join(_D.langs), "--langs", help="Expected languages to keep, comma-separated."),
    n_tokens: int = typer.Option(_D.n_tokens, "--n-tokens", help="Greedy new tokens per prompt (the paper: 100)."),
    top_n: int = typer.Option(_D.top_n, "--top-n", help="Neurons zeroed by the edit."),
    last_layers: int = typer.Option(_D.last_layers, "--last-layers", help="Attribute and edit only the last K layers (0: all)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Attribute and edit only these layers, e.g. 0-28 (every layer "
                                         "but the last of a 30-layer model); default: --last-layers."),
    max_per_lang: int = typer.Option(_D.max_per_lang, "--max-per-lang", help="Prompts kept per language (0: all)."),
    tuned: Optional[Path] = typer.Option(None, "--tuned", help="Read the lens through tuned-lens translators (a `mechscope "
                                         "tuned-lens train` folder; default: the logit lens)."),
    ioi_n: int = typer.Option(_D.ioi_n, "--ioi-n", help="IOI prompts for the edit's cost (0: skip)."),
    facts_n: int = typer.Option(_D.facts_n, "--facts-n", help="Shipped facts for the edit's cost (0: all)."),
    ppl_contexts: int = typer.Option(_D.ppl_contexts, "--ppl-contexts", help="Held-out corpus contexts for the perplexity cost (0: skip)."),
    seed: int = typer.Option(_D.seed, "--seed", help="Seeds the random-neuron control and the IOI draw."),
    english_budget: Optional[float] = typer.Option(None, "--english-budget", help="Spare the neurons English needs: pass over "
                                                   "neurons whose zeroing alone raises the loss on English text by more than "
                                                   "their share of this relative perplexity increase, e.g. 0.02 (default: "
                                                   "rank all)."),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here); a rerun with the "
                                       "same settings resumes in it after a kill."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Generate in other languages, measure LPR, find the neurons pushing English at confusion points, zero them, measure again."""
    from mechscope.confusion import load_prompts, run_confusion
    from mechscope.partial import clear as clear_partial
    from mechscope.report.confusion import write_confusion

    cfg = ConfusionConfig(langs=tuple(x.strip() for x in langs.split(",") if x.strip()), n_tokens=n_tokens, top_n=top_n,
                          last_layers=last_layers, layers=tuple(parse_layers(layers) or ()) or None, max_per_lang=max_per_lang, ioi_n=ioi_n, facts_n=facts_n,
                          ppl_contexts=ppl_contexts, seed=seed, english_budget=english_budget)
    check_out_folder(out, "confusion")
    items = load_prompts(prompts, cfg.langs, cfg.max_per_lang)  # a bad file fails before the model loads
    lens_t = None
    if tuned is not None:
        from mechscope.lens.tuned import TunedLens

        lens_t = TunedLens.load(tuned)

    m = load(model, device)
    if lens_t is not None:
        lens_t = lens_t.to(m.device)
    out_dir = resumable_out(out, "confusion")
    res = run_confusion(m, items, cfg, tuned=lens_t, progress=not json, checkpoint=out_dir)
    res.save(out_dir)
    report = write_confusion(res.to_dict(), out_dir / "report.html")
    clear_partial(out_dir, "confusion")  # the result is saved: its stages are no longer needed
    if json:
        return emit_json({"headline": res.headline(), "lens": res.lens, "top": res.top[:20], "notes": res.notes,
                          "timing": res.timing, "report": str(report), "out": str(out_dir)})
    h = res.headline()
    for name in h:
        c = h[name]
        cost = ", ".join(f"{k} {v:.3g}" for k, v in c.get("cost", {}).items())
        console.print(f"{name}: LPR {_pct(c['lpr'])} (held-out {_pct(c['lpr_heldout'])}), English lines in "
                      f"{_pct(c['english_rate'])}; {cost}", highlight=False)
    for n in res.notes:
        console.print(n, highlight=False)
    console.print(f"report: {report}", highlight=False)
