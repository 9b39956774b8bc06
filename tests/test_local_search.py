"""The shared repair / local-search kernel: every repaired or improved choice fits the exact costs,
improvement never adds distortion, a given distortion table steers it, moot knobs do not count."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from compressc.search.local_search import LocalSearch
from compressc.search.problem import Budget, Problem
from compressc.testing import coupled_problem

CASES = dict(seed=st.integers(0, 10_000), n_layers=st.integers(2, 6), q=st.floats(0.0, 1.0),
             sparsity=st.booleans(), removal=st.booleans())


def _case(seed, n_layers, q, sparsity, removal):
    problem = coupled_problem(seed, n_layers, sparsity=sparsity, overhead=True, removal=removal)
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    return problem, Budget(bytes=int(lo + q * (hi - lo)))


@settings(max_examples=40, deadline=None)
@given(**CASES, start=st.integers(0, 2**16))
def test_repair_and_improve_fit_the_exact_costs(seed, n_layers, q, sparsity, removal, start):
    problem, budget = _case(seed, n_layers, q, sparsity, removal)
    rng = np.random.default_rng(start)
    choice = tuple(int(rng.integers(len(k.options))) for k in problem.knobs)
    search = LocalSearch.on(problem, budget)
    repaired = search.repair(choice)
    assert problem.feasible(repaired, budget)
    offered = search.units.knob_choice(search.unit_choice(choice)) == choice
    if problem.feasible(choice, budget) and offered:  # a choice that fits (and the units offer) stays
        assert repaired == choice
    improved = search.improve(repaired)
    assert problem.feasible(improved, budget)
    assert problem.objective(improved) <= problem.objective(repaired) + 1e-9


def test_a_distortion_table_steers_the_repair():
    p = Problem.from_table(options=[(32, 8, 4, 2)] * 2, distortion=[(0, .1, .2, .9), (0, .1, .2, .9)],
                           bytes_table=[(400, 100, 50, 25)] * 2)
    budget = Budget(bytes=450)
    cheap_first = LocalSearch.on(p, budget, distortion=[(0, 5, 6, 7), (0, .1, .2, .3)]).repair((0, 0))
    assert cheap_first[0] == 0 and p.bytes(cheap_first) <= 450
    other_way = LocalSearch.on(p, budget, distortion=[(0, .1, .2, .3), (0, 5, 6, 7)]).repair((0, 0))
    assert other_way[1] == 0 and p.bytes(other_way) <= 450


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(3, 6))
def test_knobs_a_removed_block_makes_moot_do_not_count(seed, n_layers):
    problem = coupled_problem(seed, n_layers, removal=True)
    search = LocalSearch.on(problem, Budget(bytes=problem.bytes(problem.uncompressed())))
    rng = np.random.default_rng(seed)
    removals = [j for j, k in enumerate(problem.knobs) if k.kind == "remove" and k.covers]
    assert removals
    for _ in range(5):
        choice = list(int(rng.integers(len(k.options))) for k in problem.knobs)
        choice[removals[0]] = 1
        choice = tuple(choice)
        if search.units.knob_choice(search.unit_choice(choice)) == choice:  # the units offer these options
            assert abs(search.objective(choice) - problem.objective(choice)) < 1e-9
