"""Successive halving on synthetic rung figures with a known front (csc.sweep.halving), no Ray."""

import itertools
import random

import pytest

from csc.sweep.halving import (CONTINUE, STOP, SuccessiveHalving, crowding_distance, dominates, epsilon_net, fronts,
                               milestones, rank)

MO = [("nmse", "min"), ("loc", "max")]


def _halving(figures=MO, rf=3.0, grace=60, max_t=160, tie_break="epsilon_net") -> SuccessiveHalving:
    """The epsilon-net by default here: the orders these tests work out by hand are its."""
    return SuccessiveHalving(figures, grace, rf, max_t, tie_break)


def _judge(h: SuccessiveHalving, n: int, step: int, **figures) -> str:
    return h.judge(f"trial_{n:02d}", step, figures)


def test_fronts_and_domination_lower_is_better():
    points = [[1, 5], [2, 2], [5, 1], [3, 3], [6, 6], [2, 2]]
    assert dominates([1, 1], [1, 2]) and not dominates([1, 2], [1, 2]) and not dominates([1, 3], [2, 1])
    assert fronts(points) == [[0, 1, 2, 5], [3], [4]]


def test_epsilon_net_starts_at_the_best_first_figure_and_spreads():
    points = [[0.0, 1.0], [0.1, 0.9], [0.5, 0.5], [1.0, 0.0]]
    # best first figure (0), then the farthest from it (3), then the farthest from both (2), then 1
    assert epsilon_net(points, [0, 1, 2, 3]) == [0, 3, 2, 1]
    # equal points: arrival (index) order
    assert epsilon_net([[1.0, 1.0]] * 3, [0, 1, 2]) == [0, 1, 2]


def test_crowding_distance_puts_the_ends_first_then_the_loneliest():
    points = [[0.0, 1.0], [0.1, 0.9], [0.5, 0.5], [1.0, 0.0], [0.55, 0.45]]
    order = crowding_distance(points, list(range(5)))
    assert set(order[:2]) == {0, 3}
    # inner distances: 1: (0.5 - 0) * 2 = 1.0, 2: (0.55 - 0.1) * 2 = 0.9, 4: (1 - 0.5) * 2 = 1.0 -> 1, 4, then 2
    assert order[2:] == [1, 4, 2]
    # two trials are both ends of both figures: the lower sum of figures first, whatever the order of arrival
    assert crowding_distance([[0.0, 0.9], [0.3, 0.3]], [0, 1]) == [1, 0]
    assert crowding_distance([[0.3, 0.3], [0.0, 0.9]], [0, 1]) == [0, 1]


def test_rank_orders_fronts_first():
    order, front_of = rank([[3, 6], [1, 5], [5, 1], [6, 6]])
    assert front_of == [1, 0, 0, 2]
    assert order[-2:] == [0, 3] and set(order[:2]) == {1, 2}


def test_milestones_stay_below_the_last_step():
    assert milestones(60, 3, 160) == [60]
    assert milestones(60, 3, 180) == [60]
    assert milestones(60, 3, 181) == [60, 180]
    assert milestones(10, 2, 100) == [10, 20, 40, 80]


def test_known_front_stops_exactly_the_dominated_trials():
    """Nine trials arrive at the rung one by one; the first front is trials 1, 4, 7 (a trade of nmse against
    locality); each later trial is kept if it is in the top third of those at the rung so far."""
    h = _halving()
    figures = {1: (0.30, 1.0), 2: (0.40, 0.9), 3: (0.50, 0.8), 4: (0.35, 1.4), 5: (0.45, 1.1), 6: (0.60, 0.7),
               7: (0.25, 0.9), 8: (0.70, 1.3), 9: (0.41, 1.2)}
    decisions = {n: _judge(h, n, 60, nmse=a, loc=b) for n, (a, b) in figures.items()}
    # 1: alone -> on. 2: dominated by 1, place 1 (0-based) of 2, not < 2/3 -> stop. 3: dominated -> stop. 4: first
    # front with 1 (1 seeds the epsilon-net, best nmse; 4 next), place 1 < 4/3 -> on. 5: dominated by 4 -> stop.
    # 6: stop. 7: best nmse, seeds the net: place 0 -> on. 8 and 9: dominated by 4 -> stop.
    assert decisions == {1: CONTINUE, 2: STOP, 3: STOP, 4: CONTINUE, 5: STOP, 6: STOP, 7: CONTINUE, 8: STOP,
                         9: STOP}
    assert h.stop_reason("trial_05") == ("stopped at the rung at step 60 (reported at step 60): nmse 0.45, loc 1.1; on "
                                    "front 2, dominated by trial_04; placed 4 of the 5 trials at that rung, and only "
                                    "the top 1/3 (2) continue")
    assert h.stop_reason("trial_07") is None
    assert h.record_of("trial_08").dominated_by == ["trial_04"]
    assert h.record_of("trial_03").dominated_by == ["trial_01", "trial_02"] and h.record_of("trial_03").rung == 60


@pytest.mark.parametrize("tie_break", ["epsilon_net", "crowding_distance"])
def test_a_trial_on_the_first_front_can_lose_the_tie_break(tie_break):
    """A and B are the ends of the front; C, close to A, adds least spread: both tie breaks put it last."""
    h = _halving(tie_break=tie_break)
    assert [_judge(h, 1, 60, nmse=0.1, loc=1.0), _judge(h, 2, 60, nmse=1.0, loc=2.0),
            _judge(h, 3, 60, nmse=0.12, loc=1.05)] == [CONTINUE, STOP, STOP]
    assert h.record_of("trial_03").front == 0 and h.record_of("trial_03").dominated_by == []
    assert f"on the first front, placed after the others there by the {tie_break.replace('_', ' ')}" in \
        h.stop_reason("trial_03")


