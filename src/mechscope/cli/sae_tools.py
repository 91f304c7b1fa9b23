"""SAE feature commands: ``mechscope sae dashboard`` and top-level ``mechscope steer``.

``register_dashboard(sae_app)`` adds ``dashboard`` to the ``mechscope sae`` sub-app;
``register(app)`` adds ``steer`` to the root app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from mechscope.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    console,
    emit_json,
    fresh_dir,
    handles_errors,
    load,
)


def register_dashboard(sae_app: typer.Typer) -> None:
    sae_app.command("dashboard")(dashboard)


def register(app: typer.Typer) -> None:
    app.command("steer")(steer)



def _load_pair(sae_dir: Path, model: Optional[str], device: Optional[str]):
    """The SAE and its model (``--model``, else the SAE's own model_name), checked to fit."""
    from mechscope.sae import check_sae_fits, load_sae

    sae = load_sae(sae_dir)
    m = load(model or sae.cfg.model_name or None, device)
    sae = sae.to(m.device)
    check_sae_fits(sae, m)
    return sae, m


@handles_errors
def dashboard(
    sae_dir: Path = typer.Argument(..., help="SAE folder (cfg.json + sae_weights.safetensors)."),
    features: str = typer.Option("0-99", "--features", "-f", help="Features: ranges and lists, e.g. 0-99 or 3,17,40-45."),
    tokens: int = typer.Option(32_768, "--tokens", help="Corpus tokens to read (one pass serves all features)."),
    ctx_len: int = typer.Option(64, "--ctx-len", help="Tokens per context."),
    n_top: int = typer.Option(10, "--top", help="Top activating contexts per feature."),
    batch_size: int = typer.Option(16, "--batch-size"),
    corpus: str = typer.Option("embedded", "--corpus", help="embedded, a .txt/.jsonl file, a folder of them, or hf:NAME[:SPLIT]."),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Feature dashboards: top contexts, quantile samples, histogram, output logits, density."""
    from mechscope.errors import MechscopeError
    from mechscope.report.dashboard import write_dashboard
    from mechscope.sae.dashboard import (
        DashboardConfig,
        feature_dashboards,
        parse_features,
    )

    if tokens < 1 or ctx_len < 2 or batch_size < 1 or n_top < 1:
        raise MechscopeError("--tokens, --top and --batch-size must be positive and --ctx-len at least 2.")
    sae, m = _load_pair(sae_dir, model, device)
    feats = parse_features(features, sae.cfg.d_sae)
    cfg = DashboardConfig(features=feats, n_tokens=tokens, ctx_len=ctx_len, batch_size=batch_size, n_top=n_top, seed=seed, corpus=corpus)
    res = feature_dashboards(m, sae, cfg, progress=not json)
    out_dir = Path(out or fresh_dir("dashboard"))
    data_path = res.save(out_dir)
    page = write_dashboard(res.to_dict(), out_dir / "dashboard.html")
    summary = {
        "model": m.summary.name, "sae": str(sae_dir), "hook": sae.cfg.hook_name, "features": len(feats),
        "tokens": res.n_tokens, "seconds": res.seconds,
        "dead": sum(1 for f in res.features if f.n_firing == 0),
        "dashboard_json": str(data_path), "report": str(page),
    }
    if json:
        return emit_json(summary)
    console.print(f"{len(feats)} features of {sae.cfg.hook_name} on {res.n_tokens:,} tokens in {res.seconds:.1f} s "
                  f"({summary['dead']} never fired)")
    console.print(f"report: {page}\ndata:   {data_path}")


@handles_errors
def steer(
    prompt: str = typer.Argument(..., help="Text to continue."),
    sae_dir: Optional[Path] = typer.Option(None, "--sae", help="SAE folder, for feature steering."),
    feature: Optional[int] = typer.Option(None, "--feature", help="SAE feature to steer."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Add scale x the feature's unit decoder direction."),
    clamp: Optional[float] = typer.Option(None, "--clamp", help="Clamp the feature's activation to this value (keeps the SAE error)."),
    plus: Optional[str] = typer.Option(None, "--plus", help="ActAdd: the prompt to steer towards."),
    minus: Optional[str] = typer.Option(None, "--minus", help="ActAdd: the prompt to steer away from."),
    layer: Optional[int] = typer.Option(None, "--layer", help="ActAdd: add at blocks.LAYER.hook_resid_pre."),
    coef: float = typer.Option(4.0, "--coef", help="ActAdd: coefficient of the steering vector."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; both texts use the same seed."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write steer.json to this folder."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Generate with an SAE feature added or clamped, or with an ActAdd vector, beside the
    unsteered text."""
    from mechscope.errors import MechscopeError
    from mechscope.sae.steer import GenerationConfig, steer_actadd, steer_feature

    if max_new_tokens < 1 or temperature < 0:
        raise MechscopeError("--max-new-tokens must be positive and --temperature at least 0.")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    actadd = plus is not None or minus is not None
    if actadd and sae_dir is not None:
        raise MechscopeError("Choose one kind of steering: --sae with --feature, or ActAdd with --plus/--minus/--layer.")
    if actadd:
        if plus is None or minus is None or layer is None:
            raise MechscopeError("ActAdd needs --plus, --minus and --layer.")
        m = load(model, device)
        res = steer_actadd(m, prompt, plus, minus, layer, coef, gen)
    else:
        if sae_dir is None or feature is None:
            raise MechscopeError("Give --sae DIR --feature F with --scale S or --clamp V (or ActAdd: --plus, --minus, --layer).")
        if (scale is None) == (clamp is None):
            raise MechscopeError("Give exactly one of --scale (add the feature's direction) or --clamp (set the feature's activation).")
        sae, m = _load_pair(sae_dir, model, device)
        res = steer_feature(m, sae, prompt, feature, scale=scale, clamp=clamp, gen=gen)
    if out is not None:
        res.save(out)
    if json:
        return emit_json(res.to_dict())
    what = {"add": f"feature {res.settings.get('feature')} x {res.settings.get('scale')}",
            "clamp": f"feature {res.settings.get('feature')} clamped to {res.settings.get('value')}",
            "actadd": f"ActAdd {res.settings.get('plus')!r} - {res.settings.get('minus')!r} x {res.settings.get('coef')} at layer {res.settings.get('layer')}"}[res.mode]
    title = f"{m.summary.name}: {what} at {res.settings['hook']} (median activation norm there {res.resid_norm:.1f})"
    t = Table(title=Text(title), show_lines=True)
    t.add_column("unsteered", ratio=1)
    t.add_column("steered", ratio=1)
    t.add_row(Text(prompt + res.unsteered), Text(prompt + res.steered))  # Text: no markup parsing of model output
    console.print(t, highlight=False)
