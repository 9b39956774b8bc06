"""Curve interpolation (compiler/search/curves.py): properties of the derived options."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from compressc.search.curves import MAX_GAIN_SPREAD, MAX_STEP, anchors, between, from_local

positive = st.floats(1e-12, 1e3, allow_nan=False, allow_infinity=False)


@given(n=st.integers(2, 12), kind=st.sampled_from(["bits", "sparsity", "keep", "remove"]))
def test_anchors_include_the_most_compressed_option_and_are_valid(n, kind):
    chosen = anchors(kind, n)
    assert chosen == tuple(sorted(set(chosen))) and set(chosen) <= set(range(1, n)) and chosen[-1] == n - 1


@given(local=st.lists(positive, min_size=3, max_size=9), gain=positive)
def test_a_constant_gain_is_reproduced_exactly(local, gain):
    n = len(local) + 1
    local_of = dict(enumerate(local, start=1))
    measured = {i: gain * local_of[i] for i in anchors("bits", n)}
    missing = [i for i in range(1, n) if i not in measured]
    derived = from_local(measured, local_of, missing)
    assert derived is not None
    for i in missing:
        assert math.isclose(derived[i], gain * local_of[i], rel_tol=1e-9)


@given(local=st.lists(positive, min_size=3, max_size=9), gains=st.lists(positive, min_size=2, max_size=2))
def test_derived_gains_stay_between_the_measured_ones_or_nothing_is_derived(local, gains):
    n = len(local) + 1
    local_of = dict(enumerate(local, start=1))
    a = anchors("bits", n)
    measured = {i: g * local_of[i] for i, g in zip(a, gains)}
    derived = from_local(measured, local_of, [i for i in range(1, n) if i not in measured])
    if max(gains) > MAX_GAIN_SPREAD * min(gains) * (1 + 1e-9):
        assert derived is None
    elif derived is not None:
        for i, v in derived.items():
            assert min(gains) * (1 - 1e-9) <= v / local_of[i] <= max(gains) * (1 + 1e-9)


@given(lo=positive, hi=positive)
def test_between_is_the_geometric_mean_of_close_neighbours(lo, hi):
    out = between({1: lo, 3: hi}, [2])
    if lo <= hi <= MAX_STEP * lo:
        assert lo * (1 - 1e-9) <= out[2] <= hi * (1 + 1e-9)
    else:
        assert out == {}
