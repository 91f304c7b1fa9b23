"""`mechscope vision`: train a small CNN/ViT on digits or shapes, find and test a concept's
circuit, the composition (overlay) test and the typographic-attack analogue."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from mechscope.cli.common import (
    JsonOpt,
    check_out_folder,
    console,
    emit_json,
    fresh_dir,
    handles_errors,
    holds_finished,
)
from mechscope.errors import MechscopeError
from mechscope.vision.config import CircuitConfig, DataConfig, TrainConfig, parse_pair

vision_app = typer.Typer(help="Visual circuits (Rajaram et al. 2024) in small vision models trained here, offline.",
                         no_args_is_help=True)

ModelDirOpt = typer.Option(..., "--model", "-m", help="A folder written by `mechscope vision train`.")
KOpt = typer.Option(CircuitConfig.k, "--k", help="Units kept per layer.")
AblationOpt = typer.Option(CircuitConfig.ablation, "--ablation", help="mean (over held-out reference images) or zero.")
DrawsOpt = typer.Option(CircuitConfig.random_draws, "--random-draws", help="Random circuits the tests compare with.")
SeedOpt = typer.Option(CircuitConfig.seed, "--seed")
BaselineOpt = typer.Option(CircuitConfig.baseline, "--baseline",
                           help="zero: activation x gradient (the paper's); mean: (activation - reference mean) x gradient.")
ContrastOpt = typer.Option(CircuitConfig.contrast, "--contrast",
                           help="Score units by attribution on the concept minus that on clean reference images.")


def register(app: typer.Typer) -> None:
    app.add_typer(vision_app, name="vision")


def _one_torch_thread(fn: Callable) -> Callable:
    """Run the command with torch on one thread and restore the caller's count afterwards (a
    notebook or a test runs several commands in one process). Tiny models gain nothing from
    threads and lose much on a shared CPU: 3 CNN epochs took 7 s on one thread vs 43 s on the
    default threads, and 2 ViT epochs 47 s on two (load ~8)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def _start(out: Optional[Path], kind: str) -> None:
    """Refuse an ``--out`` that cannot hold a ``kind`` result."""
    check_out_folder(out, kind)


def _save_circuit(circ: Any, out: Optional[Path], default: str) -> tuple[Path, Path]:
    """Save ``circ`` in ``out`` (default: a fresh ``default`` folder) with its report.html: (folder, page)."""
    from mechscope.report.vision import write_vision

    out_dir = Path(out or fresh_dir(default))
    circ.save(out_dir)
    return out_dir, write_vision(circ.to_dict(), out_dir / "report.html")


