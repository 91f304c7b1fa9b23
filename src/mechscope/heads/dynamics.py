"""Head scores, ICL score and loss for every checkpoint of a training run: when do induction
heads form? (Olsson et al. 2022: the induction score rises suddenly, at the same time as a
bump in the loss curve and a jump of the ICL score; Singh et al. 2024: the previous-token head
forms before the induction head.)

1. Find the checkpoints: sub-folders of ``run_dir`` that hold a ``config.json`` and weights,
   ordered by the step in their name (``ckpt_000123``) or by ``train.json``.
2. Evaluation data, fixed across checkpoints: ``n`` repeated random-token sequences
   (previous-token, duplicate-token and induction scores; repeated-half loss) and held-out
   sequences of the training distribution when ``train.json`` describes a toy run
   (``heads.toydata``; else windows of real text): loss and ICL score.
3. Per checkpoint: load it (``models.load_model``), compute the scores, and for 2+ layers the
   highest K-composition score between heads and the K-composition of the pair (final
   previous-token head -> final induction head).
4. Formation step of a score: the first checkpoint where the score has covered half of the
   way from its first value to its highest value (steps are log-spaced, so this is coarse),
   provided the highest value is at least ``MIN_RISE`` (0.05: 5% of an attention score's range,
   or 0.05 nats of the ICL score) above the first; a smaller rise is "not formed" (None).
   The phase change is the formation step of the induction score.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import MechscopeError, check_config
from mechscope.graph.names import head_node
from mechscope.heads.config import DynamicsConfig
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import read_result_json, write_result_json

SCHEMA_VERSION = 1
_STEP = re.compile(r"(\d+)$")


@dataclass
class DynamicsResult:
    run: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]]  # one per checkpoint, by step
    formation: dict[str, Any] = field(default_factory=dict)
    train_loss: list[list[float]] = field(default_factory=list)  # [step, loss] (subsampled)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        return [r["step"] for r in self.rows], [r[key] for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "run": self.run, "settings": self.settings,
                "formation": self.formation, "checkpoints": self.rows, "train_loss": self.train_loss}

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        write_result_json(out, "dynamics.json", self.to_dict())
        tensors = {}
        for i, r in enumerate(self.rows):
            for k in ("previous_token", "duplicate_token", "induction"):
                tensors[f"{k}.{i}"] = torch.tensor(r["heads"][k])
        save_file(tensors, str(out / "dynamics.safetensors"))
        return out / "dynamics.json"

    @classmethod
    def load(cls, path: str | Path) -> "DynamicsResult":
        d, _ = read_result_json(path, "dynamics.json", SCHEMA_VERSION, "mechscope dynamics")
        return cls(d["run"], d["settings"], d["checkpoints"], d.get("formation", {}), d.get("train_loss", []))


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint under ``run_dir``, by step."""
    root = Path(run_dir)
    if not root.is_dir():
        raise MechscopeError(f"No folder at '{run_dir}'; pass the --out folder of `mechscope train-toy`.")
    found: list[tuple[int, Path]] = []
    for d in sorted(root.iterdir()):  # a hidden folder is a checkpoint being written (``save_checkpoint_dir``)
        if d.is_dir() and not d.name.startswith(".") and (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            m = _STEP.search(d.name)
            found.append((int(m.group(1)) if m else len(found), d))
    if not found:
        raise MechscopeError(
            f"The folder '{run_dir}' holds no checkpoints (sub-folders with config.json and .safetensors weights); "
            "pass the --out folder of `mechscope train-toy`."
        )
    return sorted(found)


MIN_RISE = 0.05
"""The least rise (maximum - first value) that counts as formation: 5% of an attention score's
range [0, 1], or 0.05 nats of the ICL score; a smaller rise is reported as not formed."""


def formation_step(steps: list[int], values: list[float], min_rise: float = MIN_RISE) -> int | None:
    """The step where ``values``' largest rise (from a value to a later, higher one) covers
    half its way: the first checkpoint from the rise's start at or above half way; None (not
    formed) when that rise is less than ``min_rise``. The largest rise, not the rise from the
    first value: a score that first moves the other way (a toy run's ICL score rises from +0.01
    to +0.38 while the bigrams are learnt, then falls to +0.04 as the induction head forms)
    still forms where it turns."""
    if not values or not all(math.isfinite(v) for v in values):
        return None
    low, best = 0, (0, 0)  # running minimum; (start, end) of the largest rise so far
    for j, v in enumerate(values):
        if v < values[low]:
            low = j
        if v - values[low] > values[best[1]] - values[best[0]]:
            best = (low, j)
    lo, hi = values[best[0]], values[best[1]]
    if hi - lo < min_rise:
        return None
    half = lo + 0.5 * (hi - lo)
    low = best[0]
    return next(s for s, v in zip(steps[low:], values[low:]) if v >= half)


def _train_log(run_dir: Path) -> dict[str, Any]:
    """``run_dir/train.json`` (a train-toy run's log), or one sentence when it is damaged."""
    tj = run_dir / "train.json"
    try:
        log = json.loads(tj.read_text(encoding="utf-8"))
        ok = isinstance(log, dict) and isinstance(log.get("settings"), dict) and isinstance(log["settings"].get("data"), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise MechscopeError(f"{tj} is damaged (not the JSON log `mechscope train-toy` writes, with its settings); restore it, "
                             "or move it away to score the checkpoints on text instead of the run's own data.")
    return log


def _eval_data(run_dir: Path, model: Any, cfg: DynamicsConfig) -> tuple[torch.Tensor, int, str]:
    """Held-out sequences [n, pos], their prefix length and a description."""
    from mechscope.heads import sequences

    tj = run_dir / "train.json"
    if tj.is_file():
        from mechscope.heads.toydata import DataConfig, ToyData

        settings = _train_log(run_dir)["settings"]
        fields = DataConfig.__dataclass_fields__
        data = ToyData(DataConfig(**{k: v for k, v in settings["data"].items() if k in fields}))
        toks = data.batch(cfg.n_eval, torch.Generator().manual_seed(20_000 + cfg.seed))
        return toks, 1, f"held-out toy data ({settings['data']['kind']})"
    name, docs = sequences.text_source(cfg.text)
    p = len(sequences.prefix_ids(model.tokenizer))
    length = min(520, model.summary.n_ctx - p)
    hint = "a train-toy run's folder holds train.json, which makes dynamics score the run's own data"
    return sequences.text_windows(model, docs, cfg.n_eval, length, hint), p, f"text: {name}"


_OTHER_SETTINGS = {"binding": "mechscope.icl.binding_dynamics", "icml": "mechscope.icl.meta_dynamics"}


def _run_setting(run: Path) -> str | None:
    """The ``setting`` a train-toy run's ``train.json`` records (None for an induction run or
    a folder without one)."""
    try:
        s = json.loads((run / "train.json").read_text())["settings"].get("setting")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return s if isinstance(s, str) else None


def dynamics(run_dir: str | Path, cfg: DynamicsConfig | None = None,
             progress: ProgressArg = False) -> DynamicsResult:
    """Scores of every checkpoint under ``run_dir`` (see module docstring)."""
    from mechscope.heads import ablation, composition, icl, patterns, sequences
    from mechscope.heads.weights import head_weights
    from mechscope.models import load_model

    check_config(cfg, DynamicsConfig, "dynamics")
    cfg = cfg or DynamicsConfig()
    run = Path(run_dir)
    setting = _run_setting(run)
    if setting in _OTHER_SETTINGS:  # train.json's own field: no import of the icl package here
        raise MechscopeError(f"{run} is a train-toy --setting {setting} run; read it with {_OTHER_SETTINGS[setting]} "
                             "(or mechscope dynamics, which picks it), not heads.dynamics.")
    ckpts = find_checkpoints(run)
    rows: list[dict[str, Any]] = []
    kcomps: list[torch.Tensor] = []
    rep = evald = None
    prefix = 1
    source = ""
    bar = as_progress(progress).phase("checkpoints", total=len(ckpts), unit="ckpt")
    for i, (step, d) in enumerate(ckpts):
        model = load_model(str(d), device="cpu")
        if rep is None:
            rep = sequences.repeated_random(model, cfg.n, cfg.seq_len, cfg.seed)
            evald, prefix, source = _eval_data(run, model, cfg)
        assert evald is not None  # drawn with rep on the first checkpoint
        ps = patterns.pattern_scores(model, rep)
        ic = icl.icl_score(model, evald, prefix)
        loss = float(icl.per_token_loss(model, evald).mean())
        with torch.no_grad():
            rep_loss = float(ablation.repeated_half_loss(model.bridge(rep.to(model.device)), rep, cfg.seq_len))
        kc = float("nan")
        if model.summary.n_layers > 1:
            kcomp = composition.composition_scores(head_weights(model))["k"]  # [L, H, L, H]
            kcomps.append(kcomp)
            kc = float(kcomp.max())
        rows.append({
            "step": step, "dir": d.name, "loss": loss, "repeated_loss": rep_loss,
            "icl_score": ic["icl_score"], "early_loss": ic["early_loss"], "late_loss": ic["late_loss"],
            "max_previous_token": float(ps["previous_token"].max()),
            "max_duplicate_token": float(ps["duplicate_token"].max()),
            "max_induction": float(ps["induction"].max()),
            "max_k_composition": kc,
            "heads": {k: ps[k].tolist() for k in ("previous_token", "duplicate_token", "induction")},
        })
        bar.advance()
    bar.close()
    steps = [r["step"] for r in rows]
    form: dict[str, Any] = {
        "previous_token_step": formation_step(steps, [r["max_previous_token"] for r in rows]),
        "induction_step": formation_step(steps, [r["max_induction"] for r in rows]),
        "icl_step": formation_step(steps, [-r["icl_score"] for r in rows]),
    }
    pt, ind = form["previous_token_step"], form["induction_step"]
    # strictly before: formed at the same checkpoint is not "before" (the checkpoints cannot order them)
    form["previous_token_before_induction"] = None if pt is None or ind is None else pt < ind
    form["eval_data"] = source
    if rows:
        last = rows[-1]
        H = len(last["heads"]["induction"][0])
        top = {}
        for k in ("previous_token", "induction"):
            flat = torch.tensor(last["heads"][k]).flatten()
            j = int(flat.argmax())
            top[k] = (j // H, j % H)
            form[f"final_top_{k}_head"] = head_node(j // H, j % H)
        # K-composition of the final previous-token head into the final induction head, over time
        # (null where the pair cannot compose: the induction head is not in a later layer)
        (l1, h1), (l2, h2) = top["previous_token"], top["induction"]
        for r, kcomp in zip(rows, kcomps):
            r["k_composition_prev_to_induction"] = float(kcomp[l1, h1, l2, h2]) if l1 < l2 else None
    train_loss = []
    tj = run / "train.json"
    log = _train_log(run) if tj.is_file() else {}
    if tj.is_file():
        tl = log.get("train_loss", [])
        stride = max(1, len(tl) // 400)
        train_loss = tl[::stride]
    form.update(_run_notes(steps, log))
    return DynamicsResult(str(run), cfg.to_dict(), rows, form, train_loss)


def _run_notes(steps: list[int], log: dict[str, Any]) -> dict[str, Any]:
    """What the formation verdicts stand on: ``too_few_checkpoints`` (under 2: nothing can rise,
    so "not formed" would mean nothing), and for a ``train-toy`` run (``log``: its train.json)
    stopped before its last step, ``unfinished`` with ``steps_reached`` / ``steps_planned``;
    ``note`` says it in a sentence (empty when there is nothing to say)."""
    notes: list[str] = []
    out: dict[str, Any] = {"too_few_checkpoints": len(steps) < 2}
    if len(steps) < 2:
        notes.append(f"only {len(steps)} checkpoint{'s' * (len(steps) != 1)}: too few checkpoints to judge formation "
                     "(it needs at least 2).")
    planned = (log.get("settings") or {}).get("steps") if isinstance(log, dict) else None
    reached = max(steps, default=0)
    if isinstance(planned, int) and reached < planned:  # the last step is always checkpointed
        out.update(unfinished=True, steps_reached=reached, steps_planned=planned)
        if log.get("done") is True:  # it finished while its checkpoints were being read (dynamics beside a live run)
            notes.append(f"the run was still training when its checkpoints were listed: they reach step {reached} of "
                         f"{planned}, so the verdicts cover only that far; run dynamics again now that it has finished.")
        else:
            notes.append(f"the run is unfinished: checkpoints reach step {reached} of {planned} planned, so the verdicts cover "
                         "only that far; rerun train-toy with the same settings and --out to finish it.")
    else:
        out["unfinished"] = False
    out["note"] = " ".join(notes)
    return out
