"""`mechscope probe`: linear probes with control tasks on any hook, layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mechscope.cli.common import (
    CorpusOpt,
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
from mechscope.probes.config import BUILTIN_LABELS, ProbeConfig

_D = ProbeConfig()


def register(app: typer.Typer) -> None:
    app.command("probe")(probe)


@handles_errors
def probe(
    labels: str = typer.Option(..., "--labels", help=f"A JSONL label file, or a built-in set: {', '.join(BUILTIN_LABELS)}."),
    hook: str = typer.Option(_D.hook, "--hook", help="A site (resid_post, mlp_out, ...) probed at every layer, a template "
                             "with {L}, or one full hook name."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to probe, e.g. 0,5,10-12 (default: all)."),
    control: bool = typer.Option(_D.control, "--control/--no-control", help="Fit the control task and report selectivity."),
    max_items: int = typer.Option(_D.max_items, "--max-items", help="Labelled tokens kept."),
    balance: bool = typer.Option(_D.balance, "--balance/--no-balance", help="Equal items per class."),
    corpus: Optional[str] = CorpusOpt,
    seed: int = typer.Option(_D.seed, "--seed"),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here); a rerun with the "
                                       "same settings resumes in it after a kill."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Linear probes per layer with Hewitt and Liang's control task: accuracy, control accuracy, selectivity."""
    from mechscope.errors import MechscopeError
    from mechscope.partial import clear as clear_partial
    from mechscope.probes import builtin_labels, labels_from_file, run_probe
    from mechscope.report.probe import write_probe

    cfg = ProbeConfig(hook=hook, layers=parse_layers(layers), control=control, max_items=max_items, balance=balance, seed=seed)
    check_out_folder(out, "probe")
    if labels not in BUILTIN_LABELS and not Path(labels).is_file():
        raise MechscopeError(f"--labels '{labels}' is neither a file nor a built-in set ({', '.join(BUILTIN_LABELS)}).")
    if corpus is not None and (labels not in BUILTIN_LABELS or labels == "language"):
        where = "the label file's own sequences" if labels not in BUILTIN_LABELS else "the shipped multilingual prompts"
        raise MechscopeError(f"--corpus is read only by --labels capitalised and ioi-names; --labels {labels} probes "
                             f"{where}, so leave --corpus out.")
    m = load(model, device)
    data = builtin_labels(m, labels, cfg, corpus) if labels in BUILTIN_LABELS else labels_from_file(m.tokenizer, labels)
    out_dir = resumable_out(out, "probe")
    res = run_probe(m, data, cfg, progress=not json, checkpoint=out_dir)
    res.save(out_dir)
    d = res.to_dict()
    report = write_probe(d, out_dir / "report.html")
    clear_partial(out_dir, "probe")  # the result is saved: its per-hook pieces are no longer needed
    if json:
        return emit_json({**d, "report": str(report), "out": str(out_dir)})
    console.print(res.table(), highlight=False)
    console.print(f"majority baseline {res.majority:.3f}; {res.n_train} train / {res.n_test} held-out tokens; report: {report}",
                  highlight=False)
