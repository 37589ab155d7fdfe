"""The LoRA-kernel charts: rank-32-over-16 ratios per point, one SVG per model, one colour per series everywhere."""
from __future__ import annotations

import csv
import json
import re

import pytest

from adaptwin.profiler.adapters_plot import Panel, small_multiples
from adaptwin.profiler.lora_kernels_plot import main, rank_ratios

FIELDS = ["model", "max_lora_rank", "max_loras", "distinct", "tokens", "ms", "mode"]


def _rows(model: str = "m") -> list[dict]:
    """rank 16: 1 + tokens/100 ms; rank 32: 1.5× that below 128 tokens, 1.1× from 128; one point only at rank 32."""
    rows = []
    for ml in (8, 64):
        for d in (1, 4):
            for t in (16, 64, 128, 256):
                base = 1 + t / 100
                rows.append(dict(model=model, max_lora_rank=16, max_loras=ml, distinct=d, tokens=t, ms=base))
                rows.append(dict(model=model, max_lora_rank=32, max_loras=ml, distinct=d, tokens=t,
                                 ms=base * (1.5 if t < 128 else 1.1)))
    rows.append(dict(model=model, max_lora_rank=32, max_loras=8, distinct=1, tokens=512, ms=9.0))
    return rows


def test_rank_ratios_pairs_each_point_with_rank_16():
    r = rank_ratios(_rows(), "m")
    assert sorted(r) == [8, 64] and sorted(r[8]) == [1, 4]
    assert [t for t, _ in r[8][1]] == [16, 64, 128, 256]  # the 512-token point has no rank-16 twin
    assert [v for _, v in r[64][4]] == pytest.approx([1.5, 1.5, 1.1, 1.1])
    assert rank_ratios(_rows(), "other") == {}


def test_main_writes_one_chart_per_model(tmp_path, capsys):
    path = tmp_path / "k.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({**r, "mode": "graph"} for r in _rows("a") + _rows("b"))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 0
    plots = json.loads(capsys.readouterr().out)["plots"]
    assert [p.rsplit("/", 1)[1] for p in plots] == ["rank32_vs_16__a.svg", "rank32_vs_16__b.svg"]
    svg = (tmp_path / "out" / "rank32_vs_16__a.svg").read_text()
    assert "max_loras 8" in svg and "max_loras 64" in svg and "4 adapters" in svg


def test_a_series_keeps_its_legend_colour_in_panels_that_lack_others():
    svg = small_multiples([Panel("p1", {"x": [(1, 1.0), (2, 2.0)], "y": [(1, 2.0), (2, 3.0)]}),
                           Panel("p2", {"y": [(1, 1.0), (2, 1.5)]})], "x", "y")
    legend = dict(re.findall(r'fill="(#[0-9a-f]{6})"/>\s*<text[^>]*>(\w)</text>', svg))
    strokes = re.findall(r'<polyline [^>]*stroke="(#[0-9a-f]{6})"', svg)
    assert len(strokes) == 3 and legend[strokes[0]] == "x" and legend[strokes[1]] == "y" == legend[strokes[2]]
