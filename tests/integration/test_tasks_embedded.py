"""The built-in tasks on the embedded SmolLM2-135M-Instruct: the model does each task.

Thresholds leave margin below what was measured (CPU, float32, the seeds and sizes below;
measured figures in comments). Sizes are small to keep this file under about a minute.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.tasks import evaluate_task, get_task

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def model(embedded):
    return embedded  # loaded once per session (tests/conftest.py)


def run(model, name: str, n: int, **kw) -> dict:
    torch.manual_seed(0)
    batch = get_task(name).build(model.tokenizer, n=n, seed=0, **kw)
    return evaluate_task(model, batch)


def test_ioi(model):
    r = run(model, "ioi", 16)
    assert r["clean_accuracy"] >= 0.85  # measured 1.00 (0.99 at n=100)
    assert r["clean_metric"] > 2.5  # measured 3.8 (5.1 at n=100)
    assert r["clean_metric"] - r["corrupt_metric"] > 2.5  # ABC corrupt: measured -1.2 (-0.06 at n=100)
    assert r["dropped"] == {}


def test_greater_than(model):
    r = run(model, "greater-than", 12)
    assert r["clean_accuracy"] >= 0.8  # measured 1.00
    assert r["clean_metric"] > 0.25  # measured 0.45 (0.52 at n=100)
    assert r["corrupt_metric"] < r["clean_metric"] - 0.5  # measured -0.81 (-0.76 at n=100)


def test_induction(model):
    batch = get_task("induction").builder(model.tokenizer, n=8, seed=0, length=12)
    r = evaluate_task(model, batch)
    assert r["clean_metric"] > r["corrupt_metric"] + 4.0  # measured -5.7 vs -13.4
    assert r["clean_accuracy"] > 0.2 and r["corrupt_accuracy"] < 0.05  # measured 0.34, 0.00


def test_facts(model):
    r = run(model, "facts", 24)
    assert r["clean_accuracy"] >= 0.75  # measured 0.96 on 23 kept (0.89 on all facts)
    assert r["clean_metric"] > 2.5  # measured 5.2 (5.7 on all facts)
    assert r["corrupt_metric"] < 0  # the swapped subject's attribute wins


def test_docstring(model):
    r = run(model, "docstring", 24)
    assert r["dropped"] == {}
    assert r["clean_accuracy"] >= 0.8  # measured 0.96 (0.96, 0.97, 1.00 at n=100, seeds 0-2)
    assert r["clean_metric"] > 2.5  # measured 4.4 (3.7, 4.4, 4.4 at n=100)
    # random_random corrupt: the answer is gone, the wrong argument stays. Measured accuracy
    # 0.08, metric -2.9 (0.09 / -3.1 at n=100).
    assert r["corrupt_accuracy"] <= 0.3 and r["corrupt_metric"] < 0
    assert r["clean_metric"] - r["corrupt_metric"] > 4.0  # measured 7.3
