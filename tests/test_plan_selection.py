"""Plan selection at extreme ratios: one candidate per bit floor, each within budget, the best after a
short recovery kept."""

import numpy as np
import torch

import compressc
from compressc.plan import LayerSettings, Plan
from compressc.plan_selection import candidate_plans, select_plan, with_bit_floor
from compressc.search.problem import Budget, Problem
from compressc.solvers.base import get_solver
from compressc.spec import Finetune
from tests.test_recovery import PLAN, X, _data, _net, distance_score


def _problem():
    # two tensors: at a tight budget, "2 bits everywhere" and "4 bits on one, 1 bit on the other" compete
    return Problem.from_table(options=[(32, 4, 2, 1), (32, 4, 2, 1)], distortion=[(0, .1, .2, .9), (0, .1, .2, .9)],
                              bytes_table=[(320, 40, 20, 10), (320, 40, 20, 10)])


def test_each_candidate_meets_the_budget_and_respects_its_floor():
    p, budget = _problem(), Budget(bytes=60)
    solver = get_solver("convex")
    plans = candidate_plans(p, budget, lambda q: solver.solve(q, budget, np.random.default_rng(0)), count=5)
    assert any(label.startswith("uniform") for label, _ in plans)
    assert plans[0][0] == "solver" and len({str(pl.to_dict()) for _, pl in plans}) == len(plans)
    for label, plan in plans:
        assert p.bytes(p.choice_of(plan)) <= budget.bytes
        if label.startswith(">="):
            floor = int(label.split()[1])
            assert all(s.bits >= floor for s in plan.layers.values())
        elif label.startswith("uniform"):
            assert {s.bits for s in plan.layers.values()} == {int(label.split()[1])}
    assert with_bit_floor(p, 4).feasible(with_bit_floor(p, 4).most_compressed(), Budget(bytes=80))
    assert candidate_plans(p, budget, lambda q: solver.solve(q, budget, np.random.default_rng(0)), count=1) == plans[:1]


def test_select_plan_keeps_the_best_recovered_candidate():
    net = _net()
    data = _data(4)
    evaluate = distance_score(net, torch.cat([b[0] for b in data]))
    g = compressc.trace(net, (X,))
    gentle = Plan(layers={name: LayerSettings(bits=8) for name in PLAN.layers})
    plan, scores = select_plan(g, [("harsh", PLAN), ("gentle", gentle)], data, Finetune(epochs=10, probe_epochs=1),
                               evaluate)
    assert [s["candidate"] for s in scores] == ["harsh", "gentle"]
    assert plan == gentle and scores[1]["score"] > scores[0]["score"]
