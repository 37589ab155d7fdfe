"""Atomic checkpoints of the streaming learner's state (models, policy, drift detector, consumed offsets).

The state is pickled (river estimators are plain Python objects; their random generators are pickled with them, so
a restored learner continues exactly as the original would have) and written as ``state.pkl.tmp``, fsynced, renamed
over ``state.pkl`` and the directory fsynced: a reader finds the previous checkpoint or the new one, never half of
one. ``meta.json`` beside it says what the checkpoint holds, for people and for ``adaptwin learn`` to check that
the checkpoint belongs to the same stream options.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> save(d, {"offsets": {0: 12}, "n": 3}, {"windows_learned": 3})
>>> load(d)["offsets"]
{0: 12}
>>> read_meta(d)["windows_learned"]
3
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from adaptwin.durable import fsync_dir, write_bytes_atomic

__all__ = ["CheckpointError", "load", "read_meta", "save"]

STATE = "state.pkl"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be read."""


def save(directory: str | os.PathLike, state: Any, meta: dict) -> None:
    """Write ``state`` (pickled) and ``meta`` (JSON) into ``directory``, each atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(d / STATE, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    write_bytes_atomic(d / META, (json.dumps(meta, sort_keys=True) + "\n").encode())
    fsync_dir(d)


def load(directory: str | os.PathLike) -> Any | None:
    """The state of the last checkpoint in ``directory``, or None when there is none."""
    path = Path(directory) / STATE
    if not path.exists():
        return None
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); move it away to "
                              "start learning from scratch (the stream is then re-read from its beginning)") from None


def read_meta(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / META
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
