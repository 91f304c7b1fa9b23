"""Scoring descriptions: simulation (Bills et al. 2023; Choi et al. 2024), detection and fuzzing
(EleutherAI's delphi), each with a shuffled-description control.

Every score reads the unit's *held-out* exemplars (splits ``valid`` and ``test``, kinds
``top``, ``quantile`` and ``random``): the explainer saw only ``train``.

Simulation
  1. A simulator model reads ``instructions + worked example + "Explanation: <description>"``
     followed by the exemplar's tokens, one per line, each as ``token<TAB>unknown``.
  2. At every ``<TAB>`` the next-token distribution is read, restricted to the number tokens
     ``"0".."N"`` (``N`` = 10 where ``"10"`` is one token, else the largest single-token number:
     9 for SmolLM2, whose tokenizer splits digits; the prompt states the same scale) and
     renormalised: ``sim_t = sum_k k * p_k``. ONE forward pass per exemplar, no generation and
     no API log-probabilities (the anchors' users report that chat APIs broke those). The
     ``unknown`` placeholders are Bills et al.'s "all at once" layout: the readout at token
     ``t`` never sees a number the simulator made up for an earlier token.
  3. ``simulation`` = Pearson correlation between the true and the simulated activations over
     all tokens of all held-out exemplars concatenated (0 when either side is constant).

Detection (delphi): is the unit active in this context? A window counts as activating when its
largest activation is at least ``active_frac`` x the unit's maximum; the simulator reads
``description + text`` and ``P(yes) = p(" Yes") / (p(" Yes") + p(" No"))`` at the answer
position, one forward pass. ``detection`` = balanced accuracy of ``P(yes) >= 0.5`` (a constant
answer scores exactly 0.5); ``detection_auc`` = the threshold-free ROC AUC (ties count 1/2),
kept because a 135M simulator is badly calibrated and may answer "Yes" to everything.

Fuzzing (delphi): the activating windows are shown twice, once with the tokens at
``>= mark_frac`` x the window's maximum marked ``<<like this>>`` and once with the same number
of other tokens marked (seeded choice); the simulator judges whether the marks fit the
description. ``fuzzing`` / ``fuzzing_auc`` as for detection.

Control: every score is also computed with another unit's description (``shuffle_partners``: a
seeded random cyclic order of the units, each paired with the next, so nobody keeps their own)
and stored as ``<score>_shuffled``. A method counts only where it beats its control:
``control_summary`` gives both distributions and the fraction of units above control.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import random
import statistics
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

from mechscope.errors import MechscopeError
from mechscope.explain.explainers.base import clean_token
from mechscope.explain.types import Description, Exemplar, UnitRecord, UnitRef

if TYPE_CHECKING:
    from mechscope.models import Model

SCORERS = ("simulation", "detection", "fuzzing")
ACTIVE_FRAC = 0.2
MARK_FRAC = 0.5
NUMBER_CONTEXT = "The\t"
"""What the simulation prompt puts before a number (``token<TAB>number``): number tokens are decided after it."""
ANSWER_CONTEXT = "Answer:"
"""What the detection and fuzzing prompts put before the answer: " Yes" / " No" are decided after it."""

SIM_INSTRUCTIONS = (
    "We study neurons of a neural network. Each neuron looks for one particular thing in a text. "
    "Read the explanation of what a neuron does, then predict its activation on each token, from "
    "0 (not active) to {top} (most active). The format is token<tab>activation, one token per line."
)
JUDGE_INSTRUCTIONS = (
    "We study neurons of a neural network. Each neuron looks for one particular thing in a text. "
    "Read the explanation of what a neuron does and answer the question with Yes or No."
)


class Simulator(Protocol):
    """What the scorers need from a simulator model; ``ModelSimulator`` is the in-process one."""

    def simulate(self, description: str, windows: list[list[str]]) -> list[list[float]]:
        """Predicted activation (0..top) at every token of every window."""
        ...

    def detect(self, description: str, windows: list[list[str]]) -> list[float]:
        """P(yes) that the described unit is active somewhere in each window."""
        ...

    def judge_marks(self, description: str, windows: list[list[str]], marks: list[list[bool]]) -> list[float]:
        """P(yes) that the marked tokens of each window are the ones the description is about."""
        ...


# ---------------------------------------------------------------- statistics


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant, NaN when empty. "Constant" is
    relative to the values' own magnitude (spread below 1e-9 of the largest value), so the
    score does not depend on the activations' scale (an absolute floor turned a perfect
    correlation of activations around 1e-7 into 0)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {n} values against {len(y)}")
    if n == 0:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)

    def flat(ss: float, vals: Sequence[float]) -> bool:
        scale = max((abs(v) for v in vals), default=0.0)
        return scale == 0.0 or ss <= (1e-9 * scale) ** 2 * n

    if flat(sxx, x) or flat(syy, y):
        return 0.0
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)


def balanced_accuracy(labels: Sequence[bool], predicted: Sequence[bool]) -> float:
    """(TPR + TNR) / 2; NaN when one class is missing."""
    pos = [p for lab, p in zip(labels, predicted) if lab]
    neg = [p for lab, p in zip(labels, predicted) if not lab]
    if not pos or not neg:
        return math.nan
    return 0.5 * (sum(pos) / len(pos) + sum(not p for p in neg) / len(neg))


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties 1/2; NaN when one class is missing."""
    pos = [s for lab, s in zip(labels, scores) if lab]
    neg = [s for lab, s in zip(labels, scores) if not lab]
    if not pos or not neg:
        return math.nan
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


