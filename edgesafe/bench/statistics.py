"""Small statistics for the report: a rate with its Wilson interval, and a median with its spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``hits / n`` (95% by default); (0, 1) when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(hits: int, n: int) -> dict[str, float | int]:
    """``{rate, ci_low, ci_high, hits, n}`` with the Wilson 95% interval."""
    low, high = wilson(hits, n)
    return {"rate": hits / n if n else 0.0, "ci_low": round(low, 4), "ci_high": round(high, 4), "hits": hits, "n": n}


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """``{median, q1, q3, min, max, n}`` of timings (quartiles by the inclusive method)."""
    values = sorted(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": round(statistics.median(values), 4), "q1": round(q1, 4), "q3": round(q3, 4),
            "min": round(values[0], 4), "max": round(values[-1], 4), "n": len(values)}
