"""Per checkpoint of a meta-learning run (``train-toy --setting icml``): held-out accuracy,
accuracy with random context labels, and the three attention metrics (``icl.meta_metrics``),
then the phases of Minegishi et al. 2025:

- plateaus of the accuracy curve (``meta_metrics.plateaus``), and among them the one nearest
  1/T (the non-context circuit knows the base label but not the task) and the middle ones
  (above chance, below the final accuracy; with T = 1 there should be none);
- the step where each metric peaks, from the learning onset (the first checkpoint half way from
  chance to 1/T) on, and whether they come in the order self -> label -> chunk; with no onset,
  or fewer than ``MIN_AFTER_ONSET`` checkpoints from it on, no peaks and a one-sentence ``note``;
- ``unfinished``: a sentence when the run ends less than half way from 1/T to 1 (the
  full-context circuit has not formed; when it forms depends on the seed), else None;
- the phase-2 checkpoint: where the query's attention to the labels peaks (the semi-context
  circuit); its accuracy and random-label accuracy (the paper: equal, since that circuit does
  not use the example-label pairs).

The evaluation sequences are fixed across checkpoints (seed ``20_000 + seed``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import MechscopeError
from mechscope.icl.meta_config import SETTING, MetaConfig, MetaDynamicsConfig
from mechscope.icl.meta_data import MetaData
from mechscope.icl.meta_metrics import METRICS, attention_metrics, peak_step, plateaus
from mechscope.icl.meta_train import load_checkpoint
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import read_result_json, write_result_json

SCHEMA_VERSION = 1
MIN_AFTER_ONSET = 3
"""Checkpoints needed from the learning onset on to look for the metric peaks (fewer: no peaks, and a note)."""


@dataclass
class MetaDynamicsResult:
    run: str
    settings: dict[str, Any]  # the run's MetaConfig
    config: dict[str, Any]  # the MetaDynamicsConfig
    rows: list[dict[str, Any]]  # one per checkpoint, by step
    phases: dict[str, Any]
    patterns: dict[str, Any]  # {"self_peak" | "label_peak" | "final": {"step", "pattern": [layers][q][k]}}
    train_loss: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "setting": SETTING, "run": self.run, "settings": self.settings,
                "config": self.config, "phases": self.phases, "checkpoints": self.rows, "patterns": self.patterns,
                "train_loss": self.train_loss}

    def save(self, out_dir: str | Path) -> Path:
        return write_result_json(out_dir, "dynamics.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "MetaDynamicsResult":
        d, _ = read_result_json(path, "dynamics.json", SCHEMA_VERSION, "mechscope dynamics")
        if d.get("setting") != SETTING:
            raise MechscopeError(f"{path} is not the dynamics of a `train-toy --setting {SETTING}` run.")
        return cls(d["run"], d["settings"], d["config"], d["checkpoints"], d["phases"], d.get("patterns", {}),
                   d.get("train_loss", []))


def run_settings(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``settings`` saved in ``run_dir/train.json``, or None when there is no readable one."""
    tj = Path(run_dir) / "train.json"
    try:
        return json.loads(tj.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def is_meta_run(run_dir: str | Path) -> bool:
    s = run_settings(run_dir)
    return isinstance(s, dict) and s.get("setting") == SETTING


def meta_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every saved checkpoint of a meta-learning run, by step."""
    run = Path(run_dir)
    try:
        log = json.loads((run / "train.json").read_text())
        found = sorted((int(c["step"]), run / c["dir"]) for c in log["checkpoints"])
    except (OSError, ValueError, KeyError, TypeError):
        raise MechscopeError(f"'{run}/train.json' is missing or damaged; pass the --out folder of `mechscope train-toy --setting icml`.") from None
    found = [(s, d) for s, d in found if (d / "model.safetensors").is_file()]
    if not found:
        raise MechscopeError(f"The run '{run}' holds no checkpoints yet; train it first (`mechscope train-toy --setting icml --out {run}`).")
    return found


def _mean_pattern(patterns: torch.Tensor) -> list:
    return patterns.float().mean(dim=(1, 2)).tolist()  # [layers, q, k]


def meta_dynamics(run_dir: str | Path, cfg: MetaDynamicsConfig | None = None,
                  progress: ProgressArg = False) -> MetaDynamicsResult:
    cfg = cfg or MetaDynamicsConfig()
    run = Path(run_dir)
    if not is_meta_run(run):
        raise MechscopeError(f"'{run}' is not a run of `mechscope train-toy --setting {SETTING}` (its train.json says otherwise).")
    settings = run_settings(run)
    try:
        if settings is None:
            raise ValueError("no settings")
        mc = MetaConfig.from_dict(settings)
    except (TypeError, ValueError, AttributeError):
        raise MechscopeError(f"The settings in '{run}/train.json' are damaged; train the run again with `mechscope train-toy --setting {SETTING}`.") from None
    ckpts = meta_checkpoints(run)
    data = MetaData(mc.data)
    gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    batch = data.batch(cfg.n_eval, gen)
    random_batch = data.batch(cfg.n_eval, gen, random_labels=True)
    rows: list[dict[str, Any]] = []
    mean_patterns: list[list] = []
    bar = as_progress(progress).phase("checkpoints", total=len(ckpts), unit="ckpt")
    for i, (step, d) in enumerate(ckpts):
        model = load_checkpoint(d)
        with torch.no_grad():
            logits, pats = model(batch.x, batch.labels, return_attention=True)
            rnd = model(random_batch.x, random_batch.labels)
        m = attention_metrics(pats, mc.data.n_context)
        rows.append({
            "step": step, "dir": d.name,
            "accuracy": float((logits.argmax(-1) == batch.target).float().mean()),
            "random_label_accuracy": float((rnd.argmax(-1) == random_batch.target).float().mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits, batch.target)),
            **{k: m[k] for k in METRICS}, "per_layer": m["per_layer"],
        })
        mean_patterns.append(_mean_pattern(pats))
        bar.advance()
    bar.close()
    phases = summarize(rows, mc.data.tasks, mc.data.n_labels, cfg)
    by_step = {r["step"]: j for j, r in enumerate(rows)}
    pats_out = {}
    for name, step in (("self_peak", phases["peaks"]["self"]), ("label_peak", phases["peaks"]["label"]),
                       ("final", rows[-1]["step"])):
        if step is not None:
            pats_out[name] = {"step": step, "pattern": mean_patterns[by_step[step]]}
    train_loss = []
    try:
        tl = json.loads((run / "train.json").read_text()).get("train_loss", [])
        train_loss = tl[:: max(1, len(tl) // 400)]
    except (OSError, ValueError):
        pass
    return MetaDynamicsResult(str(run), settings, cfg.to_dict(), rows, phases, pats_out, train_loss)


def summarize(rows: list[dict[str, Any]], tasks: int, n_labels: int, cfg: MetaDynamicsConfig) -> dict[str, Any]:
    """Plateaus, metric peaks and the phase-2 checkpoint of per-checkpoint ``rows`` (see the module)."""
    steps = [r["step"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    plats = plateaus(steps, acc, cfg.band, cfg.min_span)
    chance, target = 1 / n_labels, 1 / tasks
    final = acc[-1]
    middle = [p for p in plats if chance + cfg.band < p["mean"] < final - cfg.band]
    nearest = min(plats, key=lambda p: abs(p["mean"] - target)) if plats else None
    # peaks are looked for from the learning onset, the first checkpoint half way from chance to
    # 1/T (the non-context circuit half formed): before it the patterns drift away from those of
    # the random initialisation (the query's attention to 8 of its 17 keys starts near 0.5)
    half = (chance + target) / 2
    onset = next((r["step"] for r in rows if r["step"] > 0 and r["accuracy"] >= half), None)
    live = [r for r in rows if onset is not None and r["step"] >= onset]
    note = None
    if onset is None:
        note = (f"The accuracy never reached {half:.3f}, half way from chance ({chance:.3f}) to 1/T ({target:.3f}), so the run "
                "has no learning onset and no metric peaks or phase 2; train longer (more --steps).")
    elif len(live) < MIN_AFTER_ONSET:
        note = (f"Only {len(live)} checkpoint(s) from the learning onset (step {onset}) on, too few to find the metric peaks "
                f"(at least {MIN_AFTER_ONSET} are needed); train with more --checkpoints or more --steps.")
        live = []
    ls = [r["step"] for r in live]
    peaks = {k: peak_step(ls, [r[k] for r in live]) for k in METRICS}
    ps, pl, pc = peaks["self"], peaks["label"], peaks["chunk"]
    in_order = None if ps is None or pl is None or pc is None else ps < pl < pc
    n_layers = len(live[0]["per_layer"]["self"]) if live and "per_layer" in live[0] else 0
    peaks_per_layer = {k: [peak_step(ls, [r["per_layer"][k][layer] for r in live]) for layer in range(n_layers)]
                       for k in METRICS}
    phase2 = None
    if peaks["label"] is not None:
        r = next(r for r in rows if r["step"] == peaks["label"])
        phase2 = {"step": r["step"], "accuracy": r["accuracy"], "random_label_accuracy": r["random_label_accuracy"],
                  "gap": abs(r["accuracy"] - r["random_label_accuracy"])}
    unfinished = None
    if onset is not None and tasks > 1 and final < (target + 1) / 2:  # with T = 1, 1/T is already the end
        unfinished = (f"The run ends at accuracy {final:.3f}, less than half way from 1/T ({target:.3f}) to 1: the full-context "
                      f"circuit has not formed, so the run shows no jump to it (a chunk peak marks no phase); train "
                      f"longer (more --steps) or with another --seed (when the jump comes depends on the seed).")
    return {
        "tasks": tasks, "one_over_tasks": target, "chance": chance, "final_accuracy": final, "unfinished": unfinished,
        "plateaus": plats, "middle_plateaus": middle,
        "plateau_nearest_one_over_tasks": nearest,
        "distance_to_one_over_tasks": None if nearest is None else abs(nearest["mean"] - target),
        "learning_onset": onset, "peaks": peaks, "peaks_in_order": in_order, "peaks_per_layer": peaks_per_layer,
        "phase2": phase2, "note": note,
    }