# ---------------------------------------------------------------- the scores


def heldout(exemplars: Iterable[Exemplar]) -> list[Exemplar]:
    """The exemplars scoring may use: not ``train``, not ``bottom``."""
    return [e for e in exemplars if e.split != "train" and e.kind != "bottom"]


def _max_act(record: UnitRecord | None, exemplars: list[Exemplar]) -> float:
    seen = max((max(e.acts) for e in exemplars if e.acts), default=0.0)
    return record.max_act if record is not None and record.max_act > 0 else seen


def simulation_score(sim: Simulator, description: str, exemplars: list[Exemplar]) -> float:
    """Correlation of true and simulated activations over all tokens of ``exemplars``."""
    if not exemplars:
        return math.nan
    predicted = sim.simulate(description, [e.tokens for e in exemplars])
    true = [a for e in exemplars for a in e.acts]
    flat = [p for row in predicted for p in row]
    return pearson(true, flat)


def detection_scores(sim: Simulator, description: str, exemplars: list[Exemplar], record: UnitRecord | None = None,
                     active_frac: float = ACTIVE_FRAC) -> dict[str, float]:
    """``detection`` (balanced accuracy at P(yes) >= 0.5) and ``detection_auc``."""
    top = _max_act(record, exemplars)
    labels = [max(e.acts, default=0.0) >= active_frac * top and top > 0 for e in exemplars]
    if all(labels) or not any(labels):
        return {}
    p = sim.detect(description, [e.tokens for e in exemplars])
    return {"detection": balanced_accuracy(labels, [q >= 0.5 for q in p]), "detection_auc": roc_auc(labels, p)}


def fuzz_marks(ex: Exemplar, rng: random.Random, mark_frac: float = MARK_FRAC) -> tuple[list[bool], list[bool]] | None:
    """(correct marks, wrong marks) for one window: the tokens at >= mark_frac x its max, and as many others."""
    top = max(ex.acts, default=0.0)
    if top <= 0:
        return None
    right = [a >= mark_frac * top for a in ex.acts]
    others = [i for i, m in enumerate(right) if not m]
    k = sum(right)
    if len(others) < k:
        return None
    chosen = set(rng.sample(others, k))
    return right, [i in chosen for i in range(len(ex.acts))]


def fuzzing_scores(sim: Simulator, description: str, exemplars: list[Exemplar], record: UnitRecord | None = None,
                   seed: int = 0, active_frac: float = ACTIVE_FRAC) -> dict[str, float]:
    """``fuzzing`` (balanced accuracy of telling right from wrong marks) and ``fuzzing_auc``."""
    top = _max_act(record, exemplars)
    rng = random.Random(seed)
    windows, marks, labels = [], [], []
    for e in exemplars:
        if top <= 0 or max(e.acts, default=0.0) < active_frac * top:
            continue
        pair = fuzz_marks(e, rng)
        if pair is None:
            continue
        for m, lab in zip(pair, (True, False)):
            windows.append(e.tokens)
            marks.append(m)
            labels.append(lab)
    if not windows:
        return {}
    p = sim.judge_marks(description, windows, marks)
    return {"fuzzing": balanced_accuracy(labels, [q >= 0.5 for q in p]), "fuzzing_auc": roc_auc(labels, p)}


