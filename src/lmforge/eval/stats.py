"""Confidence intervals for accuracies measured on a finite sample.

Wilson's score interval (Wilson 1927; recommended over the normal "Wald" interval by Brown, Cai & DasGupta 2001,
"Interval Estimation for a Binomial Proportion") stays inside [0, 1] and keeps close to its nominal coverage at
small n and at accuracies near 0 or 1, which is where small held-out sets live.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal


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
