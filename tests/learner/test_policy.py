"""The policy's rules on their own: twin verdicts per workload signature, the starvation-boundary search, and the
warm-up gate. The model is a fixed table and the twin a closed-form capacity law, so every expected answer is known
(the real twin and real replay windows are in test_stream.py)."""

from __future__ import annotations

from adaptwin.learner.online import StreamPrediction
from adaptwin.learner.policy import Policy, PolicyConfig
from adaptwin.learner.verdicts import VerdictBook, boundary_search
from adaptwin.learner.workload import Workload

MODEL = "llama-3.1-8b-instruct"
GRID = (16, 32, 64, 128, 256)


class _Table:
    """Predictions from a table (served, max_loras) -> (throughput, starvation probability)."""

    def __init__(self, table: dict, n_learned: int = 100) -> None:
        self.table, self.n_learned, self.warmed = table, n_learned, []

    def predict(self, x: dict) -> StreamPrediction:
        thr, p = self.table.get((int(x["served"]), int(x["max_loras"])), (1.0, 1.0))
        return StreamPrediction(thr, 0.97 * thr, 1.03 * thr, thr, 0.0, p)

    def warm(self, runs) -> int:
        self.warmed += list(runs)
        return len(runs)


class _Twin:
    """Each adapter offers 100 tok/s; a server completes at most 40·max_loras + 2,000 tok/s and starves at ≤ 90 % of
    its offered load; more than 64 slots do not start."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, wl: Workload, served: int, max_loras: int, duration: float):
        self.calls.append((served, max_loras))
        if max_loras > 64:
            return None  # cannot start
        offered, cap = 100.0 * served, 40.0 * max_loras + 2000.0
        return min(offered, cap), int(min(offered, cap) <= 0.9 * offered)


def _wl(rate: float = 0.1, n: int = 32) -> Workload:
    return Workload(MODEL, (rate,) * n, (8, 16), 16, 180.0)


def test_boundary_search_finds_each_slot_values_boundary_with_fewer_runs_than_the_grid():
    book, twin = VerdictBook(), _Twin()
    book.observe(_wl())
    runs = boundary_search(book, twin, GRID, 600.0, budget_s=60.0)
    # capacity 2,640 / 3,280 / 4,560 tok/s with 16 / 32 / 64 slots: the boundary is served 16 / 32 / none (64 starves)
    confirmed = {k for k in book.answers if book.confirmed(k)}
    assert confirmed == {(16, 16), (32, 32)}
    assert book.refuted((32, 16)) and book.refuted((64, 32)) and book.refuted((64, 64))
    assert book.asked((128, 128)) and book.verdict((128, 128)) is None  # refused: cannot start
    full = sum(1 for s in GRID for m in GRID if m <= s)
    assert runs == len(twin.calls) == len(set(twin.calls)) < full  # nothing asked twice, less than the grid
    # a second search of the same traffic costs nothing
    assert boundary_search(book, twin, GRID, 600.0, budget_s=60.0) == 0


def test_twin_answers_stand_for_the_same_traffic_and_come_back_with_it():
    book = VerdictBook()
    assert book.observe(_wl(0.1)) is True
    book.record((64, 16), (3000.0, 1))
    assert book.observe(_wl(0.11)) is False and book.refuted((64, 16))  # +10 %: the same traffic
    assert book.observe(_wl(0.2)) is True and not book.asked((64, 16))  # ×2: new traffic, nothing known
    assert book.observe(_wl(0.1)) is True and book.refuted((64, 16))  # back: its answers are found again


def test_policy_never_recommends_what_the_twin_refuted_and_changes_only_to_confirmed():
    # the model is sure (p = 0) that (64, 64) is the best; the twin found it starves: never recommended
    model = _Table({(64, 64): (6400.0, 0.0), (32, 32): (3200.0, 0.0), (16, 16): (1600.0, 0.0)})
    twin = _Twin()
    pol = Policy(PolicyConfig(grid=GRID, twin_per_window=2, explore_budget_s=0))
    win = {"served": 16, "max_loras": 16}
    seen = []
    for _ in range(6):
        d = pol.decide(model, _wl(), win, ask_twin=twin)
        seen.append((d.served, d.max_loras))
        win = {"served": d.served, "max_loras": d.max_loras}
    assert (64, 64) not in seen and pol.book.refuted((64, 64))
    assert all(pol.book.confirmed(c) for c in seen)
    assert seen[-1] == (32, 32) and sum(a != b for a, b in zip(seen, seen[1:])) <= 1
    assert len(twin.calls) == len(set(twin.calls))  # every answer cached


def test_running_configuration_is_kept_until_the_model_has_learned_enough_windows():
    cfg = PolicyConfig(grid=GRID, twin_per_window=0, min_windows=5)
    model = _Table({(128, 16): (9000.0, 0.0), (32, 16): (3000.0, 0.0)}, n_learned=2)
    pol = Policy(cfg)
    d = pol.decide(model, _wl(), {"served": 32, "max_loras": 16})
    assert (d.served, d.max_loras, d.changed) == (32, 16, False)
    assert "kept the running configuration: model warming up (2 of 5 windows learned)" in d.reason
    model.n_learned = 5
    d = pol.decide(model, _wl(), {"served": 32, "max_loras": 16})
    assert (d.served, d.max_loras, d.changed) == (128, 16, True)