def test_a_decision_stands_and_a_stopped_trial_stays_stopped():
    h = _halving(grace=20, rf=2, max_t=100)  # rungs at 20, 40, 80
    assert _judge(h, 1, 20, nmse=0.5, loc=1.0) == CONTINUE
    assert _judge(h, 2, 20, nmse=0.6, loc=0.9) == STOP
    # trained through the rung again (a resume from an earlier checkpoint), with other figures: the same decision
    assert _judge(h, 2, 20, nmse=0.1, loc=9.0) == STOP
    assert _judge(h, 2, 60, nmse=0.1, loc=9.0) == STOP  # and never judged at a later rung
    assert _judge(h, 1, 20, nmse=0.9, loc=0.1) == CONTINUE  # not judged twice at one rung
    assert _judge(h, 1, 30, nmse=0.9, loc=0.1) == CONTINUE  # between rungs: nothing to judge
    assert [len(h.rungs[m]) for m in (20, 40, 80)] == [2, 0, 0]
    # a report that skips rungs is judged at the highest it reached, once
    assert _judge(h, 3, 60, nmse=0.4, loc=1.0) == CONTINUE
    assert [r.trial for r in h.rungs[40]] == ["trial_03"] and h.rungs[40][0].step == 60
    # a trial whose first report past a rung is its last step has nothing left to stop: not judged
    assert _judge(h, 4, 100, nmse=0.9, loc=0.1) == CONTINUE and h.n_records == 3


def test_a_trial_that_reaches_a_rung_late_is_compared_with_all_before_it():
    h = _halving(figures=[("ev", "max")], rf=2)
    for n, ev in enumerate([0.5, 0.6, 0.7, 0.8], start=1):
        _judge(h, n, 60, ev=ev)
    # late, with ev 0.55: place 3 (0-based) of five, not < 5/2 -> stop; 0.65 of six: place 2 < 3 -> on
    assert _judge(h, 5, 60, ev=0.55) == STOP
    assert _judge(h, 6, 60, ev=0.65) == CONTINUE
    assert h.stop_reason("trial_05").endswith("behind trial_02, trial_03, trial_04; placed 4 of the 5 trials at that "
                                         "rung, and only the top 1/2 (3) continue")


def test_ties_keep_the_order_of_arrival():
    h = _halving(figures=[("ev", "max")], rf=2)
    # place n - 1 of n: only the first is in the top half
    assert [_judge(h, n, 60, ev=0.5) for n in range(1, 5)] == [CONTINUE, STOP, STOP, STOP]
    assert h.stop_reason("trial_02").split("; ")[1] == "tied with the trials before it"
    # the same with two figures, on the first front
    h = _halving(rf=2)
    assert [_judge(h, n, 60, nmse=0.5, loc=1.0) for n in range(1, 5)] == [CONTINUE, STOP, STOP, STOP]


def test_missing_figure_is_named():
    with pytest.raises(ValueError, match=r"trial_01 reported no loc at step 60: the scheduler ranks on it"):
        _judge(_halving(), 1, 60, nmse=0.5)


@pytest.mark.parametrize("tie_break", ["epsilon_net", "crowding_distance"])
def test_state_round_trips_through_json_and_goes_on_alike(tie_break):
    rng = random.Random(0)
    arrivals = [(n, 60 if n < 12 else 80, rng.random(), rng.random()) for n in range(20)]
    whole = _halving(grace=30, rf=2, max_t=200, tie_break=tie_break)
    split = _halving(grace=30, rf=2, max_t=200, tie_break=tie_break)
    for k, (n, step, a, b) in enumerate(arrivals):
        if k == 10:  # the driver dies: what comes back is the log, its last line cut short by the kill
            split = SuccessiveHalving.from_log(split.log() + '{"rung": 60, "trial": "trial_9')
        assert _judge(whole, n, step, nmse=a, loc=b) == _judge(split, n, step, nmse=a, loc=b)
    assert whole.log() == split.log()
    with pytest.raises(ValueError):  # a broken line that is not the last is not a kill's: refused
        SuccessiveHalving.from_log(whole.log().replace('"rung"', '"rung', 1))


def test_the_top_share_continues_whatever_the_arrival_order():
    """With every trial at the rung, the ones that continue are those whose place on arrival was in the top
    1/rf; the first trial to arrive always continues, and a trial on no rung's first front never beats one that
    dominates it that arrived before it."""
    pts = [(0.1 * i, 1.0 - 0.1 * i) for i in range(5)] + [(0.9, 0.1), (0.8, 0.3), (0.7, 0.2)]
    for order in itertools.islice(itertools.permutations(range(len(pts))), 0, 400, 37):
        h = _halving(rf=2)
        out = {n: _judge(h, n, 60, nmse=pts[n][0], loc=-pts[n][1]) for n in order}
        assert out[order[0]] == CONTINUE
        for n in out:
            if out[n] == CONTINUE:
                before = order[:order.index(n)]
                assert not any(dominates(list(pts[m]), list(pts[n])) and out[m] == STOP for m in before)
