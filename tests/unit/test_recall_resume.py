"""The recall dataset run resumes after a kill: ``RecallResult`` reads back exactly from its JSON,
a checkpointed run keeps each finished fact (``mechscope.partial``, job ``recall``) and a rerun
analyses only the missing ones, to the uninterrupted run's result; other settings discard the
pieces; a SIGKILLed run resumes the same way, and so does the CLI.

A random tiny model knows none of the facts, so ``known_facts`` is patched to keep them all
(the draw, the analyses and the aggregate run as they would on facts a model knows)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mechscope.recall.dataset as dataset_mod
from mechscope.cli.main import app
from mechscope.recall import RecallConfig, recall
from mechscope.recall.dataset import recall_dataset
from mechscope.recall.result import RecallResult
from mechscope.tasks.facts import Fact, load_facts

PROMPT = "Then, Alice and Bob went to the park. Bob gave a ball to"
SUBJECT = "Bob gave"
FRAMES = ("Then, {s} went to the park and gave a ball to", "When {s} went to the store, the war gave a drink to",
          "The Eiffel Tower is where {s} gave a drink to", "In the year 1789, {s} and the store gave a ball to")
NAMES = ("Mary", "John", "Alice", "Bob")
CFG = {"samples": 2, "layer_stride": 1, "gen_tokens": 4}
"""The dataset run's settings in these tests (small, but every part runs)."""


def _facts() -> list[Fact]:
    """16 facts the tiny models' tokenizer reads: every name in every frame, a name as attribute."""
    return [Fact(subject=s, relation=f"frame-{k}", prompt=frame.format(s=s), attribute=" " + NAMES[(i + k) % 4])
            for k, frame in enumerate(FRAMES) for i, s in enumerate(NAMES)]


def _write_facts(path: Path) -> Path:
    path.write_text("".join(json.dumps(dataclasses.asdict(f)) + "\n" for f in _facts()))
    return path


@pytest.fixture
def knows_all(monkeypatch):
    """The model 'knows' every fact it is given."""
    monkeypatch.setattr(dataset_mod, "known_facts", lambda model, facts: list(facts))


def _count_recalls(monkeypatch) -> list[int]:
    """Count the per-fact analyses (``recall`` as the dataset run calls it); returns the live counter."""
    calls = [0]
    real = dataset_mod.recall

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(dataset_mod, "recall", counted)
    return calls


def _without_times(d):
    """``d`` without wall-clock fields (seconds), which no two runs share."""
    if isinstance(d, dict):
        return {k: _without_times(v) for k, v in d.items() if "seconds" not in k}
    if isinstance(d, list):
        return [_without_times(v) for v in d]
    return d


def _same(a, b) -> bool:
    """Equal results, read as JSON text (exact: floats by repr; an undefined figure, NaN, equals itself)."""
    return json.dumps(_without_times(a.to_dict())) == json.dumps(_without_times(b.to_dict()))


