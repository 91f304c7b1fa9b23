"""`mechscope icl`: few-shot accuracy of a task and the position-group attention knockout
(contextualize-then-aggregate, Bakalova et al. 2025)."""

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
    resumable_out,
)
from mechscope.icl.config import SWEEPS, FewShotConfig


def register(app: typer.Typer) -> None:
    app.command("icl")(icl)


@handles_errors
def icl(
    task: str = typer.Option(FewShotConfig.task, "--task", help="A built-in task (capital, language, continent, ... from the facts "
                             "list; antonyms; uppercase) or a JSONL file of {\"x\": ..., \"y\": ...} lines."),
    shots: int = typer.Option(FewShotConfig.shots, "--shots", help="Examples before the query."),
    n: int = typer.Option(FewShotConfig.n, "--n", help="Prompts drawn for the accuracy."),
    max_knockout: int = typer.Option(FewShotConfig.max_knockout, "--max-knockout", help="At most this many correct prompts are knocked out."),
    ambiguous: bool = typer.Option(False, "--ambiguous", help="Examples that fit two tasks but one (capital: capital vs largest city)."),
    window: Optional[int] = typer.Option(None, "--window", help="Layers blocked together (default: 9/48 of the depth)."),
    layer_stride: int = typer.Option(FewShotConfig.layer_stride, "--layer-stride", help="Window centres every k layers."),
    sweeps: str = typer.Option(",".join(SWEEPS), "--sweeps", help="Comma-separated: within, cross, aggregation."),
    min_above_chance: float = typer.Option(FewShotConfig.min_above_chance, "--min-above-chance",
                                           help="Accuracy must be at least chance + this, or the run stops."),
    accuracy_only: bool = typer.Option(False, "--accuracy-only", help="Measure the few-shot accuracy only (no knockout)."),
    force: bool = typer.Option(False, "--force", help="Run even when the task is not done well above chance or every answer "
                               "starts with the same token."),
    seed: int = typer.Option(FewShotConfig.seed, "--seed"),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here); a rerun resumes in it."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Few-shot accuracy and position-group attention knockout (within-example, cross-example, aggregation)."""
    from mechscope.icl.fewshot import check_task
    from mechscope.icl.run import fewshot_knockout
    from mechscope.report.icl import write_icl

    cfg = FewShotConfig(task=task, shots=shots, n=n, max_knockout=max_knockout, ambiguous=ambiguous, window=window,
                        layer_stride=layer_stride, sweeps=tuple(s.strip() for s in sweeps.split(",") if s.strip()),
                        min_above_chance=min_above_chance, force=force, seed=seed,
                        knockout=not accuracy_only)
    check_out_folder(out, "icl")
    check_task(cfg.task, cfg.shots, cfg.ambiguous)  # an unknown task or a malformed file fails before the model loads
    m = load(model, device)
    out_dir = resumable_out(out, "icl")
    res = fewshot_knockout(m, cfg, checkpoint=out_dir, progress=not json)
    res.save(out_dir)
    d = res.to_dict()
    report = write_icl(d, out_dir / "report.html")
    if json:
        return emit_json({**d, "report": str(report), "out": str(out_dir)})
    console.print(f"{d['task']['name']}: accuracy {d['accuracy']:.2f} ({d['n_correct']}/{d['n_prompts']}), chance {d['chance']:.3f}",
                  highlight=False)
    if not d["well_above_chance"]:
        console.print(f"the model does not do '{d['task']['name']}' well above chance (accuracy below chance + {cfg.min_above_chance}).",
                      highlight=False)
    for s, v in d["headline"].items():
        if isinstance(v, dict) and "peak_layer" in v:
            console.print(f"{s}: lower half {v['lower_half']:+.3f} (control {v['control_lower_half']:+.3f}), upper half "
                          f"{v['upper_half']:+.3f} (control {v['control_upper_half']:+.3f}), peak at layer {v['peak_layer']}",
                          highlight=False)
    console.print(f"report: {report}", highlight=False)
