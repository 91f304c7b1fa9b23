"""`mechscope lens`: logit lens and direct logit attribution of one prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from mechscope.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    check_out_folder,
    console,
    emit_json,
    err_console,
    fresh_dir,
    handles_errors,
    load,
)

LONG_PROMPT = 256
"""Prompt tokens above which ``lens`` says that the run and its report will be large (measured by a
user: ~410 tokens took 100 s on this box and wrote a 7.4 MB report)."""


def register(app: typer.Typer) -> None:
    app.command("lens")(lens)


@handles_errors
def lens(
    prompt: str = typer.Argument(..., help="The prompt whose next token to explain."),
    model: Optional[str] = ModelOpt,
    target: Optional[str] = typer.Option(None, "--target", help="Token to follow (default: the model's top prediction)."),
    distractor: Optional[str] = typer.Option(None, "--distractor", help="Contrast token for DLA (default: the runner-up)."),
    k: int = typer.Option(5, "--k", help="Top tokens kept per site and position."),
    tuned: Optional[Path] = typer.Option(None, "--tuned", help="Read through a tuned lens's translators (a `mechscope tuned-lens train` folder)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Logit lens at every layer (resid pre/mid/post; with --tuned, the tuned lens) and direct logit attribution per head and MLP."""
    from mechscope.lens import run_lens
    from mechscope.lens.run import check_k
    from mechscope.report.lens import write_lens

    check_k(k)  # before loading the model
    check_out_folder(out, "lens")
    lens_t = None
    if tuned is not None:
        from mechscope.lens.tuned import TunedLens

        lens_t = TunedLens.load(tuned)  # a bad folder fails before the model loads
    m = load(model, device)
    n_tok = len(m.to_tokens(prompt))
    if n_tok > LONG_PROMPT:
        err_console.print(f"note: a {n_tok}-token prompt; the lens reads every site at every position over the whole vocabulary "
                          "and writes every cell to the report: expect minutes and tens of MB.", highlight=False)
    res = run_lens(m, prompt, target=target, distractor=distractor, k=k, tuned=lens_t)
    out_dir = Path(out or fresh_dir("lens"))
    res.save(out_dir)
    d = res.to_dict()
    report = write_lens(d, out_dir / "report.html")
    if json:
        return emit_json({**d, "report": str(report), "out": str(out_dir)})
    rank_last = res.rank[:, -1].tolist()
    if lens_t is not None:
        logit = res.settings["logit_rank_last_position"]
        console.print("target rank at the last position, tuned lens (logit lens): " + ", ".join(
            f"{s} {t} ({g})" for s, t, g in zip(res.sites, rank_last, logit)), highlight=False)
    # Partial UTF-8 byte tokens all decode to U+FFFD: name them by id too, so two of them differ.
    tgt, dis = (f"{t!r}" + (f" (id {i})" if "\ufffd" in t or res.target == res.distractor else "")
                for t, i in ((res.target, res.target_id), (res.distractor, res.distractor_id)))
    console.print(f"{res.prompt!r} -> target {tgt} (final rank {rank_last[-1]}, p = {float(res.prob[-1, -1]):.3f}); "
                  + (f"first top-1 at {first}" if (first := res.first_top1_site()) else "never top-1 at any site"), highlight=False)
    dd = res.dla
    console.print(f"DLA logit({tgt}) - logit({dis}) = {dd.actual:.3f}; sum of contributions "
                  f"{dd.total:.3f} (error {dd.error:.1e}); top: " + ", ".join(f"{n} {v:+.2f}" for n, v in dd.top(6)), highlight=False)
    if dd.note():
        console.print(f"[yellow]{escape(dd.note())}[/]", highlight=False, markup=True)
    console.print(f"report: {report}", highlight=False)