def unit_seed(unit: UnitRef, seed: int = 0) -> int:
    """A seed of its own for each unit (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{unit.key}".encode()).digest()[:4], "little")


def score(sim: Simulator, description: str, record: UnitRecord | None, exemplars: list[Exemplar],
          scorers: Sequence[str] = SCORERS, seed: int = 0) -> dict[str, float]:
    """The chosen scores of one description on ``exemplars`` (already held out); finite values only."""
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown:
        raise MechscopeError(f"Unknown scorer {unknown[0]!r}; choose among {', '.join(SCORERS)} (comma-separated) or none.")
    out: dict[str, float] = {}
    if "simulation" in scorers:
        out["simulation"] = simulation_score(sim, description, exemplars)
    if "detection" in scorers:
        out.update(detection_scores(sim, description, exemplars, record))
    if "fuzzing" in scorers:
        unit_rng = unit_seed(record.unit, seed) if record is not None else seed
        out.update(fuzzing_scores(sim, description, exemplars, record, seed=unit_rng))
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def score_counts(record: UnitRecord | None, exemplars: list[Exemplar], scorers: Sequence[str] = SCORERS,
                 seed: int = 0, active_frac: float = ACTIVE_FRAC) -> dict[str, float]:
    """``<scorer>_n``: what each score is computed over (tokens; contexts; marked windows), 0 where it is undefined.

    Stored beside the scores: it says a unit was scored even where a score is undefined (one
    class only), so a resumed run does not retry it, and NaN never reaches the database."""
    top = _max_act(record, exemplars)
    labels = [max(e.acts, default=0.0) >= active_frac * top and top > 0 for e in exemplars]
    out: dict[str, float] = {}
    if "simulation" in scorers:
        out["simulation_n"] = float(sum(len(e.acts) for e in exemplars))
    if "detection" in scorers:
        out["detection_n"] = float(len(labels)) if 0 < sum(labels) < len(labels) else 0.0
    if "fuzzing" in scorers:
        rng = random.Random(unit_seed(record.unit, seed) if record is not None else seed)
        out["fuzzing_n"] = float(2 * sum(1 for e, lab in zip(exemplars, labels) if lab and fuzz_marks(e, rng) is not None))
    return out


def shuffle_partners(units: Iterable[UnitRef], seed: int = 0) -> dict[UnitRef, UnitRef]:
    """Each unit -> the unit whose description is its control: a seeded random cycle (no fixed points).

    Depends only on the set of units and the seed, so a resumed run pairs the same way."""
    order = sorted(set(units))
    if len(order) < 2:
        return {}
    random.Random(seed).shuffle(order)
    return {u: order[(i + 1) % len(order)] for i, u in enumerate(order)}


def control_summary(descriptions: Iterable[Description], score_name: str = "simulation") -> dict[str, Any]:
    """Both distributions of ``score_name`` and its ``*_shuffled`` control, over the descriptions holding both.

    ``above_control`` = fraction of units whose score beats their shuffled control."""
    pairs = [(d.scores[score_name], d.scores[f"{score_name}_shuffled"]) for d in descriptions
             if score_name in d.scores and f"{score_name}_shuffled" in d.scores]
    if not pairs:
        return {"score": score_name, "n": 0}
    real, ctrl = [a for a, _ in pairs], [b for _, b in pairs]
    return {
        "score": score_name, "n": len(pairs),
        "mean": statistics.fmean(real), "median": statistics.median(real),
        "mean_shuffled": statistics.fmean(ctrl), "median_shuffled": statistics.median(ctrl),
        "above_control": sum(a > b for a, b in pairs) / len(pairs),
    }


# ---------------------------------------------------------------- the in-process simulator


class ModelSimulator:
    """A causal language model as simulator, one forward pass per window (``batch_size`` windows per pass).

    ``model``: a loaded ``mechscope.models.Model``, a name as for ``load_model``, or a
    ``mechscope.explain.plain.PlainLM``. It runs the plain Hugging Face model (see
    ``mechscope.explain.plain``: the bridge's wrapped model keeps no key/value cache).
    """

    def __init__(self, model: Model, batch_size: int = 8, share_head: bool = True):
        import torch

        from mechscope.explain.plain import plain_lm

        self.model, self.batch_size = plain_lm(model), batch_size
        self.hf = self.model.hf
        self.tok = self.model.tokenizer
        self.torch = torch
        self._cache: dict[tuple[str, str], list[int]] = {}
        # Numbers and answers are decided where the prompt reads them (a number after a tab, an
        # answer after "Answer:"): a SentencePiece tokenizer gives "0" alone a dummy prefix
        # (['▁', '0']) that it does not give after the tab; byte-level BPE gives the same ids either way.
        numbers: list[int] = []
        for k in range(11):
            ids = self._cont(NUMBER_CONTEXT, str(k))
            if len(ids) != 1:
                break
            numbers.append(ids[0])
        self.number_ids = numbers  # "0".."top", each one token (fewer than 2: no simulation scorer, see _need_numbers)
        self.top = max(len(numbers) - 1, 0)
        for yes, no in ((" Yes", " No"), ("Yes", "No")):  # the first token of each answer must differ
            self.yes, self.no = self._cont(ANSWER_CONTEXT, yes)[0], self._cont(ANSWER_CONTEXT, no)[0]
            if self.yes != self.no:
                break
        else:
            raise MechscopeError(f"The simulator's tokenizer ({self.model.name}) cannot tell 'Yes' from 'No' by their first token; use another simulator model.")
        self._share_head = share_head
        from mechscope.models.load import hf_position_limit

        self.max_positions: int | None = hf_position_limit(self.hf)
        # transformers 5.x renames the forward's past_key_values to cache (the old name goes in 5.40).
        self._cache_arg = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"

    @property
    def name(self) -> str:
        return self.model.name

    def _cont(self, context: str, text: str) -> list[int]:
        """The ids ``text`` adds after ``context`` (cached; ``continuation``), or its ids alone where it
        merges into the context. Prompt pieces are encoded after what precedes them in the prompt, so
        their concatenation is the prompt's own tokenisation: a SentencePiece tokenizer would give
        each piece encoded alone a stray leading '▁'; byte-level BPE gives the same ids either way."""
        from mechscope.models.tokens import continuation

        key = (context, text)
        ids = self._cache.get(key)
        if ids is None:
            got = continuation(self.tok, context, text)
            ids = self._cache[key] = got if got is not None else list(self.tok(text, add_special_tokens=False)["input_ids"])
        return ids

    def _need_numbers(self) -> None:
        """Refuse (one sentence) a simulation scorer whose tokenizer has no single-token numbers 0 and 1."""
        if len(self.number_ids) < 2:
            raise MechscopeError(f"The simulator's tokenizer ({self.model.name}) has no single-token digits 0 and 1; "
                                 "use another simulator model, or the detection and fuzzing scorers only.")

    def _head(self, text: str) -> list[int]:
        """The prompt's beginning, with the tokenizer's own special tokens (BOS where it adds one)."""
        return self.tok(text)["input_ids"]

    def _sim_parts(self, description: str, tokens: list[str]) -> tuple[list[int], list[int], list[int]]:
        """(head ids, tail ids, read positions within the tail) of the simulation prompt for one window."""
        head = (f"{SIM_INSTRUCTIONS.format(top=self.top)}\n\nExample.\nExplanation: the word \"cat\"\n"
                f"Activations:\nThe\t0\n cat\t{self.top}\n sat\t0\n on\t0\n the\t0\n mat\t0\n\n"
                f"Explanation: {description.strip()}\nActivations:\n")
        self._need_numbers()
        tab, unknown = self._cont("x", "\t"), self._cont("\t", "unknown\n")
        tail: list[int] = []
        slots = []
        for t in tokens:  # each token's line after the previous line (the first after "Activations:\n")
            tail += self._cont("unknown\n", clean_token(t)) + tab
            slots.append(len(tail) - 1)  # the logits here predict the number after the tab
            tail += unknown
        return list(self._head(head)), tail, slots

    def sim_sequence(self, description: str, tokens: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of the whole simulation prompt for one window, and the positions (one per token) read."""
        head, tail, slots = self._sim_parts(description, tokens)
        return head + tail, [len(head) + s for s in slots]

    def _judge_parts(self, description: str, text: str, question: str) -> tuple[list[int], list[int]]:
        head = f"{JUDGE_INSTRUCTIONS}\n\nExplanation: {description.strip()}\nText:"
        from mechscope.models.tokens import continuation

        tail = f" {text}\n{question} Answer:"  # encoded after the head, as in the whole prompt
        ids = continuation(self.tok, head, tail)
        return list(self._head(head)), ids if ids is not None else list(self.tok(tail, add_special_tokens=False)["input_ids"])

    def check_prompts(self, windows: list[list[str]], scorers: Sequence[str] = SCORERS) -> None:
        """Refuse (one sentence), before any unit is described, a simulator whose learned positions
        end before the scoring prompts of ``windows`` do, even with an empty description (a
        description only adds tokens): the simulation prompt of each window, the detection and
        fuzzing prompts' fixed part. Each prompt is still checked when it runs."""
        if "simulation" in scorers:
            self._need_numbers()
        if self.max_positions is None:
            return
        need = 0
        if "simulation" in scorers:
            for w in windows:
                head, tail, _ = self._sim_parts("", w)
                need = max(need, len(head) + len(tail))
        if any(s in scorers for s in ("detection", "fuzzing")):
            head, tail = self._judge_parts("", "", "Does the neuron fire anywhere in this text?")
            need = max(need, len(head) + len(tail))
        if need > self.max_positions:
            raise MechscopeError(
                f"the simulator {self.model.name} reads at most {self.max_positions} positions, but the scoring prompts here "
                f"are at least {need} tokens long before any description; pass a simulator with a context of more than "
                f"{need} tokens (--simulator MODEL), or --scorer none."
            )

    def _logits(self, head: list[int], tails: list[list[int]], reads: list[list[int]]) -> list[Any]:
        """Logits [len(read), d_vocab] at the read positions (within each tail) of ``head + tail``.

        The head (instructions, example, description: the same for every window of a unit) runs
        once and its key/value cache is shared by every batch of right-padded tails, which
        halves the cost; where the model's cache cannot be shared that way, whole sequences run."""
        torch = self.torch
        longest = len(head) + max((len(t) for t in tails), default=0)
        if self.max_positions is not None and longest > self.max_positions:
            raise MechscopeError(
                f"the simulator {self.model.name} reads at most {self.max_positions} positions, but a scoring prompt here is "
                f"{longest} tokens long; pass a simulator with a longer context (--simulator MODEL)."
            )
        out: list[Any] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        dev = self.model.device
        cache = None
        if self._share_head:
            try:
                with torch.no_grad():
                    first = self.hf(input_ids=torch.tensor([head], device=dev), use_cache=True)
                cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
                if not hasattr(cache, "batch_repeat_interleave"):
                    cache = None
            except (TypeError, ValueError, AttributeError, NotImplementedError):
                cache = None
            self._share_head = cache is not None
        for i in range(0, len(tails), self.batch_size):
            chunk, where = tails[i:i + self.batch_size], reads[i:i + self.batch_size]
            rows = chunk if cache is not None else [head + t for t in chunk]
            shift = 0 if cache is not None else len(head)
            width = max(len(s) for s in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, s in enumerate(rows):
                ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[b, :len(s)] = 1
            kw: dict[str, Any] = {}
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(rows))
                mask = torch.cat([torch.ones((len(rows), len(head)), dtype=torch.long), mask], dim=1)  # [batch, head + width]
                kw = {self._cache_arg: past, "use_cache": True}
            with torch.no_grad():
                logits = self.hf(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw).logits  # [batch, width, d_vocab]
            for b, pos in enumerate(where):
                out.append(logits[b, [shift + p for p in pos]].float().cpu())  # [len(pos), d_vocab]
        return out

    def expected_values(self, logits: Any) -> list[float]:
        """sum_k k * softmax(logits restricted to "0".."top")_k, per row of ``logits`` [n, d_vocab]."""
        torch = self.torch
        p = torch.softmax(logits[:, self.number_ids], dim=-1)  # [n, top + 1]
        return (p @ torch.arange(self.top + 1, dtype=p.dtype)).tolist()

    def simulate(self, description: str, windows: list[list[str]]) -> list[list[float]]:
        parts = [self._sim_parts(description, w) for w in windows]
        if not parts:
            return []
        rows = self._logits(parts[0][0], [t for _, t, _ in parts], [r for _, _, r in parts])
        return [self.expected_values(r) for r in rows]

    def _yes(self, description: str, texts: list[str], question: str) -> list[float]:
        parts = [self._judge_parts(description, t, question) for t in texts]
        if not parts:
            return []
        rows = self._logits(parts[0][0], [t for _, t in parts], [[len(t) - 1] for _, t in parts])
        torch = self.torch
        return [float(torch.softmax(r[0, [self.yes, self.no]], dim=-1)[0]) for r in rows]

    def detect(self, description: str, windows: list[list[str]]) -> list[float]:
        q = "Does the neuron fire anywhere in this text?"
        return self._yes(description, ["".join(clean_token(t) for t in w) for w in windows], q)

    def judge_marks(self, description: str, windows: list[list[str]], marks: list[list[bool]]) -> list[float]:
        q = "Are the tokens marked <<like this>> the ones the explanation is about?"
        texts = ["".join(f"<<{clean_token(t)}>>" if m else clean_token(t) for t, m in zip(w, ms)) for w, ms in zip(windows, marks)]
        return self._yes(description, texts, q)
