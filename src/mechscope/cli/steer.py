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
    coef: Optional[float] = typer.Option(None, "--coef", help="ActAdd: coefficient of the steering vector (default 4)."),
    max_new_tokens: int = typer.Option(GenerationConfig.max_new_tokens, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(GenerationConfig.temperature, "--temperature", help="0 = greedy; both texts use the same seed."),
    top_k: Optional[int] = typer.Option(GenerationConfig.top_k, "--top-k"),
    seed: int = typer.Option(GenerationConfig.seed, "--seed"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Alias, local HF directory, .gguf file or hub id "
                                        "(default: with --sae, the model the SAE records; else embedded SmolLM2-135M-Instruct)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write steer.json to this folder."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Generate with an SAE feature added or clamped, or with an ActAdd vector, beside the
    unsteered text."""
    from mechscope.errors import MechscopeError
    from mechscope.sae.steer import check_feature_mode, check_steer_value, steer_actadd, steer_feature

    if coef is not None:
        check_steer_value("--coef", coef)  # before the model loads
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)  # checked when made
    check_out_folder(out, "steer", beside=("sae",))
    # each option belongs to one kind of steering: one of the other kind is refused, never ignored
    given_actadd = [k for k, v in (("--plus", plus), ("--minus", minus), ("--layer", layer), ("--coef", coef)) if v is not None]
    given_feature = [k for k, v in (("--sae", sae_dir), ("--feature", feature), ("--scale", scale), ("--clamp", clamp)) if v is not None]
    if given_actadd and given_feature:
        raise MechscopeError(f"Choose one kind of steering: {given_feature[0]} is for SAE feature steering (--sae, --feature, "
                             f"--scale or --clamp) and {given_actadd[0]} for ActAdd (--plus, --minus, --layer, --coef).")
    if given_actadd:
        if plus is None or minus is None or layer is None:
            raise MechscopeError("ActAdd needs --plus, --minus and --layer.")
        m = load(model, device)
        res = steer_actadd(m, prompt, plus, minus, layer, 4.0 if coef is None else coef, gen)
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