@vision_app.command("train")
@handles_errors
@_one_torch_thread
def train(
    arch: str = typer.Option(TrainConfig.arch, "--arch", help="cnn or vit."),
    data: str = typer.Option(DataConfig.dataset, "--data", help="digits (scikit-learn's 8x8 digits) or shapes (procedural)."),
    overlay: Optional[str] = typer.Option(None, "--overlay", help="Add a class that overlays two classes, e.g. 3,7 (digits) or 1,2 (shapes: 0-4)."),
    mark_class: Optional[int] = typer.Option(None, "--mark-class", help="Train with a small mark that names this class."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs"),
    width: int = typer.Option(TrainConfig.width, "--width"),
    heads: int = typer.Option(TrainConfig.heads, "--heads", help="ViT attention heads."),
    seed: int = typer.Option(TrainConfig.seed, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    json: bool = JsonOpt,
) -> None:
    """Train a small CNN or ViT (seconds to a minute on a CPU); saves model.safetensors + config.json."""
    if arch == "cnn" and heads != TrainConfig.heads:
        raise MechscopeError("--heads sets a ViT's attention heads; the CNN has none, so drop --heads (or use --arch vit).")
    cfg = TrainConfig(arch=arch, epochs=epochs, width=width, heads=heads, seed=seed,
                      data=DataConfig(dataset=data, overlay=parse_pair(overlay, data), mark_class=mark_class, seed=seed))
    check_out_folder(out, "vision-model", replaces=False)
    if holds_finished(out, "vision-model"):  # circuits and reports made from it would no longer match it
        raise MechscopeError(f"--out {out} already holds a trained vision model; choose a new --out (or delete that "
                             "folder to train again).")
    from mechscope.vision.train import train_model

    out_dir = Path(out or fresh_dir("vision"))
    vm = train_model(cfg, out=out_dir, progress=not json)
    if json:
        return emit_json({"out": str(out_dir), **vm.info()})
    console.print(f"{cfg.arch} on {cfg.data.dataset}: " + ", ".join(f"{k} {v:.4g}" for k, v in vm.metrics.items()), highlight=False)
    console.print(f"model: {out_dir}", highlight=False)


def _load(model: Path, k: int):
    from mechscope.vision.circuit import check_k
    from mechscope.vision.models import load_vision_model

    vm = load_vision_model(model)
    check_k(vm, k)
    return vm


@vision_app.command("circuit")
@handles_errors
@_one_torch_thread
def circuit(
    model: Path = ModelDirOpt,
    concept: str = typer.Option(..., "--concept", help="A class (3, hbar, 3+7), 'mark', or a folder of .npy images."),
    target: Optional[str] = typer.Option(None, "--target", help="The class whose logit the circuit explains (default: the concept's class)."),
    k: int = KOpt,
    ablation: str = AblationOpt,
    random_draws: int = DrawsOpt,
    contrast: bool = ContrastOpt,
    baseline: str = BaselineOpt,
    seed: int = SeedOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    json: bool = JsonOpt,
) -> None:
    """The concept's k-per-layer attribution circuit, its edges, and the prune / keep tests; writes circuit.json and report.html."""
    cfg = CircuitConfig(k=k, ablation=ablation, random_draws=random_draws, contrast=contrast, baseline=baseline, seed=seed)
    _start(out, "vision-circuit")
    from mechscope.vision.run import run_circuit

    vm = _load(model, k)
    circ = run_circuit(vm, concept, cfg, target, progress=not json)
    out_dir, report = _save_circuit(circ, out, "vision-circuit")
    t = circ.tests
    if json:
        return emit_json({"out": str(out_dir), "report": str(report), "concept": circ.concept, "units": circ.units, "tests": t})
    r = t["accuracy_drop"]["ratio"]
    console.print(f"circuit of {circ.concept['name']!r} -> logit {circ.concept['target_name']!r}: "
                  + "; ".join(f"{s} {us}" for s, us in circ.units.items()), highlight=False)
    console.print(f"accuracy drop: circuit {t['accuracy_drop']['circuit']:.3f}, random {t['accuracy_drop']['random']:.3f} "
                  f"(ratio {'n/a' if r is None else f'{r:.2f}'}); class logit kept by the circuit alone "
                  f"{t['logit_share']['circuit']:.3f} (random {t['logit_share']['random']:.3f})", highlight=False)
    console.print(f"report: {report}", highlight=False)


@vision_app.command("compose")
@handles_errors
@_one_torch_thread
def compose(
    model: Path = ModelDirOpt,
    k: int = KOpt,
    contrast: bool = ContrastOpt,
    baseline: str = BaselineOpt,
    seed: int = SeedOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder for compose.json (default: a fresh one here)."),
    json: bool = JsonOpt,
) -> None:
    """Circuits of every class; Jaccard of the overlay class's circuit with its parts' union and with every other class."""
    cfg = CircuitConfig(k=k, contrast=contrast, baseline=baseline, seed=seed)
    _start(out, "compose")
    from mechscope.results import write_result_json
    from mechscope.vision.run import run_composition

    res = run_composition(_load(model, k), cfg, progress=not json)
    saved = write_result_json(Path(out or fresh_dir("vision-compose")), "compose.json", res)
    if json:
        return emit_json({"out": str(saved.parent), **res})
    console.print(f"Jaccard({res['overlay']}, union of parts) = {res['jaccard_union_of_parts']:.3f}; best other class "
                  f"{max(res['jaccard_other_classes'].values()):.3f}; best other pair {res['jaccard_other_pairs_max']['value']:.3f} "
                  f"({res['jaccard_other_pairs_max']['pair']})", highlight=False)
    console.print(f"saved: {saved}", highlight=False)


@vision_app.command("attack")
@handles_errors
@_one_torch_thread
def attack(
    model: Path = ModelDirOpt,
    k: int = KOpt,
    ablation: str = AblationOpt,
    random_draws: int = DrawsOpt,
    contrast: bool = ContrastOpt,
    baseline: str = BaselineOpt,
    seed: int = SeedOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    json: bool = JsonOpt,
) -> None:
    """Typographic analogue: find the mark's circuit from mark-only images, ablate it, and measure the attack and clean accuracy."""
    cfg = CircuitConfig(k=k, ablation=ablation, random_draws=random_draws, contrast=contrast, baseline=baseline, seed=seed)
    _start(out, "vision-circuit")
    from mechscope.vision.run import run_attack

    circ, res = run_attack(_load(model, k), cfg, progress=not json)
    out_dir, report = _save_circuit(circ, out, "vision-attack")
    if json:
        return emit_json({"out": str(out_dir), "report": str(report), "units": circ.units, **res})
    b, a = res["before"], res["after"]
    console.print(f"attack success {b['attack_success']:.3f} -> {a['attack_success']:.3f}; clean accuracy "
                  f"{b['clean_accuracy']:.3f} -> {a['clean_accuracy']:.3f} ({res['clean_accuracy_drop_points']:.1f} points)", highlight=False)
    console.print(f"report: {report}", highlight=False)


@vision_app.command("eap")
@handles_errors
@_one_torch_thread
def eap(
    model: Path = ModelDirOpt,
    clean: str = typer.Option(..., "--clean", help="The clean images' class (index or name)."),
    corrupt: str = typer.Option(..., "--corrupt", help="The corrupt images' class: each clean image is paired with one of it."),
    n: int = typer.Option(64, "--n", help="Image pairs for scoring (training split) and for the test (held-out split)."),
    method: str = typer.Option("eap-ig", "--method", help="eap or eap-ig."),
    steps: Optional[int] = typer.Option(None, "--steps", help="EAP-IG interpolation steps (default 5; not with --method eap)."),
    target: float = typer.Option(0.8, "--target", help="Faithfulness the chosen circuit reaches on the scoring pairs."),
    seed: int = SeedOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    json: bool = JsonOpt,
) -> None:
    """EAP / EAP-IG over a ViT's heads and MLPs with clean/corrupt image pairs: the language tools' graph, ranking and
    faithfulness curve on images; writes eap.json and report.html."""
    _start(out, "eap")
    from mechscope.report.vision_eap import write_vision_eap
    from mechscope.vision.eap import vision_eap
    from mechscope.vision.models import load_vision_model

    res = vision_eap(load_vision_model(model), clean, corrupt, n=n, method=method, steps=steps,
                     target=target, seed=seed, progress=not json)
    d = res.to_dict()  # with a "note" where a split holds fewer pairs than --n (every image is then used)
    out_dir = Path(out or fresh_dir("vision-eap"))
    res.save(out_dir)
    report = write_vision_eap(d, out_dir / "report.html")
    if json:
        return emit_json({"out": str(out_dir), "report": str(report), **d})
    ch, held = d["chosen"], d["chosen"]["held_out"]
    at = {round(c["fraction"], 3): c for c in d["curve"]}
    five = at.get(0.05)
    extra = f"; at 5% of edges {five['faithfulness']:.2f} (random {five['random']:.2f})" if five else ""
    console.print(f"{d['clean_class']} vs {d['corrupt_class']}: held-out faithfulness {held['faithfulness']:.2f} "
                  f"(95% interval {held['ci_low']:.2f} to {held['ci_high']:.2f}, {d['n_pairs']['held_out']} pairs) with "
                  f"{ch['n_edges']:,} of {d['n_edges']:,} edges ({100 * ch['fraction']:.1f}%; "
                  f"{ch['faithfulness_fit']:.2f} on the scoring pairs it was chosen on){extra}", highlight=False)
    if "note" in d:
        console.print(f"note: {d['note']}", highlight=False)
    console.print(f"report: {report}", highlight=False)
