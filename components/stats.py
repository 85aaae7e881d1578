"""Confidence intervals shared by the stages that report accuracy (evaluate, quality)."""

from __future__ import annotations

import numpy as np


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): sound near 0 and 1 and for small n."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    # exactly 0 with no success and 1 with no failure: rounding left 1 - 1e-16 at n = 201 (the interval excluded
    # a 100% accuracy it was reported beside) and 5e-17 at 0%
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return float(low), float(high)
