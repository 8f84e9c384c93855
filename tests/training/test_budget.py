"""``lggseg.training.budget``: the epoch plan under ``train.max_minutes``, re-made after every epoch from
the recent epoch times (hand-computed tables; tiny runs with a faked clock are in test_schedule.py)."""

from __future__ import annotations

import pytest

from lggseg.training.budget import epoch_estimate, plan_epochs


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ([100.0], 100.0),  # one epoch: all there is
        ([100.0, 20.0], 20.0),  # the first epoch (warm-up costs) is left out once another is timed
        ([100.0, 20.0, 30.0], 25.0),
        ([100.0, 20.0, 30.0, 40.0, 10.0], 30.0),  # median of the last three: 30, 40, 10
    ],
)
def test_epoch_estimate(times, expected):
    assert epoch_estimate(times) == expected


# (max_minutes, train.epochs, epochs done, seconds spent, estimate) -> planned, reason (start) or None
PLANS = [
    (2.5, 6, 1, 50.0, 50.0, 3, "time budget: train.max_minutes=2.5 fits 3 of 6 epochs at 50 s per epoch"),
    (2, 6, 2, 90.0, 60.0, 2, "time budget: train.max_minutes=2 reached after 2 of 6 epochs (90 s spent"),
    (60, 2, 1, 10.0, 10.0, 2, None),  # the whole schedule fits
    (1e-6, 3, 1, 0.5, 0.5, 1, "time budget: train.max_minutes=1e-06 reached after 1 of 3"),  # overrun already
    (5, 6, 2, 120.0, 20.0, 6, None),  # a plan cut after a slow first epoch grows back: 2 + 180 // 20 >= 6
    (5, 10, 3, 150.0, 40.0, 6, "time budget: train.max_minutes=5 fits 6 of 10 epochs at 40 s per epoch "
                               "(re-planned after epoch 3)"),  # 3 + 150 // 40
]


@pytest.mark.parametrize(("minutes", "epochs", "done", "spent", "estimate", "planned", "reason"), PLANS)
def test_plan_epochs(minutes, epochs, done, spent, estimate, planned, reason):
    got, why = plan_epochs(minutes, epochs, done, spent, estimate)
    assert got == planned
    assert why is None if reason is None else why.startswith(reason)
