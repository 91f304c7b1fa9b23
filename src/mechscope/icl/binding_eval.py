"""Evaluation of variable-binding checkpoints.

- ``evaluate``: accuracy by hop depth on held-out programs (the top token at the last position
  over the whole vocabulary), and agreement with the early-line heuristic (answer the constant
  on the first line): the share of all programs, and of the programs where that constant is
  not the answer ("discordant"), on which the model outputs the heuristic's answer.
- ``binding_dynamics``: ``evaluate`` on every checkpoint of a run (``mechscope dynamics``),
  with the phases read off the curves.
- ``binding_interchange``: interchange interventions (``patching.interchange``) on pairs of
  programs with one fixed layout whose counterfactual changes the query chain's constant;
  each position gets a role (which line, which token, whether on the query chain), so the
  accuracy grid shows where the constant travels, layer by layer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import MechscopeError, check_config
from mechscope.icl import binding_data as bd
from mechscope.icl.binding_config import SETTING, BindingDataConfig, BindingEvalConfig, BindingInterchangeConfig
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import read_result_json, write_result_json

SCHEMA_VERSION = 1
SYSTEMATIC = 0.95
"""accuracy at every depth that marks the systematic phase"""


def data_config(path: str | Path) -> BindingDataConfig:
    """The data settings of a binding checkpoint (its ``binding.json``) or run (``train.json``)."""
    p = Path(path)
    for f in (p / "binding.json", p / "train.json"):
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
            if f.name == "train.json":
                d = d["settings"]
            if d.get("setting") != SETTING:
                continue
            return BindingDataConfig(**d["data"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MechscopeError(f"{f} does not describe a binding run; pass a folder written by "
                                 "`mechscope train-toy --setting binding`.") from None
    raise MechscopeError(f"'{path}' is not a binding checkpoint or run (no binding.json or binding train.json); pass a "
                         "folder written by `mechscope train-toy --setting binding`.")


def is_binding_run(run_dir: str | Path) -> bool:
    tj = Path(run_dir) / "train.json"
    try:
        return json.loads(tj.read_text())["settings"].get("setting") == SETTING
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _predict(model, tokens: torch.Tensor, batch: int = 512) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, len(tokens), batch):
            out.append(model(tokens[s : s + batch])[:, -1].argmax(-1).cpu())
    return torch.cat(out)


def eval_programs(data: BindingDataConfig, cfg: BindingEvalConfig) -> dict[int, list[bd.Program]]:
    """Held-out programs by depth (their own seed, apart from training batches)."""
    gen = bd.BindingData(data)
    return {h: gen.held_out(cfg.n_per_hop, 20_000 + cfg.seed, h) for h in range(1, data.hops + 1)}


def evaluate(model, data: BindingDataConfig, programs: dict[int, list[bd.Program]]) -> dict[str, Any]:
    """Accuracy by depth and heuristic agreement of ``model`` on ``programs``."""
    acc, agree, agree_d, n_d = {}, [], [], 0
    for h, ps in programs.items():
        toks, ans = bd.encode(data, ps)
        pred = _predict(model, toks)
        heur = torch.tensor([bd.token_id(data, p.heuristic) for p in ps])
        acc[str(h)] = float((pred == ans).float().mean())
        agree.append(pred == heur)
        disc = heur != ans
        agree_d.append((pred == heur)[disc])
        n_d += int(disc.sum())
    a = torch.cat(agree).float()
    ad = torch.cat(agree_d).float()
    return {"accuracy_by_depth": acc, "accuracy": sum(acc.values()) / len(acc),
            "min_accuracy": min(acc.values()), "heuristic_agreement": float(a.mean()),
            "heuristic_agreement_discordant": float(ad.mean()) if n_d else float("nan"), "n_discordant": n_d}


@dataclass
class BindingDynamicsResult:
    run: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]]
    phases: dict[str, Any] = field(default_factory=dict)
    train_loss: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "setting": SETTING, "run": self.run, "settings": self.settings,
                "phases": self.phases, "checkpoints": self.rows, "train_loss": self.train_loss}

    def save(self, out: str | Path) -> Path:
        return write_result_json(out, "binding_dynamics.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "BindingDynamicsResult":
        d, _ = read_result_json(path, "binding_dynamics.json", SCHEMA_VERSION, "mechscope dynamics")
        return cls(d["run"], d["settings"], d["checkpoints"], d.get("phases", {}), d.get("train_loss", []))


def phases(rows: list[dict[str, Any]], n_consts: int) -> dict[str, Any]:
    """Read the phases off the per-checkpoint rows: the systematic step (first checkpoint with
    accuracy >= 0.95 at every depth), the heuristic phase (checkpoints before it where the model
    agrees with the early-line heuristic on at least half the discordant programs), the peak
    agreement and where it happens, and the final agreement."""
    steps = [r["step"] for r in rows]
    sys_step = next((r["step"] for r in rows if r["min_accuracy"] >= SYSTEMATIC), None)
    before = [r for r in rows if sys_step is None or r["step"] < sys_step]
    peak = max(before or rows, key=lambda r: r["heuristic_agreement_discordant"])
    heur = [r["step"] for r in before if r["heuristic_agreement_discordant"] >= 0.5]
    return {"chance": 1.0 / n_consts, "systematic_step": sys_step,
            "heuristic_peak_step": peak["step"], "heuristic_peak_agreement": peak["heuristic_agreement_discordant"],
            "heuristic_peak_agreement_all": peak["heuristic_agreement"],
            "heuristic_phase_steps": [heur[0], heur[-1]] if heur else None,
            "final_step": steps[-1] if steps else None,
            "final_agreement_discordant": rows[-1]["heuristic_agreement_discordant"] if rows else None,
            "final_accuracy_by_depth": rows[-1]["accuracy_by_depth"] if rows else None}


def binding_dynamics(run_dir: str | Path, cfg: BindingEvalConfig | None = None,
                     progress: ProgressArg = False) -> BindingDynamicsResult:
    """``evaluate`` on every checkpoint of a binding run, by step."""
    from mechscope.heads.dynamics import find_checkpoints
    from mechscope.models import load_model

    check_config(cfg, BindingEvalConfig, "binding_dynamics")
    cfg = cfg or BindingEvalConfig()
    run = Path(run_dir)
    ckpts = find_checkpoints(run)
    data = data_config(run)
    progs = eval_programs(data, cfg)
    rows = []
    bar = as_progress(progress).phase("checkpoints", total=len(ckpts), unit="ckpt")
    for i, (step, d) in enumerate(ckpts):
        model = load_model(str(d), device="cpu")
        rows.append({"step": step, "dir": d.name, **evaluate(model, data, progs)})
        bar.advance()
    bar.close()
    tl = json.loads((run / "train.json").read_text()).get("train_loss", [])
    stride = max(1, len(tl) // 400)
    return BindingDynamicsResult(str(run), {**cfg.to_dict(), "data": data.__dict__}, rows, phases(rows, data.n_consts),
                                 tl[::stride])


def position_roles(p: bd.Program) -> list[str]:
    """A role per position of ``p``'s layout: ``line 3 rhs [chain 2/3]`` etc."""
    chain = p.chain_lines()
    roles = ["bos"]
    for i in range(len(p.lines)):
        tag = f" [chain {chain.index(i) + 1}/{len(chain)}]" if i in chain else ""
        roles += [f"line {i} lhs{tag}", f"line {i} ={tag}", f"line {i} rhs{tag}", f"line {i} ;{tag}"]
    return roles + ["? (query)", "query variable"]


