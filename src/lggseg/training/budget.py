"""The epoch plan under ``train.max_minutes``: how many epochs a run does within its wall-clock budget.

The plan is re-made after every epoch from the recent epoch times (:func:`epoch_estimate`), not fixed
from the first epoch, which carries one-off costs (cuDNN autotuning, lazy kernel loading, memory-pool
growth, compilation). The cosine learning rate and a gamma schedule in fractions follow the plan.
:func:`plan_epochs` is a pure function; the trainer calls it with rank 0's clock on every rank, so
DDP processes stop together.
"""

from __future__ import annotations

import math
import statistics

RECENT = 3  # epochs whose median estimates the next one


def epoch_estimate(epoch_seconds: list[float]) -> float:
    """Seconds the next epoch is expected to take: the median of the last :data:`RECENT` epochs, the first
    epoch left out once a later one has been timed."""
    times = epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds
    return statistics.median(times[-RECENT:])


def plan_epochs(max_minutes: float, epochs: int, done: int, spent: float, estimate: float) -> tuple[int, str | None]:
    """``(planned epochs, stop reason or None)`` after ``done`` epochs of ``epochs`` and ``spent`` seconds.

    As many more epochs as fit the rest of the budget at ``estimate`` seconds each, at most
    ``train.epochs`` in all; none when the next one would overrun. The reason is None when the whole
    schedule fits (a plan cut earlier can grow back when epochs get faster).
    """
    budget_s = max_minutes * 60.0
    more = max(0, math.floor((budget_s - spent) / max(estimate, 1e-9)))
    planned = min(epochs, done + more)
    if planned == epochs:
        return planned, None
    if planned == done:
        return planned, (f"time budget: train.max_minutes={max_minutes:g} reached after {done} of {epochs} epochs "
                         f"({spent:.0f} s spent, next epoch estimated at {estimate:.0f} s)")
    return planned, (f"time budget: train.max_minutes={max_minutes:g} fits {planned} of {epochs} epochs "
                     f"at {estimate:.0f} s per epoch (re-planned after epoch {done})")
