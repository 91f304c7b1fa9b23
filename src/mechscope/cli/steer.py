"""`mechscope steer`: generate with an SAE feature added or clamped, or with an ActAdd vector."""

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
    check_out_folder,
    console,
    emit_json,
    handles_errors,
    load,
    load_sae_and_model,
)
from mechscope.sae.config import GenerationConfig


def register(app: typer.Typer) -> None:
    app.command("steer")(steer)


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
    max_new_tokens: int = typer.Option(GenerationConfig.max_new_tokens, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(GenerationConfig.temperature, "--temperature", help="0 = greedy; both texts use the same seed."),
    top_k: Optional[int] = typer.Option(GenerationConfig.top_k, "--top-k"),
    seed: int = typer.Option(GenerationConfig.seed, "--seed"),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write steer.json to this folder."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Generate with an SAE feature added or clamped, or with an ActAdd vector, beside the
    unsteered text."""
    from mechscope.errors import MechscopeError
    from mechscope.sae.steer import check_feature_mode, check_steer_value, steer_actadd, steer_feature

    check_steer_value("--coef", coef)  # before the model loads
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)  # checked when made
    check_out_folder(out, "steer", beside=("sae",))
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
        check_feature_mode(scale, clamp)  # before loading the SAE and its model
        sae, m = load_sae_and_model(sae_dir, model, device)
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
