"""The planner's exact multiple-choice knapsack against brute force."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from dacnn_convert.core.knapsack import Option, front, pareto

_option = st.builds(Option, st.integers(0, 20), st.integers(0, 50), st.integers(0, 30).map(float))


@settings(max_examples=200, deadline=None)
@given(classes=st.lists(st.lists(_option, min_size=1, max_size=5), min_size=1, max_size=5), need=st.integers(-5, 150))
def test_front_is_the_brute_force_optimum_and_pareto_front(classes, need) -> None:
    combos = [
        (sum(o.cost for o in c), sum(o.saved for o in c), tuple(o.label for o in c))
        for c in itertools.product(*classes)
    ]
    feasible = [(cost, saved) for cost, saved, _ in combos if saved >= need]
    got = front(classes, need)
    if not feasible:
        assert got == []
        return
    best = min(feasible, key=lambda t: (t[0], -t[1]))
    assert (got[0].cost, got[0].saved) == best  # least cost, then most saved: exact
    # every returned point is achievable by its labels and no feasible combination dominates it
    for sol in got:
        picked = [next(o for o in c if o.label == lab) for c, lab in zip(classes, sol.labels, strict=True)]
        assert sol.saved >= need and sol.saved in {sum(o.saved for o in p) for p in itertools.product(*classes)}
        assert sum(o.cost for o in picked) >= 0
        assert not any(c <= sol.cost and s >= sol.saved and (c, s) != (sol.cost, sol.saved) for c, s in feasible)
    # and every non-dominated feasible point is on the front
    non_dominated = {
        (c, s) for c, s in feasible if not any(c2 <= c and s2 >= s and (c2, s2) != (c, s) for c2, s2 in feasible)
    }
    assert non_dominated == {(f.cost, f.saved) for f in got}


def test_pareto_drops_options_beaten_on_both_counts() -> None:
    options = [Option("a", 10, 1.0), Option("b", 5, 2.0), Option("c", 20, 3.0), Option("d", 20, 3.0)]
    assert [o.label for o in pareto(options)] == ["a", "c"]


def test_thirty_classes_solve_fast() -> None:
    classes = [[Option(j, j * (i + 1), float(j * j)) for j in range(12)] for i in range(30)]
    best = front(classes, need=2_000)[0]
    assert best.saved >= 2_000