def chain_positions(p: bd.Program) -> list[int]:
    """The positions the root constant travels through, in order: the constant, then for each
    later line of the chain its right-hand side (the variable read) and its left-hand side
    (the variable written), then the query variable."""
    chain = p.chain_lines()
    out = [bd.rhs_position(chain[0])]
    for i in chain[1:]:
        out += [bd.rhs_position(i), bd.lhs_position(i)]
    return out + [len(p.words()) - 1]


def pairs(data: BindingDataConfig, cfg: BindingInterchangeConfig) -> tuple[list[bd.Program], list[bd.Program]]:
    """``cfg.n`` (base, counterfactual) programs on one layout; the counterfactual's query
    chain starts from another constant (so its answer differs)."""
    depth = cfg.depth or data.hops
    if depth > data.hops:
        raise MechscopeError(f"--depth {depth} is deeper than the run's --hops ({data.hops}); pass a depth up to {data.hops}.")
    rng = random.Random(f"interchange/{cfg.seed}/{depth}")
    layout = bd.random_layout(data, depth, rng)
    base, cf = [], []
    for _ in range(cfg.n):
        p = bd.fill(data, layout, rng)
        other = rng.choice([c for c in bd.constants(data) if c != p.answer])
        base.append(p)
        cf.append(bd.with_root(data, p, other))
    return base, cf


