"""Probe every layer: harvest the hook's activations at the labelled tokens in one forward pass
per batch (all layers at once), split by sequence, fit a logistic probe per layer on the real
labels and on Hewitt and Liang's control task, and report accuracy, control accuracy and
selectivity = accuracy - control accuracy (on held-out sequences).

The control task: every word type gets one label drawn at random from the training labels'
distribution (seeded), so a probe can score on it only by memorising word types. A probe whose
accuracy is high but whose selectivity is near zero has found word identity, not the property.
"""

from __future__ import annotations

import contextlib
import json
import random
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.errors import MechscopeError, check_config
from mechscope.models.hooks import check_hook_name
from mechscope.partial import Partial, digest, model_key
from mechscope.probes.config import ProbeConfig
from mechscope.probes.fit import fit_logistic
from mechscope.probes.labels import LabelSet
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import write_result_json

if TYPE_CHECKING:
    from mechscope.models import Model

SCHEMA_VERSION = 1
_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out")


def layer_hooks(model: Model, hook: str, layers: list[int] | None) -> list[tuple[int, str]]:
    """(layer, hook name) pairs for a site name, a ``{L}`` template or one full hook name (which
    takes no ``layers``: refused rather than ignored)."""
    n = model.summary.n_layers
    if hook in _SITES or "{L}" in hook:
        template = f"blocks.{{L}}.hook_{hook}" if hook in _SITES else hook
        chosen = list(range(n)) if layers is None else layers
        bad = [L for L in chosen if not 0 <= L < n]
        if bad:
            raise MechscopeError(f"Layer(s) {bad} are out of range: the model has layers 0..{n - 1}.")
        out = [(L, template.replace("{L}", str(L))) for L in chosen]
    else:
        parts = hook.split(".")
        layer = int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else -1
        if layers is not None:  # one full hook name is one hook: --layers would be silently ignored
            template = ".".join(["blocks", "{L}", *parts[2:]]) if layer >= 0 else "blocks.{L}.hook_resid_post"
            raise MechscopeError(f"--layers does not apply to the full hook name '{hook}', which names one hook; give --hook "
                                 f"a site (e.g. {_SITES[2]}) or a template with {{L}} (e.g. {template}) to probe the layers "
                                 "you choose, or leave --layers out.")
        out = [(layer, hook)]
    from mechscope.models.load import check_hook_fires

    for _, h in out:
        check_hook_name(model, h)
        check_hook_fires(model, h, "the probe")
    return out


