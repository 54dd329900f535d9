"""Wilson score intervals against published values (Newcombe 1998, Table I; Brown, Cai & DasGupta 2001)."""

import pytest

from lmforge.eval.stats import wilson_interval


@pytest.mark.parametrize("k,n,lo,hi", [
    (81, 263, 0.2553, 0.3662),   # Newcombe (1998) example: 81/263
    (15, 148, 0.0624, 0.1605),   # Newcombe (1998) example: 15/148
    (0, 20, 0.0, 0.1611),        # Newcombe (1998) example: 0/20
    (1, 29, 0.0061, 0.1718),     # Newcombe (1998) example: 1/29
    (8, 10, 0.4902, 0.9433),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
])
def test_known_values(k, n, lo, hi):
    a, b = wilson_interval(k, n)
    assert a == pytest.approx(lo, abs=1e-4) and b == pytest.approx(hi, abs=1e-4)


def test_edges_and_symmetry():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    a, b = wilson_interval(3, 10)
    c, d = wilson_interval(7, 10)
    assert a == pytest.approx(1 - d) and b == pytest.approx(1 - c)
    lo1, hi1 = wilson_interval(5, 10, z=1.0)
    lo2, hi2 = wilson_interval(5, 10)
    assert lo2 < lo1 < 0.5 < hi1 < hi2  # a 68% interval sits inside the 95% one
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