def _assert_same_fields(a, b, where: str = "result") -> None:
    """Every dataclass field of ``a`` and ``b`` equal, recursively; tensors bit for bit with their dtype."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _assert_same_fields(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _assert_same_fields(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert type(a) is type(b) and a == b, where


def test_a_recall_result_reads_back_exactly_from_its_json(tiny_llama, one_thread):
    r = recall(tiny_llama, PROMPT, SUBJECT, cfg=RecallConfig(samples=2, gen_tokens=4))
    r.extras["relation"] = "gave"
    assert None not in (r.trace, r.knockout, r.extraction, r.enrichment)
    back = RecallResult.from_dict(json.loads(json.dumps(r.to_dict())))
    _assert_same_fields(r, back)
    assert back.extraction.attn_rank.dtype == torch.int64 and back.trace.restored["resid"].dtype == torch.float32
    assert back.to_dict() == r.to_dict()
    assert RecallResult.from_dict(back.to_dict()).to_dict() == r.to_dict()
    no_parts = dataclasses.replace(r, trace=None, knockout=None, extraction=None, enrichment=None, extras={})
    _assert_same_fields(no_parts, RecallResult.from_dict(json.loads(json.dumps(no_parts.to_dict()))))


@pytest.mark.slow
def test_a_checkpointed_run_resumes_only_the_missing_facts(tiny_llama, tmp_path, monkeypatch, knows_all, one_thread):
    cfg = RecallConfig(**CFG)
    straight = recall_dataset(tiny_llama, n=5, cfg=cfg, facts=_facts())
    assert not straight.checkpoint_notes
    calls = _count_recalls(monkeypatch)
    first = recall_dataset(tiny_llama, n=5, cfg=cfg, facts=_facts(), checkpoint=tmp_path)
    assert calls[0] == 5 and _same(first, straight) and not first.checkpoint_notes
    pieces = tmp_path / "recall-partial"
    assert sorted(p.name for p in pieces.iterdir()) == sorted(["key.json", "related.json", *(f"fact-{i}.json" for i in range(5))])
    # a kill before facts 1 and 3 were saved: only they are analysed again
    (pieces / "fact-1.json").unlink()
    (pieces / "fact-3.json").unlink()
    calls[0] = 0
    resumed = recall_dataset(tiny_llama, n=5, cfg=cfg, facts=_facts(), checkpoint=tmp_path)
    assert calls[0] == 2
    assert _same(resumed, straight)
    assert resumed.checkpoint_notes == ["Resumed: 3 of the 5 facts were read from the checkpoint of an earlier run with the same settings."]
    for a, b in zip(resumed.facts, straight.facts):
        _assert_same_fields(a, b)


@pytest.mark.slow
def test_other_settings_or_facts_discard_the_pieces(tiny_llama, tmp_path, monkeypatch, knows_all, one_thread):
    recall_dataset(tiny_llama, n=3, cfg=RecallConfig(**CFG), facts=_facts(), checkpoint=tmp_path)
    calls = _count_recalls(monkeypatch)
    other = recall_dataset(tiny_llama, n=3, cfg=RecallConfig(**CFG, seed=1), facts=_facts(), checkpoint=tmp_path)
    assert calls[0] == 3  # nothing read back: another seed draws other facts with other noise
    assert other.checkpoint_notes == ["The checkpoint held facts of a recall run with other settings, weights, facts or lens; "
                                      "they were discarded."]
    assert _same(other, recall_dataset(tiny_llama, n=3, cfg=RecallConfig(**CFG, seed=1), facts=_facts()))
    key = json.loads((tmp_path / "recall-partial" / "key.json").read_text())
    assert key["settings"]["seed"] == 1 and key["tuned"] is None and len(key["facts"]) == 16  # a 16-hex digest
    calls[0] = 0
    changed = [dataclasses.replace(f, attribute=" Paris") if i == 15 else f for i, f in enumerate(_facts())]
    again = recall_dataset(tiny_llama, n=3, cfg=RecallConfig(**CFG, seed=1), facts=changed, checkpoint=tmp_path)
    assert calls[0] == 3 and "discarded" in again.checkpoint_notes[0]  # another facts list: its pieces may be other facts


@pytest.mark.slow
def test_the_cli_resumes_in_its_out_folder_and_clears_the_pieces(tiny_llama_dir, tmp_path, monkeypatch, knows_all, one_thread):
    monkeypatch.setattr(dataset_mod, "load_facts", lambda: _facts())

    def run(out: Path):
        return CliRunner().invoke(app, ["recall", "--dataset", "facts", "--n", "3", "--samples", "1", "--model", tiny_llama_dir,
                                        "--logit-lens", "--out", str(out), "--json"])

    real = dataset_mod.recall
    calls = [0]

    def dies_on_the_third(*a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # a kill after two facts
        return real(*a, **kw)

    killed = tmp_path / "killed"
    monkeypatch.setattr(dataset_mod, "recall", dies_on_the_third)
    assert run(killed).exit_code != 0
    assert sorted(p.name for p in (killed / "recall-partial").iterdir()) == ["fact-0.json", "fact-1.json", "key.json", "related.json"]
    monkeypatch.setattr(dataset_mod, "recall", real)
    calls = _count_recalls(monkeypatch)
    r = run(killed)
    assert r.exit_code == 0, r.output
    assert calls[0] == 1
    assert "Resumed: 2 of the 3 facts" in r.stderr
    assert not (killed / "recall-partial").exists()  # the pieces go once the result is saved
    straight = run(tmp_path / "straight")
    assert straight.exit_code == 0 and "Resumed" not in straight.stderr
    resumed, whole = (_without_times(json.loads(x.stdout)) for x in (r, straight))
    assert {k: v for k, v in resumed.items() if k not in ("report", "out")} == {k: v for k, v in whole.items() if k not in ("report", "out")}


KILL_CODE = """
import json, sys
from pathlib import Path
from mechscope.models import load_model
from mechscope.recall import dataset
from mechscope.recall.config import RecallConfig
from mechscope.tasks.facts import load_facts

model_dir, facts, cfg, n, out = sys.argv[1:6]
dataset.known_facts = lambda model, facts: list(facts)  # a random model knows no fact
dataset.recall_dataset(load_model(model_dir, device="cpu"), n=int(n), cfg=RecallConfig(**json.loads(cfg)),
                       facts=load_facts(Path(facts)), checkpoint=out)
"""


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(tiny_llama, tiny_llama_dir, tmp_path, kill_when, one_thread,
                                                             monkeypatch, knows_all):
    n = 16  # every fact: the killed run is still well short of its end when its first fact is saved
    facts = _write_facts(tmp_path / "facts.jsonl")
    killed = tmp_path / "killed"
    pieces = killed / "recall-partial"
    kill_when(["-c", KILL_CODE, tiny_llama_dir, str(facts), json.dumps(CFG), str(n), str(killed)],
              lambda: any(pieces.glob("fact-*.json")))
    done = len(list(pieces.glob("fact-*.json")))
    assert 0 < done < n, "killed after the run had finished; give it more work"
    calls = _count_recalls(monkeypatch)
    cfg = RecallConfig(**CFG)
    resumed = recall_dataset(tiny_llama, n=n, cfg=cfg, facts=load_facts(facts), checkpoint=killed)
    assert calls[0] == n - done  # only the facts the killed run had not finished
    straight = recall_dataset(tiny_llama, n=n, cfg=cfg, facts=load_facts(facts))
    assert _same(resumed, straight)
    assert not [p for p in killed.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
