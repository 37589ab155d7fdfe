"""The traces shipped as package data, by short name, and token-length pools drawn from them."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from adaptwin.cliutil import UserError

SHIPPED = {
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "mooncake-conversation": "mooncake_conversation_trace.jsonl",
    "mooncake-synthetic": "mooncake_synthetic_trace.jsonl",
    "servegen-m-small": "servegen_m-small",
    "servegen-deepseek-r1": "servegen_deepseek-r1",
}


def shipped_path(name: str) -> Path:
    """The file (or ServeGen directory) of a shipped trace."""
    if name not in SHIPPED:
        raise UserError(f"no shipped trace {name!r}; shipped traces are {', '.join(SHIPPED)}")
    # The package is installed as plain files (editable or wheel), so the resource is a real path.
    return Path(str(files("adaptwin.ingest") / "traces" / SHIPPED[name]))


@dataclass(frozen=True)
class TraceLengths:
    """Paired (prompt, output) token counts of a trace; ``sample`` draws pairs with replacement."""

    prompt: np.ndarray
    output: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.integers(0, len(self.prompt), size=n)
        return self.prompt[pick], self.output[pick]


def trace_lengths(name: str) -> TraceLengths:
    """The length pool of a shipped Azure or Mooncake trace (every row; they are all valid)."""
    from adaptwin.ingest.readers.base import ReaderOptions

    if name.startswith("azure-"):
        from adaptwin.ingest.readers.azure import AzureReader as reader_cls
    elif name.startswith("mooncake-"):
        from adaptwin.ingest.readers.mooncake import MooncakeReader as reader_cls
    else:
        raise UserError(f"lengths={name!r}: token lengths come from azure-code, azure-conv, "
                        "mooncake-conversation or mooncake-synthetic (ServeGen has no lengths)")
    reader = reader_cls(shipped_path(name), ReaderOptions())
    pairs = [(int(r.values[1]), int(r.values[2])) for r in reader.rows()]
    arr = np.asarray(pairs, dtype=np.int64)
    return TraceLengths(prompt=arr[:, 0], output=arr[:, 1])
