"""`mechscope recall`: causal tracing, attention knockout, attribute extraction and subject
enrichment of a fact (or of the shipped facts list)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from mechscope.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    check_out_folder,
    console,
    emit_json,
    err_console,
    fresh_dir,
    given,
    handles_errors,
    load,
    resumable_out,
)
from mechscope.errors import MechscopeError
from mechscope.recall.config import DATASET_N, RecallConfig, check_dataset, dataset_config

if TYPE_CHECKING:
    from mechscope.recall.result import RecallDatasetResult, RecallResult


def register(app: typer.Typer) -> None:
    app.command("recall")(recall)


@handles_errors
def recall(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Argument(None, help="A prompt stating a fact up to its attribute (omit with --dataset)."),
    subject: Optional[str] = typer.Option(None, "--subject", help="The subject, exactly as written in the prompt."),
    target: Optional[str] = typer.Option(None, "--target", help="The attribute token (default: the model's top prediction)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="'facts': run over the shipped facts list and aggregate."),
    n: int = typer.Option(DATASET_N, "--n", help="Facts drawn (from those the model gets top-1) with --dataset."),
    samples: Optional[int] = typer.Option(None, "--samples", help=f"Noise draws per causal-tracing run (default {RecallConfig.samples}; "
                                          f"{dataset_config().samples} with --dataset)."),
    layer_stride: Optional[int] = typer.Option(None, "--layer-stride", help=f"Trace every k-th layer (default {RecallConfig.layer_stride}; "
                                               f"{dataset_config().layer_stride} with --dataset)."),
    seed: int = typer.Option(RecallConfig.seed, "--seed"),
    tuned: Optional[Path] = typer.Option(None, "--tuned", help="Tuned lens folder for subject enrichment (default: the one at "
                                         "$MECHSCOPE_CACHE/tuned-lens/<model> or ~/.cache/mechscope/tuned-lens/<model> if "
                                         "present, else the logit lens)."),
    logit_lens: bool = typer.Option(False, "--logit-lens", help="Read subject enrichment with the logit lens even when translators exist."),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here); with --dataset, a rerun "
                                       "with the same settings resumes in it after a kill."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Dissect the recall of a fact: causal tracing, attention knockout, attribute extraction, subject enrichment."""
    from mechscope.partial import clear as clear_partial
    from mechscope.recall import recall as run_recall
    from mechscope.recall import recall_dataset
    from mechscope.report.recall import write_recall

    if dataset is not None:
        check_dataset(dataset, n)
        if prompt is not None or subject is not None:
            raise MechscopeError("Pass either a PROMPT with --subject or --dataset facts, not both.")
    elif prompt is None or subject is None:
        raise MechscopeError("Pass a PROMPT and its --subject (or --dataset facts).")
    elif given(ctx, "n"):
        raise MechscopeError("--n counts the facts drawn with --dataset; one PROMPT is one fact, so drop --n.")
    kw = {"seed": seed}  # --samples and --layer-stride left out take the config's defaults
    if samples is not None:
        kw["samples"] = samples
    if layer_stride is not None:
        kw["layer_stride"] = layer_stride
    if tuned is not None and logit_lens:
        raise MechscopeError("Pass --tuned DIR or --logit-lens, not both.")
    cfg = dataset_config(**kw) if dataset is not None else RecallConfig(**kw)  # checks the settings
    check_out_folder(out, "recall")
    lens_t = None
    if tuned is not None:
        from mechscope.lens.tuned import TunedLens

        lens_t = TunedLens.load(tuned)  # a bad folder fails before the model loads
    m = load(model, device)
    lens_t = _enrichment_lens(m, lens_t, logit_lens, json)
    cfg.extra["enrichment_lens"] = "logit" if lens_t is None else f"tuned:{lens_t.info.get('path')}"
    res: RecallResult | RecallDatasetResult
    if dataset is not None:
        out_dir = resumable_out(out, "recall")
        res = recall_dataset(m, n=n, cfg=cfg, progress=not json, tuned=lens_t, checkpoint=out_dir)
        for note in res.checkpoint_notes:  # on stderr: stdout stays the JSON with --json
            err_console.print(f"note: {note}", highlight=False, markup=False)
    else:
        res = run_recall(m, prompt, subject, target, cfg, tuned=lens_t)
        if res.extras.get("attention_knockout_skipped"):
            err_console.print(f"note: {res.extras['attention_knockout_skipped']}", highlight=False, markup=False)
        out_dir = Path(out or fresh_dir("recall"))
    res.save(out_dir)
    d = res.to_dict()
    report = write_recall(d, out_dir / "report.html")
    if dataset is not None:
        clear_partial(out_dir, "recall")  # the result is saved: its finished facts are no longer needed
    if json:
        return emit_json({**d, "report": str(report), "out": str(out_dir)})
    _print_summary(d)
    console.print(f"report: {report}", highlight=False)


def _enrichment_lens(m, lens_t, logit_lens: bool, quiet: bool):
    """The tuned lens subject enrichment reads with: ``--tuned``'s (checked against the model),
    else translators at the default location (``lens.config.default_tuned_dir``), else None."""
    from mechscope.lens.config import default_tuned_dir
    from mechscope.lens.tuned import JSON_FILE, TunedLens

    if lens_t is None and not logit_lens:
        where = default_tuned_dir(m.summary.name)
        if (where / JSON_FILE).is_file():
            lens_t = TunedLens.load(where)
            if not quiet:
                err_console.print(f"subject enrichment reads the tuned lens at {where} (--logit-lens to use the logit lens)",
                                  highlight=False)
    if lens_t is not None:
        lens_t.check_fits(m)
        lens_t = lens_t.to(m.device)
    return lens_t


def _print_summary(d: dict) -> None:
    if d["kind"] == "recall-dataset":
        h = d["aggregate"]["headline"]
        console.print(f"{d['n_analysed']} facts (of {d['n_known_top1']} known top-1), {d['seconds']:.0f} s", highlight=False)
        tp = h.get("tracing_peak_recovered", {})
        for kind in tp:
            row = ", ".join(f"{c} {v['all_layers']['value']:.2f}@L{v['all_layers']['layer']}" for c, v in tp[kind].items() if c != "before_subject")
            console.print(f"tracing {kind}: peak recovered fraction: {row}", highlight=False)
        for subset, groups in h.get("knockout", {}).items():
            row = ", ".join(f"{g} {v['upper_half_mean']:+.2f}" for g, v in groups.items())
            console.print(f"knockout ({subset}): mean relative change, upper-half windows: {row}", highlight=False)
        return
    console.print(f"{d['prompt']!r} -> {d['target']!r}, subject {d['subject']!r} at positions {d['subject_positions']}", highlight=False)
    if 0 in d["subject_positions"] and d.get("attention_knockout"):
        err_console.print("note: the subject starts at the first token, where the model parks attention (the sink), so the "
                          "subject knockout also blocks the sink and there is no separate 'first' group; a prompt with a word "
                          "before the subject separates the two.", highlight=False)
    t = d.get("causal_tracing")
    if t:
        console.print(f"tracing: clean p {t['clean_prob']:.3f}, corrupted p {t['corrupt_prob']:.3f}", highlight=False)
        if t.get("note"):
            err_console.print(f"note: {t['note']}", highlight=False)
    e = d.get("attribute_extraction")
    if e:
        console.print(f"extraction: attention at layers {e['attn_layers']}, MLP at layers {e['mlp_layers']}", highlight=False)
