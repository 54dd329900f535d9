"""Wilson score intervals against published values (Newcombe 1998; Brown, Cai & DasGupta 2001); McNemar's exact test
against Fagerland et al. (2013) and by hand; the paired comparison and its bootstrap interval."""

import pytest

from lmforge.eval.stats import mean_interval, paired_score_test, wilson_interval


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


# ---- paired tests ----------------------------------------------------------------------------------------
def test_mcnemar_exact_published_and_by_hand():
    from lmforge.eval.stats import mcnemar_exact

    # Fagerland, Lydersen & Laake (2013), Table 1 (Bentur et al. 2009): 1 vs 7 discordant pairs, exact p = 0.070
    assert mcnemar_exact(1, 7) == pytest.approx(0.0703, abs=5e-4)
    assert mcnemar_exact(7, 1) == mcnemar_exact(1, 7)  # two-sided: symmetric
    assert mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 2**7)  # by hand: 2 * P(X <= 1), X ~ Bin(7, 1/2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 5 of 5 discordant one way: p = 0.0625, not < 0.05
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    # large counts stay exact (no float underflow of 0.5**n)
    assert 0 < mcnemar_exact(400, 600) < 1e-9 and mcnemar_exact(2000, 2000) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_mcnemar_matches_scipy_binomtest_when_available():
    scipy_stats = pytest.importorskip("scipy.stats")
    from lmforge.eval.stats import mcnemar_exact

    for b, c in [(3, 11), (10, 4), (25, 40), (0, 9), (17, 17)]:
        assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_paired_comparison_counts_discordant_items_only():
    from lmforge.eval.stats import paired_comparison

    a = [True] * 40 + [False] * 60
    # B gets the same 40 right plus 15 more: 15 discordant items, all B's way
    b = [True] * 55 + [False] * 45
    r = paired_comparison(a, b)
    assert (r["n"], r["only_a"], r["only_b"]) == (100, 0, 15)
    assert r["diff"] == pytest.approx(0.15) and r["significant"] and r["p_value"] < 1e-3
    lo, hi = r["diff_ci95"]
    assert 0 < lo < 0.15 < hi < 0.3
    # the same accuracies with the discordance split both ways: no evidence of a difference
    c = [True] * 30 + [False] * 10 + [True] * 25 + [False] * 35
    r2 = paired_comparison(a, c)
    assert r2["diff"] == pytest.approx(0.15) and r2["only_a"] == 10 and r2["only_b"] == 25
    assert r2["p_value"] > r["p_value"]
    same = paired_comparison(a, a)
    assert same["p_value"] == 1.0 and not same["significant"] and same["diff_ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])


def test_paired_bootstrap_is_seeded_and_covers_the_difference():
    import random

    from lmforge.eval.stats import paired_bootstrap_ci

    rng = random.Random(0)
    a = [rng.random() < 0.5 for _ in range(300)]
    b = [x if rng.random() < 0.8 else (rng.random() < 0.7) for x in a]
    assert paired_bootstrap_ci(a, b, seed=3) == paired_bootstrap_ci(a, b, seed=3)
    lo, hi = paired_bootstrap_ci(a, b)
    diff = (sum(b) - sum(a)) / 300
    assert lo < diff < hi and hi - lo < 0.2


def test_mean_interval_bootstrap():
    import random

    rng = random.Random(0)
    small = [rng.random() for _ in range(30)]
    big = small * 10
    lo, hi = mean_interval(small)
    mean = sum(small) / len(small)
    assert lo < mean < hi and mean_interval(small) == (lo, hi)  # seeded: the same interval every run
    blo, bhi = mean_interval(big)
    assert hi - lo > 2.5 * (bhi - blo)  # ten times the items: about sqrt(10) narrower
    assert mean_interval([0.4] * 5) == pytest.approx((0.4, 0.4)) and mean_interval([]) == (0.0, 1.0)


def test_paired_score_test():
    import itertools
    import random

    rng = random.Random(1)
    a = [rng.random() for _ in range(60)]
    better = [min(1.0, x + 0.2) for x in a]
    r = paired_score_test(a, better)
    assert r["diff"] == pytest.approx(sum(better) / 60 - sum(a) / 60) and r["diff"] > 0
    assert r["significant"] and r["p_value"] < 0.001 and r["diff_ci95"][0] > 0
    assert paired_score_test(a, better) == r  # seeded
    noise = [x + rng.choice((-0.05, 0.05)) for x in a]
    assert not paired_score_test(a, noise)["significant"]
    assert paired_score_test(a, a)["p_value"] == 1.0
    assert paired_score_test(a[:8], better[:8])["p_value"] >= 2 / 256  # 8 items: no sign pattern beats 2/2^8
    # against the exact permutation distribution on a small case (all 2^n sign flips)
    x, y = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3], [0.3, 0.5, 0.1, 1.0, 0.8, 0.6]
    d = [q - p for p, q in zip(x, y)]
    obs = abs(sum(d))
    exact = sum(abs(sum(s * v for s, v in zip(signs, d))) >= obs - 1e-12
                for signs in itertools.product((-1, 1), repeat=6)) / 64
    assert paired_score_test(x, y, resamples=200_000)["p_value"] == pytest.approx(exact, abs=0.01)
    with pytest.raises(ValueError):
        paired_score_test([0.1], [0.1, 0.2])