@dataclass
class ProbeResult:
    """Accuracy, control accuracy and selectivity per probed hook (held-out sequences)."""

    label_set: str
    classes: list[str]
    class_counts: dict[str, int]
    hooks: list[str]
    layers: list[int]
    accuracy: list[float]
    control_accuracy: list[float | None]
    train_accuracy: list[float]
    majority: float
    """Accuracy of always answering the most frequent training class, on the test items."""
    n_train: int
    n_test: int
    n_word_types: int
    config: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def selectivity(self) -> list[float | None]:
        return [None if c is None else a - c for a, c in zip(self.accuracy, self.control_accuracy)]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self), "selectivity": self.selectivity}

    def save(self, out: str | Path) -> Path:
        return write_result_json(out, "probe.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ProbeResult":
        p = Path(path)
        d = json.loads((p / "probe.json" if p.is_dir() else p).read_text(encoding="utf-8"))
        d.pop("schema_version", None)
        d.pop("selectivity", None)
        return cls(**d)

    def table(self) -> str:
        names = [str(L) if L >= 0 else h for L, h in zip(self.layers, self.hooks)]  # a non-block hook by its name
        w = max([5, *map(len, names)])
        rows = [f"{'layer' if all(L >= 0 for L in self.layers) else 'hook':>{w}}  {'acc':>6}  {'control':>7}  {'select.':>7}"]
        for name, a, c, s in zip(names, self.accuracy, self.control_accuracy, self.selectivity):
            rows.append(f"{name:>{w}}  {a:6.3f}  {'-' if c is None else f'{c:7.3f}':>7}  {'-' if s is None else f'{s:+7.3f}':>7}")
        return "\n".join(rows)


def control_labels(words: list[str], train_labels: list[int], n_classes: int, seed: int) -> dict[str, int]:
    """Hewitt and Liang's control task: one label per word type, drawn from the training labels' distribution."""
    rng = random.Random(seed)
    counts = [train_labels.count(c) for c in range(n_classes)]
    return {w: rng.choices(range(n_classes), weights=counts)[0] for w in sorted(set(words))}


def select_items(data: LabelSet, cfg: ProbeConfig) -> LabelSet:
    """Balance the classes (if ``cfg.balance``) and keep at most ``cfg.max_items`` items, seeded."""
    rng = random.Random(cfg.seed)
    idx = list(range(len(data)))
    if cfg.balance:
        by: dict[int, list[int]] = {}
        for i in idx:
            by.setdefault(data.label[i], []).append(i)
        m = min(len(v) for v in by.values())
        idx = sorted(i for v in by.values() for i in rng.sample(v, m))
    if len(idx) > cfg.max_items:
        idx = sorted(rng.sample(idx, cfg.max_items))
    return data.subset(idx).check()


@torch.no_grad()
def harvest(model: Model, data: LabelSet, hooks: list[str], batch_size: int) -> dict[str, Tensor]:
    """Activations [n_items, d] at every hook for the items of ``data``: one forward per batch of
    sequences (right-padded: a causal model's earlier positions do not see the padding)."""
    from mechscope.activations.store import separator_id
    from mechscope.models.load import plain_attention

    wanted = sorted(set(data.seq))
    items_of: dict[int, list[int]] = {}
    for i, s in enumerate(data.seq):
        items_of.setdefault(s, []).append(i)
    out = {h: torch.zeros(0) for h in hooks}
    rows: dict[str, list[tuple[list[int], Tensor]]] = {h: [] for h in hooks}
    pad = separator_id(model.tokenizer)
    split = any(h.endswith(("hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result")) for h in hooks)
    mode = contextlib.nullcontext() if split else plain_attention(model)
    with mode:
        for b in range(0, len(wanted), batch_size):
            seqs = wanted[b:b + batch_size]
            width = max(len(data.sequences[s]) for s in seqs)
            toks = torch.full((len(seqs), width), pad, dtype=torch.long)
            for r, s in enumerate(seqs):
                toks[r, : len(data.sequences[s])] = torch.as_tensor(data.sequences[s])
            got: dict[str, Tensor] = {}

            def grabber(name: str):
                def grab(t: Tensor, hook: Any = None) -> None:
                    got[name] = t.detach()
                return grab

            model.bridge.run_with_hooks(toks.to(model.device), fwd_hooks=[(h, grabber(h)) for h in hooks])
            items = [i for s in seqs for i in items_of[s]]
            r_idx = torch.tensor([seqs.index(data.seq[i]) for i in items])
            p_idx = torch.tensor([data.pos[i] for i in items])
            for h in hooks:
                a = got[h]
                if a.dim() < 3 or tuple(a.shape[:2]) != tuple(toks.shape) or h.endswith(("hook_pattern", "hook_attn_scores")):
                    # (a pattern is [batch, heads, query, key]: its first two sizes match the tokens' when heads = positions)
                    raise MechscopeError(f"the hook {h} gives activations of shape {list(a.shape)}, not [batch, position, ...]; "
                                         "probe a per-position site (resid_post, mlp_out, attn.hook_z ...), not attention patterns.")
                a = a.reshape(*a.shape[:2], -1)  # per-head sites flatten to [batch, pos, heads * d]
                rows[h].append((items, a[r_idx, p_idx].float().cpu()))
    for h in hooks:
        d = rows[h][0][1].shape[1]
        full = torch.zeros(len(data), d)
        for items, a in rows[h]:
            full[torch.tensor(items)] = a
        out[h] = full
    return out


def run_probe(model: Model, data: LabelSet | str, cfg: ProbeConfig | None = None, progress: ProgressArg = False,
              checkpoint: str | Path | None = None) -> ProbeResult:
    """Fit and score a probe (and its control) at every hook of ``cfg.hook`` over ``cfg.layers``.
    ``data``: a ``LabelSet``, a built-in label set's name (``builtin_labels``) or a JSONL file
    (``labels_from_file``). ``checkpoint``: a folder where each hook's scores are kept as they
    finish (``mechscope.partial``, job ``probe``); a rerun with the same settings, weights and
    labelled tokens harvests and fits only the hooks not done yet."""
    from mechscope.models import require_model
    from mechscope.models.load import context_overrun
    from mechscope.probes.config import BUILTIN_LABELS
    from mechscope.probes.labels import builtin_labels, labels_from_file

    require_model(model, "run_probe")
    check_config(cfg, ProbeConfig, "run_probe")
    cfg = cfg or ProbeConfig()
    if isinstance(data, (str, Path)) and str(data) in BUILTIN_LABELS:  # a built-in label set's name
        data = builtin_labels(model, str(data), cfg)
    elif isinstance(data, (str, Path)) and Path(data).is_file():  # a JSONL file of labelled texts
        data = labels_from_file(model.tokenizer, data)
    elif not isinstance(data, LabelSet):
        raise MechscopeError(f"run_probe's data must be a LabelSet, the name of a built-in one ({', '.join(BUILTIN_LABELS)}) "
                             f"or a JSONL file of labelled texts; got {reprlib.repr(data)} (a {type(data).__name__}).")
    pairs = layer_hooks(model, cfg.hook, cfg.layers)
    longest = max((len(s) for s in data.sequences), default=0)
    if (n_ctx := context_overrun(model, longest)) is not None:
        raise MechscopeError(f"The longest text of the label set '{data.name}' has {longest} tokens, more than the model's "
                             f"context of {n_ctx}; shorten or split the texts.")
    data = select_items(data.check(), cfg)
    seqs = sorted(set(data.seq))
    random.Random(cfg.seed).shuffle(seqs)
    n_test = max(1, round(cfg.test_fraction * len(seqs)))
    test_seqs = set(seqs[:n_test])
    test = [i for i, s in enumerate(data.seq) if s in test_seqs]
    train = [i for i, s in enumerate(data.seq) if s not in test_seqs]
    if len(train) < 10 or len(test) < 5:
        raise MechscopeError(f"Too few labelled tokens to split ({len(train)} train, {len(test)} test); give more data.")
    y = torch.tensor(data.label)
    ytr, yte = y[train], y[test]
    k = len(data.classes)
    ctrl_map = control_labels([data.word[i] for i in train], ytr.tolist(), k, cfg.seed + 1)
    # word types seen only in the test split: one label per type too, from the same distribution
    ctrl_map |= control_labels([w for w in data.word if w not in ctrl_map], ytr.tolist(), k, cfg.seed + 2)
    yc = torch.tensor([ctrl_map[w] for w in data.word])
    p = as_progress(progress)
    for line in data.notes:  # what reading the labels left out
        p.note(line)
    done = Partial(checkpoint, "probe", {"settings": cfg.to_dict(), "hooks": [h for _, h in pairs], "model": model_key(model),
                                         "labels": digest([data.name, data.classes, data.sequences, data.seq, data.pos, data.label, data.word])
                                         if checkpoint is not None else None})
    if done.found:  # said, not saved: a resumed run's result is the uninterrupted one's
        p.note(f"resuming: {done.found} of {len(pairs)} hooks' probes read from {checkpoint}")
    if done.discarded:
        p.note(f"{checkpoint} held probes of a run with other settings, weights or labelled tokens; they were discarded")
    scores = [done.get(f"hook-{j}") for j in range(len(pairs))]
    todo = [h for (_, h), got in zip(pairs, scores) if got is None]
    acts: dict[str, Tensor] = {}
    if todo:
        p.note(f"activations of {len(data.seq)} labelled tokens at {len(todo)} hooks")
        acts = harvest(model, data, todo, cfg.batch_size)
    maj = int(torch.bincount(ytr, minlength=k).argmax())
    res = ProbeResult(
        label_set=data.name, classes=data.classes, class_counts=data.counts(), hooks=[h for _, h in pairs],
        layers=[L for L, _ in pairs], accuracy=[], control_accuracy=[], train_accuracy=[],
        majority=float((yte == maj).float().mean()), n_train=len(train), n_test=len(test),
        n_word_types=len(set(data.word)), config=cfg.to_dict(), model=model.summary.to_dict(),
    )
    bar = p.phase("probes", total=len(pairs), unit="layer", initial=len(pairs) - len(todo))
    for j, (_, h) in enumerate(pairs):
        got = scores[j]
        if got is None:
            x = acts.pop(h)
            probe = fit_logistic(x[train], ytr, k, cfg.l2, cfg.max_iter)
            got = {"accuracy": probe.accuracy(x[test], yte), "train_accuracy": probe.accuracy(x[train], ytr), "control_accuracy": None}
            if cfg.control:
                cprobe = fit_logistic(x[train], yc[train], k, cfg.l2, cfg.max_iter)
                got["control_accuracy"] = cprobe.accuracy(x[test], yc[test])
            done.put(f"hook-{j}", got)
            bar.advance()
        res.accuracy.append(got["accuracy"])
        res.train_accuracy.append(got["train_accuracy"])
        res.control_accuracy.append(got["control_accuracy"])
    bar.close()
    return res

