"""The search the policies size CPU rows with: the most rows (a window, a pipeline's sub-batch, a cut to an objective)
for which a monotone test holds."""

from collections.abc import Callable


def largest_fitting(fits: Callable[[int], bool], low: int, high: int, hint: int | None = None) -> int:
    """The largest k in [low, high] with fits(k), fits assumed monotone (true then false); low if none. A hint (the
    answer of the step before, say) changes only the probes, not the answer: the search gallops from it, two probes
    when the answer is still the hint, about 2 log2(distance) when it moved, before bisecting what is left."""
    if hint is not None and low < high and low <= hint <= high:
        step = 1
        if fits(hint):
            low = hint
            while low < high:
                probe = min(low + step, high)
                if not fits(probe):
                    high = probe - 1
                    break
                low, step = probe, 2 * step
        else:
            high = hint - 1
            while low < high:
                probe = max(high - step, low)
                if fits(probe):
                    low = probe
                    break
                high, step = probe - 1, 2 * step
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
