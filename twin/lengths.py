"""Empirical request lengths: the paper's ShareGPT prompt pool, per model, as paired (prompt, output) token counts.

The paper's twin re-draws each request's lengths from a Normal clipped at 1 and 2 tokens, which lifts the mean from
about 420 to about 465 tokens per request and makes the twin over-predict throughput by 9-11 %. This module instead
serves the real joint distribution: the pairs its benchmark drew from ShareGPT V3 (first turn as prompt, first
answer's length as ``max_tokens``, 4 <= prompt <= 1024, output >= 4, prompt + output <= 2048), counted with each
model's own tokenizer. The tables are data shipped with the package (``adaptwin.twin`` / ``lengths/<model>.npz``),
built by :mod:`adaptwin.profiler.lengths_build`; docs/lengths.md tells how and how they compare with the real runs.

>>> import numpy as np
>>> table = load_lengths("llama-3.1-8b-instruct")
>>> prompt, output = table.sample(np.random.default_rng(0), 3)
>>> prompt.shape, output.shape
((3,), (3,))
>>> bool(((prompt >= 4) & (prompt <= 1024) & (prompt + output <= 2048)).all())
True
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import numpy as np

__all__ = ["LengthTable", "UnknownModelError", "known_models", "load_lengths"]

_PACKAGE = "adaptwin.twin"
_FOLDER = "lengths"


class UnknownModelError(ValueError):
    """No length table ships for the model asked for."""


@dataclass(frozen=True, eq=False)
class LengthTable:
    """Paired token lengths of one model's request population: ``prompt[i]`` goes with ``output[i]``.

    ``output`` is the request's ``max_tokens`` (the reference answer's length), as the paper's client sent it.
    The arrays are kept read-only, as int64 so that sums never overflow.
    """

    model: str
    prompt: np.ndarray
    output: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        prompt = np.array(self.prompt, dtype=np.int64)
        output = np.array(self.output, dtype=np.int64)
        if prompt.ndim != 1 or prompt.shape != output.shape or prompt.size == 0:
            raise ValueError(
                f"length table for {self.model!r} needs two non-empty 1-D arrays of equal length, "
                f"got prompt {prompt.shape} and output {output.shape}"
            )
        if (prompt < 1).any() or (output < 1).any():
            raise ValueError(f"length table for {self.model!r} holds a length below 1 token")
        prompt.setflags(write=False)
        output.setflags(write=False)
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "output", output)

    def __len__(self) -> int:
        return int(self.prompt.size)

    @property
    def mean_prompt(self) -> float:
        """Mean prompt tokens per request."""
        return float(self.prompt.mean())

    @property
    def mean_output(self) -> float:
        """Mean output tokens (``max_tokens``) per request."""
        return float(self.output.mean())

    @property
    def mean_total(self) -> float:
        """Mean prompt + output tokens per request (the paper's "pool mean tokens per request")."""
        return self.mean_prompt + self.mean_output

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` paired draws with replacement: ``(prompt_tokens, output_tokens)``, two int64 arrays of length ``n``.

        The same generator state gives the same draws. The paper's client instead deals requests in order from a
        shuffled pool (drawn without replacement while it lasts); that has the same mean and changes only the
        run-to-run spread of a run's mean request length, by at most 0.2 % of the mean at the paper's run sizes
        (docs/lengths.md), so i.i.d. draws stand for it.
        """
        if n < 0:
            raise ValueError(f"cannot draw a negative number of requests ({n})")
        idx = rng.integers(0, self.prompt.size, size=int(n))
        return self.prompt[idx], self.output[idx]


def _resource_dir():
    return resources.files(_PACKAGE).joinpath(_FOLDER)


def known_models() -> list[str]:
    """Models with a shipped length table, sorted."""
    folder = _resource_dir()
    return sorted(p.name[: -len(".npz")] for p in folder.iterdir() if p.name.endswith(".npz"))


@functools.lru_cache(maxsize=None)
def load_lengths(model: str) -> LengthTable:
    """The shipped length table of ``model`` (e.g. ``llama-3.1-8b-instruct``); loaded once, then cached."""
    resource = _resource_dir().joinpath(f"{model}.npz")
    if not resource.is_file():
        known = ", ".join(known_models()) or "none"
        raise UnknownModelError(
            f"no request-length table for model {model!r}; known models: {known}. "
            "Build one with `python -m adaptwin.profiler.lengths_build` (docs/lengths.md)."
        )
    with np.load(io.BytesIO(resource.read_bytes()), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        return LengthTable(model=model, prompt=data["prompt"], output=data["output"], meta=meta)


def apply_early_stop(arrivals, fraction: float, seed: int):
    """Requests sent with ``max_tokens`` = the reference answer's length and ``ignore_eos`` false (the paper's
    client) end early when the model emits EOS first. The real runs show it: Qwen-2.5 generated 4.3 % fewer output
    tokens than the ``max_tokens`` it was sent, Llama-3.1 0.6 % (``benchmarks/twin_fidelity.py --fit``). Each request
    stops early with probability ``fraction``, at a uniform point of its answer (1 … max_tokens − 1 tokens): the
    real runs give only the mean, so the stop point is the least-informed choice; the mean loss is ≈ fraction/2.
    ``fraction`` 0 returns ``arrivals`` unchanged. Drawn from its own stream of ``seed`` so arrival times, adapters
    and prompts are those of the seed without early stop."""
    from adaptwin.twin.config import Arrivals

    if fraction <= 0 or len(arrivals) == 0:
        return arrivals
    rng = np.random.default_rng([int(seed), 0xE05])
    out = arrivals.output.copy()
    stop = (rng.random(out.size) < fraction) & (out > 1)
    u = rng.random(out.size)
    out[stop] = 1 + np.floor(u[stop] * (out[stop] - 1)).astype(out.dtype)
    return Arrivals(arrivals.time, arrivals.adapter, arrivals.prompt, out)
