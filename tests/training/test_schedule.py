"""Learning-rate schedule (``train.lr_schedule``, ``warmup_epochs``) and the wall-clock budget
(``train.max_minutes``): hand-computed factors, and tiny training runs whose epoch clock is faked so
the budget decision is exact."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import SEED, tiny_run

import lggseg.training.trainer as train_mod
from lggseg.config import ConfigError, TrainConfig
from lggseg.training import train_variant
from lggseg.training.step import lr_factor


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 4, **kw})


# (config, step, steps per epoch, planned epochs, expected factor)
CASES = [
    (_cfg(), 0, 10, 4, 1.0),  # constant, no warm-up: always 1
    (_cfg(), 39, 10, 4, 1.0),
    (_cfg(warmup_epochs=0.5), 0, 10, 4, 1 / 5),  # 5 warm-up steps: 1/5, 2/5, ...
    (_cfg(warmup_epochs=0.5), 4, 10, 4, 1.0),
    (_cfg(warmup_epochs=0.5), 5, 10, 4, 1.0),  # constant after the warm-up
    (_cfg(lr_schedule="cosine"), 0, 10, 4, 1.0),  # cosine starts at 1
    (_cfg(lr_schedule="cosine"), 20, 10, 4, 0.5),  # half-way: cos(pi/2) -> 0.5
    (_cfg(lr_schedule="cosine"), 10, 10, 4, 0.5 * (1 + math.cos(math.pi / 4))),
    (_cfg(lr_schedule="cosine"), 40, 10, 4, 0.0),  # at and past the end: 0
    (_cfg(lr_schedule="cosine"), 55, 10, 4, 0.0),
    (_cfg(lr_schedule="cosine"), 20, 10, 2, 0.0),  # a shorter plan ends the decay earlier (vs 0.5 at 4)
    (_cfg(lr_schedule="cosine", warmup_epochs=1), 9, 10, 4, 1.0),  # last warm-up step
    (_cfg(lr_schedule="cosine", warmup_epochs=1), 25, 10, 4, 0.5),  # (25-10)/30 = half of the decay
]


@pytest.mark.parametrize(("cfg", "step", "spe", "planned", "expected"), CASES)
def test_lr_factor_table(cfg, step, spe, planned, expected):
    assert lr_factor(cfg, step, spe, planned) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lr_schedule": "onecycle"}, "lr_schedule"),
        ({"warmup_epochs": -0.1}, "warmup_epochs"),
        ({"warmup_epochs": 4}, "warmup_epochs"),  # the warm-up must end before the last epoch
        ({"max_minutes": 0}, "max_minutes"),
        ({"max_minutes": -3}, "max_minutes"),
        ({"max_minutes": float("nan")}, "max_minutes"),
    ],
)
def test_schedule_and_budget_reject_nonsense(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)


class _Clock:
    """perf_counter stand-in: each epoch of the trainer takes ``epoch_seconds`` of fake time."""

    def __init__(self, epoch_seconds: float) -> None:
        self.t = 0.0
        self.epoch_seconds = epoch_seconds

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fake_epochs(monkeypatch):
    """Make every epoch last exactly ``seconds`` on the trainer's clock; returns a setter."""
    clock = _Clock(0.0)
    real_validate = train_mod.Trainer.validate

    def validate(self, epoch):  # once per epoch, between its clock's start and end
        clock.t += clock.epoch_seconds
        return real_validate(self, epoch)

    monkeypatch.setattr(train_mod.time, "perf_counter", clock)
    monkeypatch.setattr(train_mod.Trainer, "validate", validate)

    def set_seconds(seconds: float) -> None:
        clock.epoch_seconds = seconds

    return set_seconds


def test_budget_plans_epochs_after_the_first(store_dir, tmp_path, fake_epochs):
    fake_epochs(50.0)  # 50 s per epoch, 2.5 min budget: 3 epochs fit
    result = train_variant(tiny_run(epochs=6, max_minutes=2.5), store_dir, tmp_path / "seed", SEED)
    assert result["epochs_done"] == 3 and result["epochs_planned"] == 3 and len(result["history"]) == 3
    assert result["stop_reason"].startswith("time budget") and "fits 3 of 6" in result["stop_reason"]
    assert result["max_minutes"] == 2.5


def test_the_plan_is_remade_after_every_epoch(store_dir, tmp_path, fake_epochs, monkeypatch):
    """A first epoch of 100 s (warm-up costs), then 20 s each, budget 5 min: the plan after epoch 1 is
    3 of 6 (300 s at 100 s), after epoch 2 (estimate 20 s, 180 s left) all 6 fit, and all 6 run."""
    times = iter([100.0] + [20.0] * 5)
    real = train_mod.Trainer.validate

    def validate(self, epoch):
        train_mod.time.perf_counter.t += next(times)
        return real(self, epoch)

    monkeypatch.setattr(train_mod.Trainer, "validate", validate)
    plans = []
    plan = train_mod.Trainer.plan
    monkeypatch.setattr(train_mod.Trainer, "plan", lambda self: plan(self) or plans.append(self.state.planned_epochs))
    result = train_variant(tiny_run(epochs=6, max_minutes=5), store_dir, tmp_path / "seed", SEED)
    assert plans == [3, 6, 6, 6, 6, 6]  # after each epoch (after the last there is nothing left to plan)
    assert result["epochs_done"] == 6 and result["stop_reason"] == "completed"


@pytest.mark.parametrize(("loss", "gammas"), [({"gamma_warmup_epochs": 3}, [0.0, 0.0, 0.0]),
                                             ({"gamma_warmup_fraction": 0.5, "gamma_ramp_fraction": 0.0}, [0.0, 1.0, 1.0])])
