"""Flips: answers whose correctness changed between the reference and the case.

Equal accuracy can hide many changed answers (some lost, as many gained), so qbench counts both directions on two
sets whose answers are right or wrong by themselves:

* ``tokens``: every scored position of the evaluation text; right = the model's top-1 is the actual next token
  (a tie for top-1 counts as right, as same-top-1 counts a tie as agreement);
* ``additions``: glm-tiny's exact-match addition prompts (the prompt set's ``addition`` list); right = the greedy
  answer equals the sum.

Each direction gets its rate with a 95% Wilson score interval (Wilson 1927: it keeps its coverage at the small
counts and rates near 0 these sets give, where the normal approximation does not), and the pair an exact McNemar
test (the lost answers among the changed ones are Binomial(changed, ½) when the case is as good as the reference).

The gate (qbench.judge.verdict) compares ``lost`` with the stored baseline's: a case is flagged when the lower end
of its interval is above the upper end of the baseline's. That is decidable only where the counts allow it: with n
answers and the baseline's count, if even losing all n answers would leave the intervals overlapping, the set is
not gated and the results say so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959964  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate k/n (0, 1 for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: how likely a split at least this uneven is when each changed answer is
    equally likely to go either way (1.0 when nothing changed)."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)


def flips(reference_right: Sequence[bool], case_right: Sequence[bool]) -> dict:
    """Counts and intervals of answers lost (right with the reference, wrong now) and gained (the reverse)."""
    if len(reference_right) != len(case_right):
        raise ValueError(f"{len(case_right)} answers against the reference's {len(reference_right)}")
    n = len(reference_right)
    lost = sum(1 for r, c in zip(reference_right, case_right, strict=True) if r and not c)
    gained = sum(1 for r, c in zip(reference_right, case_right, strict=True) if c and not r)
    return {
        "n": n,
        "lost": lost,
        "gained": gained,
        "lost_ci95": list(wilson(lost, n)),
        "gained_ci95": list(wilson(gained, n)),
        "reference_right": sum(map(bool, reference_right)),
        "case_right": sum(map(bool, case_right)),
        "mcnemar_p": mcnemar_p(lost, gained),
    }


def decidable(n: int, baseline_lost: int) -> bool:
    """Whether any count of lost answers out of ``n`` could have an interval entirely above the baseline's."""
    return n > 0 and wilson(n, n)[0] > wilson(baseline_lost, n)[1]


def compare(now: dict, then: dict) -> tuple[bool | None, str]:
    """(flagged, words): more answers lost than the baseline beyond both counts' 95% intervals. ``flagged`` is None
    when the set cannot be gated (other answer counts, or counts too small to tell anything from chance)."""
    if now["n"] != then["n"]:
        return None, f"not gated: {now['n']} answers now, {then['n']} in the baseline"
    if not decidable(then["n"], then["lost"]):
        return None, (
            f"not gated: with {then['n']} answers and {then['lost']} lost in the baseline, no count of lost answers "
            "could be told from chance at 95%"
        )
    lo_now, hi_then = now["lost_ci95"][0], wilson(then["lost"], then["n"])[1]
    words = (
        f"{now['lost']} of {now['n']} lost (right with the reference, wrong now; 95% CI {lo_now:.3f}–"
        f"{now['lost_ci95'][1]:.3f}) against {then['lost']} in the baseline (95% CI up to {hi_then:.3f})"
    )
    return lo_now > hi_then, words
