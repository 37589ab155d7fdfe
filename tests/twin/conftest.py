import numpy as np
import pytest

from adaptwin.twin import Arrivals, ServerConfig

LLAMA = "llama-3.1-8b-instruct"
QWEN = "qwen-2.5-7b-instruct"


def make_arrivals(n, served, rate=5.0, seed=0, max_prompt=900, max_out=400):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return Arrivals(t, rng.integers(0, served, size=n), rng.integers(4, max_prompt, size=n),
                    rng.integers(4, max_out, size=n))


@pytest.fixture
def small_config():
    return ServerConfig(model=LLAMA, served=8, max_loras=4, adapter_ranks=(8, 16) * 4)
