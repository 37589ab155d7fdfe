"""Regression against a few real vLLM runs (scenarios_table1.csv): the twin must stay within tolerance of them.

Tolerances are wider than the fleet-wide errors in docs/twin.md because single runs carry Poisson and length noise
(about 3 % on a light hour) that averages out only over many runs.
"""

import pytest

from adaptwin.twin.runner import run_scenario

from .conftest import LLAMA, QWEN

# model, rates, ranks, served, max_loras, max_lora_rank, real throughput, real mean ITL (ms), real starved
REAL_RUNS = [
    (LLAMA, [0.1, 0.05, 0.025], [8, 16], 64, 16, 16, 1603.51, 23.15, 0),
    (QWEN, [0.1, 0.05, 0.025], [8, 16, 32], 128, 16, 32, 3092.32, 27.78, 0),
    (LLAMA, [1.6, 0.8, 0.4], [8, 16], 128, 16, 16, 12954.7, 104.29, 1),
    (QWEN, [1.6, 0.8, 0.4], [8, 16, 32], 64, 32, 32, 13476.0, 149.43, 1),
]


@pytest.mark.parametrize("model, rates, ranks, served, slots, mlr, thr, itl, starved", REAL_RUNS)
def test_close_to_real_run(model, rates, ranks, served, slots, mlr, thr, itl, starved):
    s = run_scenario(model, rates, ranks, served, slots, mlr, duration=3600, seed=0).summary()
    assert s["total_throughput"] == pytest.approx(thr, rel=0.08)
    assert s["mean_itl_ms"] == pytest.approx(itl, rel=0.25)
    assert s["starved"] == starved
