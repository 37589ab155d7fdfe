"""Real WINDOW records for the streaming learner's tests: a trace with a traffic shift, replayed on the twin.

``shift_trace`` writes a CSV trace (Poisson arrivals per adapter, ShareGPT lengths of the model) whose traffic changes
at ``shift_s``: every rate doubles, new adapters appear, and the popularity skew changes. ``replay_windows`` runs the
real replay engine (``adaptwin.replay``) with the twin backend over it and returns the WINDOW records it emits.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

MODEL = "llama-3.1-8b-instruct"
SHARED = Path(__file__).resolve().parents[3] / "shared"
WARM_FILE = SHARED / "data" / "validation" / "ml_train_sim.csv.gz"


def shift_trace(path: Path, duration_s: float = 1800.0, shift_s: float = 900.0, adapters: int = 24,
                new_adapters: int = 8, rate: float = 0.12, seed: int = 0) -> Path:
    """Before ``shift_s``: ``adapters`` adapters, rates in a 2:1 skew around ``rate`` req/s; after: every rate ×2,
    ``new_adapters`` more adapters at the doubled mean rate, and the skew reversed (the quiet half gets busier)."""
    from adaptwin.twin.lengths import load_lengths

    rng = np.random.default_rng(seed)
    lengths = load_lengths(MODEL)
    before = np.array([rate * (4 / 3 if k % 2 == 0 else 2 / 3) for k in range(adapters)])
    after = np.concatenate([2 * before[::-1], np.full(new_adapters, 2 * rate)])
    rows = []
    for start, end, rates in ((0.0, shift_s, before), (shift_s, duration_s, after)):
        for k, r in enumerate(rates):
            n = rng.poisson(r * (end - start))
            for t in np.sort(rng.uniform(start, end, n)):
                rows.append((float(t), f"lora-{k}"))
    rows.sort()
    prompt, output = lengths.sample(rng, len(rows))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ts", "adapter_id", "prompt_tokens", "output_tokens"])
        for (t, a), p, o in zip(rows, prompt.tolist(), output.tolist()):
            w.writerow([f"{t:.4f}", a, int(p), int(o)])
    return path


def replay_windows(trace: Path, served: int, max_loras: int, run_id: str, window_s: float = 60.0) -> list[dict]:
    """WINDOW records (scope window, then the run record) of a twin replay of ``trace``."""
    from adaptwin.ingest.source import IngestConfig
    from adaptwin.replay.backends.twin import TwinBackend
    from adaptwin.replay.engine import Replay, ReplayOptions
    from adaptwin.replay.source import FileSource
    from adaptwin.replay.telemetry import MemoryEmitter
    from adaptwin.twin.profile import load_profile

    emitter = MemoryEmitter()
    options = ReplayOptions(run_id=run_id, served=served, max_loras=max_loras, model=MODEL, ranks=(8, 16),
                            window_s=window_s, discover_s=0.0, source_name=str(trace))
    source = FileSource(IngestConfig(trace=str(trace), format="csv", ranks=(8, 16), run_id=run_id))
    try:
        Replay(options, source, TwinBackend(profile=load_profile(MODEL), window_s=window_s), emitter,
               progress=False).run()
    finally:
        source.close()
    return emitter.windows
