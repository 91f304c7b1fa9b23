"""Few-shot ICL on the embedded SmolLM2-135M-Instruct: the model does the antonym task well
above chance, and blocking the final position's attention to the examples' outputs (Y_i) in
upper layers lowers p(answer) (-0.28 measured on these 2 prompts) while as many random edges do not, and the same block in the
first layers does little (the README's figures come from larger CLI runs). Small sizes: 8
prompts, 2 knocked out, windows centred on layers 0, 10, 20."""

from __future__ import annotations

import pytest

from mechscope.icl import FewShotConfig, fewshot_knockout

pytestmark = pytest.mark.embedded


def test_aggregation_knockout_hurts_in_upper_layers_only(embedded):
    cfg = FewShotConfig(task="antonyms", shots=4, n=8, max_knockout=2, layer_stride=10, sweeps=("aggregation",))
    res = fewshot_knockout(embedded, cfg)
    assert res.accuracy >= res.chance + 0.3, (res.accuracy, res.chance)
    c = res.curves["aggregation"]
    assert res.layers == [0, 10, 20]
    assert c["effect"][2] < -0.15 and c["effect"][2] < c["control"][2] - 0.1, c  # measured -0.28 vs -0.00
    assert abs(c["effect"][0]) < abs(c["effect"][2]) / 2, c
