"""How sure a measured accuracy is, and whether two accuracies on the same items differ beyond chance.

Wilson's score interval (Wilson 1927; recommended over the normal "Wald" interval by Brown, Cai & DasGupta 2001,
"Interval Estimation for a Binomial Proportion") stays inside [0, 1] and keeps close to its nominal coverage at
small n and at accuracies near 0 or 1, which is where small held-out sets live.

Two variants scored on the same items are paired: an item both get right (or both wrong) says nothing about which
is better; only the discordant items do. So the difference is tested with McNemar's exact test (McNemar 1947;
the exact conditional form recommended at small counts by Fagerland, Lydersen & Laake 2013, "The McNemar test for
binary matched-pairs data"): under "no difference" each discordant item is a fair coin, and the two-sided p-value
is twice the binomial tail of the smaller count, computed exactly with integers (no scipy needed). The size of
the difference comes with a 95% interval from a paired bootstrap (items resampled with replacement, both variants'
outcomes kept together; Efron & Tibshirani 1993, percentile interval). "Significant" means the exact test's
p < 0.05; the bootstrap interval shows how large the difference might be, it does not decide.

A graded metric's mean score (ROUGE-L, token F1: values in [0, 1]) gets a percentile bootstrap interval of its
own (`mean_interval`), and two of them on the same items a paired sign-flip permutation test with a paired
bootstrap interval of the difference (`paired_score_test`): the graded counterpart of McNemar's test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal
ALPHA = 0.05  # significance level of the paired test: "significant at 95%"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` out of `n` (95% by default).

    With n = 0 nothing is known and the interval is (0, 1).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test: `only_a` items only A got right, `only_b` only B got right.

    Under the null each of the n = only_a + only_b discordant items favours A or B with probability 1/2, so
    p = min(1, 2 * P(X <= min(only_a, only_b))) for X ~ Binomial(n, 1/2); with no discordant item, p = 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be non-negative, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int divides exactly-rounded even for huge n


def paired_bootstrap_ci(a: Sequence[bool], b: Sequence[bool], resamples: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of accuracy(b) - accuracy(a) over `resamples` paired bootstrap samples of the items."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same items: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return -1.0, 1.0
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # per item: -1, 0 or +1
    tail = (1 - level) / 2
    lo, hi = np.quantile(_bootstrap_means(d, resamples, seed), [tail, 1 - tail])
    return float(lo), float(hi)


def paired_comparison(a: Sequence[bool], b: Sequence[bool], seed: int = 0) -> dict:
    """B against A on the same items: accuracies, the difference B - A with its bootstrap 95% interval, the
    discordant counts, McNemar's exact p-value and whether it is significant at 95%."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same items: {len(a)} vs {len(b)}")
    n = len(a)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    p = mcnemar_exact(only_a, only_b)
    acc_a = sum(map(bool, a)) / n if n else 0.0
    acc_b = sum(map(bool, b)) / n if n else 0.0
    lo, hi = paired_bootstrap_ci(a, b, seed=seed)
    return {"n": n, "accuracy_a": acc_a, "accuracy_b": acc_b, "diff": acc_b - acc_a, "diff_ci95": [lo, hi],
            "only_a": only_a, "only_b": only_b, "p_value": p, "significant": p < ALPHA}


def _bootstrap_means(x, resamples: int, seed: int):
    """Means of `resamples` bootstrap samples of the 1-D array x (items drawn with replacement), seeded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // x.size)  # bound the index matrix whatever the item count
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        means[start:start + rows] = x[rng.integers(0, x.size, size=(rows, x.size))].mean(axis=1)
    return means


def mean_interval(values, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (graded scores in [0, 1]; Efron & Tibshirani 1993):
    no normality assumed, and it stays inside the values' range. Seeded, so a rerun gives the same interval."""
    import numpy as np

    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return 0.0, 1.0
    tail = (1 - level) / 2
    lo, hi = np.quantile(_bootstrap_means(x, resamples, seed), [tail, 1 - tail])
    return float(lo), float(hi)


def paired_score_test(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """B against A on graded per-item scores (ROUGE-L, token F1) of the same items: the mean difference B - A with
    a paired bootstrap 95% interval, and the two-sided p-value of a paired sign-flip permutation test (under "no
    difference" each item's difference is as likely negative as positive; Fisher 1935, Good 2005): the share of
    random sign assignments whose mean difference is at least as far from zero as the observed one, counting the
    observed one itself ((1 + k) / (1 + resamples), so p is never 0). Significant: p < ALPHA."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = x.size
    if n == 0:
        return {"n": 0, "mean_a": 0.0, "mean_b": 0.0, "diff": 0.0, "diff_ci95": [-1.0, 1.0], "p_value": 1.0,
                "significant": False}
    d = y - x
    observed = abs(d.mean())
    if not np.any(d):
        p = 1.0
    else:
        rng = np.random.default_rng(seed)
        hits, chunk = 0, max(1, 2_000_000 // n)
        for start in range(0, resamples, chunk):
            rows = min(chunk, resamples - start)
            signs = rng.integers(0, 2, size=(rows, n)) * 2 - 1
            hits += int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
        p = (1 + hits) / (1 + resamples)
    lo, hi = np.quantile(_bootstrap_means(d, resamples, seed), [0.025, 0.975])
    return {"n": n, "mean_a": float(x.mean()), "mean_b": float(y.mean()), "diff": float(d.mean()),
            "diff_ci95": [float(lo), float(hi)], "p_value": float(p), "significant": bool(p < ALPHA)}