@dataclass
class BindingInterchangeResult:
    model: str
    settings: dict[str, Any]
    grid: dict[str, Any]
    """``InterchangeResult.to_dict()``: sites, positions, accuracy [site][position]"""
    roles: list[str]
    chain: list[int]
    example: list[str]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "setting": SETTING, "model": self.model, "settings": self.settings,
                "interchange": self.grid, "roles": self.roles, "chain_positions": self.chain, "example": self.example,
                "summary": self.summary}

    def save(self, out: str | Path) -> Path:
        return write_result_json(out, "interchange.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "BindingInterchangeResult":
        d, _ = read_result_json(path, "interchange.json", SCHEMA_VERSION, "mechscope interchange")
        return cls(d["model"], d["settings"], d["interchange"], d["roles"], d["chain_positions"], d["example"], d["summary"])


def summarize(acc: list[list[float]], sites: list[str], chain: list[int], roles: list[str]) -> dict[str, Any]:
    """Per chain position, its best site and accuracy; per site, the chain position with the
    highest accuracy (the trace of the constant); whether that trace moves forward."""
    a = torch.tensor(acc)  # [site, pos]
    per_pos: list[dict[str, Any]] = []
    for p in chain:
        j = int(a[:, p].argmax())
        per_pos.append({"position": p, "role": roles[p], "best_site": sites[j], "best_site_index": j,
                        "accuracy": float(a[j, p])})
    trace: list[dict[str, Any]] = []
    for j, s in enumerate(sites):
        col = a[j, chain]
        k = int(col.argmax())
        trace.append({"site": s, "position": chain[k], "role": roles[chain[k]], "accuracy": float(col[k])})
    idx = [t["position"] for t in trace]
    return {"chain": per_pos, "min_chain_accuracy": min(x["accuracy"] for x in per_pos),
            "trace": trace, "trace_moves_forward": all(x <= y for x, y in zip(idx, idx[1:]))}


def binding_interchange(model, data: BindingDataConfig, cfg: BindingInterchangeConfig | None = None,
                        name: str = "") -> BindingInterchangeResult:
    """Interchange-intervention accuracy of every (site, position) on a binding model."""
    from mechscope.patching.interchange import interchange_accuracy

    check_config(cfg, BindingInterchangeConfig, "binding_interchange")
    if not isinstance(data, BindingDataConfig):
        raise MechscopeError(f"binding_interchange takes the run's BindingDataConfig as data (BindingConfig(...).data, or "
                             f"read from a checkpoint's binding.json), got {type(data).__name__}.")
    cfg = cfg or BindingInterchangeConfig()
    if model.summary.d_vocab < len(bd.vocabulary(data)):
        raise MechscopeError("The model's vocabulary is smaller than the binding programs'; pass a checkpoint of "
                             "`mechscope train-toy --setting binding`.")
    base, cf = pairs(data, cfg)
    bt, ba = bd.encode(data, base)
    ct, ca = bd.encode(data, cf)
    n_all = len(base)
    if cfg.correct_only:
        ok = (_predict(model, bt) == ba) & (_predict(model, ct) == ca)
        bt, ct, ca = bt[ok], ct[ok], ca[ok]
        if not len(bt):
            raise MechscopeError("The model answers none of the program pairs correctly, so interchange accuracy is "
                                 "undefined; use a later checkpoint or pass --all-pairs.")
    res = interchange_accuracy(model, bt, ct, ca, site=cfg.site, head=cfg.head)
    roles = position_roles(base[0])
    chain = chain_positions(base[0])
    grid = res.to_dict()
    summary = {"pairs": n_all, "pairs_used": len(bt), **summarize(grid["accuracy"], grid["sites"], chain, roles)}
    return BindingInterchangeResult(name, {**cfg.to_dict(), "depth": base[0].depth, "data": data.__dict__}, grid,
                                    roles, chain, base[0].words(), summary)
