"""Success rates with 95% intervals: Wilson for one run's held-out episodes, Student t over seeds.

>>> lo, hi = wilson(30, 100)
>>> round(lo, 3), round(hi, 3)
(0.219, 0.396)
>>> round(over_seeds([0.3, 0.4, 0.5])["mean"], 3), [round(x, 3) for x in over_seeds([0.3, 0.4, 0.5])["ci95"]]
(0.4, [0.152, 0.648])
>>> d = paired_difference([0.30, 0.32, 0.29], [0.25, 0.26, 0.26])
>>> round(d["mean"], 3), [round(x, 3) for x in d["ci95"]]
(0.047, [0.009, 0.085])
"""

from __future__ import annotations

import math
import statistics

from cso_lib.exports import wilson_interval

# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion (the one `cso evaluate` uses)."""
    return wilson_interval(successes, n)


def _t95(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student t interval (None with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def over_seeds(rates: list[float]) -> dict:
    """Mean over seeds and its 95% t interval (None with one seed), clipped to [0, 1]."""
    mean, half = _t95(rates)
    ci = None if half is None else [max(0.0, mean - half), min(1.0, mean + half)]
    return {"mean": mean, "ci95": ci, "n_seeds": len(rates)}


def paired_difference(rates: list[float], baseline: list[float]) -> dict:
    """Mean of the per-seed differences rates[i] - baseline[i] (same seed, same held-out tasks) and its 95% t
    interval (None with one seed). Pairing by seed removes what the seeds share (the tasks, pi0) from the
    comparison, so it is tighter than comparing two intervals over seeds."""
    if len(rates) != len(baseline) or not rates:
        raise ValueError(f"paired_difference needs the same seeds on both sides: {len(rates)} vs {len(baseline)}")
    diffs = [a - b for a, b in zip(rates, baseline, strict=True)]
    mean, half = _t95(diffs)
    return {"mean": mean, "ci95": None if half is None else [mean - half, mean + half], "per_seed": diffs}