def test_a_gamma_schedule_in_fractions_follows_the_plan(store_dir, tmp_path, fake_epochs, loss, gammas):
    """6 epochs planned, 3 fit the budget (50 s each, 2.5 min): a warm-up of 3 epochs never ends, half of the
    plan does (3 epochs of 6 while epoch 1 trains, 1 of 3 after the plan is cut)."""
    fake_epochs(50.0)
    result = train_variant(tiny_run(epochs=6, max_minutes=2.5, loss=loss), store_dir, tmp_path / "seed", SEED)
    assert [row["gamma"] for row in result["history"]] == gammas
    assert result["gamma_reached_full"] is (gammas[-1] == 1.0)


def test_without_budget_every_epoch_runs(store_dir, tmp_path, fake_epochs):
    fake_epochs(1000.0)
    result = train_variant(tiny_run(epochs=2), store_dir, tmp_path / "seed", SEED)
    assert result["epochs_done"] == 2 and result["stop_reason"] == "completed"


def test_a_budget_larger_than_the_schedule_completes_it(store_dir, tmp_path, fake_epochs):
    fake_epochs(10.0)
    result = train_variant(tiny_run(epochs=2, max_minutes=60), store_dir, tmp_path / "seed", SEED)
    assert result["epochs_done"] == 2 and result["stop_reason"] == "completed"


def test_a_slowdown_after_the_plan_stops_before_overrunning(store_dir, tmp_path, fake_epochs, monkeypatch):
    """First epoch 30 s (plan: 4 of 6 in 2 min), then the machine gets busy: epoch 2 takes 60 s, so a
    third (judged at 60 s) would end at 150 s > 120 s: training stops after 2."""
    times = iter([30.0, 60.0, 60.0, 60.0])
    real = train_mod.Trainer.validate

    def validate(self, epoch):
        train_mod.time.perf_counter.t += next(times)
        return real(self, epoch)

    monkeypatch.setattr(train_mod.Trainer, "validate", validate)
    result = train_variant(tiny_run(epochs=6, max_minutes=2), store_dir, tmp_path / "seed", SEED)
    assert result["epochs_done"] == 2
    assert "reached after 2 of 6" in result["stop_reason"]


def test_the_cosine_schedule_is_applied_per_step(store_dir, tmp_path):
    result = train_variant(tiny_run(epochs=2, lr_schedule="cosine", warmup_epochs=0.5), store_dir, tmp_path / "s", SEED)
    lrs = [row["lr"] for row in result["history"]]
    # The logged rate is that of an epoch's last step. The tiny store gives 5 steps per epoch: 2.5
    # warm-up steps, then 7.5 of cosine; steps 4 and 9 (0-based) are 1.5/7.5 and 6.5/7.5 into it.
    assert lrs[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 1.5 / 7.5)))
    assert lrs[1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 6.5 / 7.5)))
    constant = train_variant(tiny_run(epochs=1), store_dir, tmp_path / "c", SEED)
    assert constant["history"][0]["lr"] == pytest.approx(1e-3)


def test_budget_and_schedule_are_part_of_the_run_identity(store_dir):
    from lggseg.training.checkpoint import run_fingerprint, store_fingerprint

    data = store_fingerprint(store_dir)
    base = run_fingerprint(tiny_run(), SEED, data)
    assert run_fingerprint(tiny_run(max_minutes=5), SEED, data) != base
    assert run_fingerprint(tiny_run(lr_schedule="cosine"), SEED, data) != base
    assert torch.get_num_threads() >= 1  # the runs above restored the thread setting


def test_empty_slice_fraction_shortens_epochs_and_stays_deterministic(store_dir, tmp_path):
    import numpy as np

    from lggseg.data.store import load_store

    store = load_store(store_dir)
    train = store.indices("train")
    tumour = int((store.table["tumour_pixels"].to_numpy()[train] > 0).sum())
    expected = (tumour + round(0.5 * (len(train) - tumour))) // 4  # batch 4, last partial batch dropped
    runs = [train_variant(tiny_run(epochs=1, empty_slice_fraction=0.5), store_dir, tmp_path / f"r{k}", SEED) for k in (0, 1)]
    assert runs[0]["history"] == runs[1]["history"]
    full = train_variant(tiny_run(epochs=1), store_dir, tmp_path / "full", SEED)
    assert np.isclose(runs[0]["images_per_second"] * runs[0]["train_seconds"], expected * 4, rtol=0.02)
    assert full["fingerprint"] != runs[0]["fingerprint"]
    with pytest.raises(ConfigError, match="empty_slice_fraction"):
        _cfg(empty_slice_fraction=0)


def test_epoch_slices_caps_the_steps_of_an_epoch(store_dir, tmp_path):
    from lggseg.training.checkpoint import run_fingerprint, store_fingerprint

    result = train_variant(tiny_run(epochs=1, epoch_slices=8), store_dir, tmp_path / "cut", SEED)
    assert round(result["images_per_second"] * result["train_seconds"]) == 8  # two steps of batch 4
    data = store_fingerprint(store_dir)
    assert run_fingerprint(tiny_run(epoch_slices=8), SEED, data) != run_fingerprint(tiny_run(), SEED, data)
    assert run_fingerprint(tiny_run(epoch_slices=None), SEED, data) == run_fingerprint(tiny_run(), SEED, data)
    for bad in (0, 3, 2.5, "all"):  # below batch_size 4, or not an integer
        with pytest.raises(ConfigError, match="epoch_slices"):
            _cfg(epoch_slices=bad)
