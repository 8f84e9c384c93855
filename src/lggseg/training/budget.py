"""The epoch plan under ``train.max_minutes``: how many epochs a run does within its wall-clock budget.

:func:`plan_epochs` is a pure function of the budget and the epoch times so far; the trainer calls it
after every epoch (the same decision on every rank: rank 0's clock is broadcast first).
"""

from __future__ import annotations


def plan_epochs(max_minutes: float, epochs: int, planned: int, done: int, spent: float, last: float) -> tuple[int, str | None]:
    """``(planned epochs, stop reason or None)`` after ``done`` epochs of ``epochs``, ``spent`` seconds in all.

    After the first epoch the plan is fixed to the epochs that fit the budget at its time ``last``;
    after any epoch the run stops before one that would overrun it (judged by the last epoch's time).
    ``planned``: the plan so far (returned unchanged with None when nothing changes).
    """
    budget_s, reason = max_minutes * 60.0, None
    if done == 1:
        fits = max(1, int(budget_s // max(last, 1e-9)))
        if fits < planned:
            planned = fits
            reason = f"time budget: train.max_minutes={max_minutes:g} fits {fits} of {epochs} epochs at {last:.0f} s for the first"
    if done < planned and spent + last > budget_s:
        planned = done
        reason = (f"time budget: train.max_minutes={max_minutes:g} reached after {done} of {epochs} epochs "
                  f"({spent:.0f} s spent, last epoch {last:.0f} s)")
    return planned, reason
