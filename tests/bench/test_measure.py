"""lggseg.bench.measure: the timers report what the clock says, and each measurement computes what it claims.

Speed itself is never asserted (the machine is shared); where a figure is arithmetic on times, a fake
clock makes the times known.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lggseg.bench import measure
from lggseg.config import LossConfig, TrainConfig
from lggseg.training.step import StepSetup

CPU = torch.device("cpu")
ALL_TERMS = ("bce", "dice", "outlier")


@pytest.fixture
def clock(monkeypatch):
    """A clock that only moves when a test moves it: ``clock.tick(s)``."""

    class Clock:
        now = 100.0

        def tick(self, seconds: float) -> None:
            self.now += seconds

    c = Clock()
    monkeypatch.setattr(measure.time, "perf_counter", lambda: c.now)
    return c


@pytest.mark.parametrize(
    ("info", "key"),
    [
        ({"type": "cpu", "name": "AMD EPYC 7763 64-Core Processor"}, "cpu-amd-epyc-7763-64-core-processor"),
        ({"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "cuda-nvidia-h100-80gb-hbm3"),
        ({"type": "cpu", "name": "AMD EPYC", "bf16": {"supported": True, "native": True}}, "cpu-amd-epyc"),
        ({"type": "cpu", "name": "AMD EPYC", "bf16": {"supported": True, "native": False}}, "cpu-amd-epyc-no-bf16"),
        ({"type": "cuda", "name": "H200", "bf16": {"supported": True, "native": False}}, "cuda-h200"),
        ({"type": "cpu", "name": "???"}, "cpu-unknown"),
    ],
)
def test_device_key(info, key):
    assert measure.device_key(info) == key


@pytest.mark.parametrize(("warmup", "reps", "order"), [(0, 2, "abab"), (1, 1, "ab" + "ab"), (2, 3, "aabb" + "ababab")])
def test_time_interleaved_takes_turns(warmup, reps, order):
    calls: list[str] = []
    times = measure.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, warmup, reps)
    assert "".join(calls) == order
    assert {k: len(v) for k, v in times.items()} == {"a": reps, "b": reps}


def test_time_interleaved_reports_each_calls_own_duration(clock):
    costs = {"a": iter([9.0, 0.5, 0.25]), "b": iter([9.0, 2.0, 3.0])}  # the untimed warm-up, then two timed calls
    fns = {k: (lambda k=k: clock.tick(next(costs[k]))) for k in costs}
    assert measure.time_interleaved(fns, CPU, 1, 2) == {"a": [0.5, 0.25], "b": [2.0, 3.0]}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, image, attributes=None):
        return self.conv(image)


def test_training_rate_is_images_over_the_median_step(clock, monkeypatch):
    """Per set-up: images/s = batch / median step time, the first step apart (seconds from a fake step)."""
    seconds = {False: iter([5.0, 2.0, 3.0, 1.0]), True: iter([4.0, 0.5, 0.25, 0.75])}  # first, then 3 timed

    def fake_step(net, optimizer, loss_fn, x, y, a, epoch, bf16):
        clock.tick(next(seconds[bf16]))

    monkeypatch.setattr(measure, "train_step", fake_step)
    batch = {"image": torch.zeros(4, 3, 8, 8), "mask": torch.zeros(4, 1, 8, 8), "attributes": None}
    setups = [StepSetup("baseline"), StepSetup("bf16", bf16=True)]
    out = measure.training_steps(_Net(), nn.Identity(), batch, setups, CPU, warmup=1, reps=3, lr=1e-3, epoch=0)
    assert out["baseline"]["first_step_s"] == 5.0 and out["bf16"]["first_step_s"] == 4.0
    assert out["baseline"]["step"] == {"median_s": 2.0, "min_s": 1.0, "all_s": [2.0, 3.0, 1.0]}
    assert out["baseline"]["images_per_s"] == 2.0 and out["bf16"]["images_per_s"] == 8.0  # 4 / 2.0, 4 / 0.5


@pytest.mark.parametrize(("bf16", "channels_last", "expected"), [
    ({"supported": True, "native": True}, "unsafe", ["baseline", "ours", "channels_last", "bf16", "bf16_channels_last"]),
    ({"supported": False, "native": False}, "unsafe", ["baseline", "ours", "channels_last"]),
    ({"supported": True, "native": True}, "", ["baseline", "ours", "bf16"]),  # channels_last crashed libtorch_cpu (#21)
    ({"supported": False, "native": False}, "", ["baseline", "ours"]),
])
def test_cpu_candidates(monkeypatch, bf16, channels_last, expected):
    monkeypatch.setenv("LGGSEG_CPU_CHANNELS_LAST", channels_last)
    monkeypatch.setattr(measure, "cpu_bf16", lambda: bf16)
    monkeypatch.setattr("lggseg.training.step.cpu_bf16", lambda: bf16)
    setups = measure.candidate_setups(TrainConfig(amp=False), CPU)
    assert [s.name for s in setups] == expected and not any(s.compile for s in setups)


def test_j_smaller_than_i_is_rejected_before_any_work():
    from lggseg.config import ConfigError

    with pytest.raises(ConfigError, match="smaller than loss.j"):
        measure.loss_costs(LossConfig(i=7, j=21), torch.zeros(2, 1, 16, 16), 1.0, (5,), CPU, 1)


TIMES = {"bce": [0.01, 0.03, 0.02], "dice": [0.004, 0.004, 0.004], "outlier_paper": [0.1, 0.1, 0.1],
         "outlier_isolated_bce": [0.05, 0.06, 0.07], "5/paper": [0.2, 0.1, 0.3], "9/paper": [0.5, 0.3, 0.4],
         "5/isolated_bce": [0.1, 0.1, 0.1], "9/isolated_bce": [0.15, 0.2, 0.15]}


def test_loss_costs_shares_and_the_j_sweep(monkeypatch):
    """share = median term time / step time; per j the median and the fastest repetition; flat when the
    slowest j's fastest repetition is under 2x the fastest j's (times given, every loss really called)."""
    called = []

    def fake_times(fns, device, warmup, reps):
        for name, fn in fns.items():
            fn()
            called.append(name)
        return TIMES

    monkeypatch.setattr(measure, "time_interleaved", fake_times)
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:16, 8:16] = 1
    out = measure.loss_costs(LossConfig(terms=ALL_TERMS, i=3, j=5), target, 0.5, (5, 9), CPU, 3)
    assert sorted(called) == sorted(TIMES)
    assert out["terms"]["bce"] == {"fwd_bwd_s": 0.02, "share_of_step": 0.04}
    assert out["terms"]["outlier_isolated_bce"] == {"fwd_bwd_s": 0.06, "share_of_step": 0.12}
    sweep = out["outlier_by_j"]
    assert sweep["seconds"]["9"] == {"paper_s": 0.4, "paper_min_s": 0.3, "isolated_bce_s": 0.15,
                                     "isolated_bce_min_s": 0.15}
    assert sweep["flatness"] == {"paper": {"max_over_min_fastest": 3.0, "flat": False},
                                 "isolated_bce": {"max_over_min_fastest": 1.5, "flat": True}}


def _windowed_sum_loss(cfg, mode):
    """A direct j x j window sum: O(j^2) work per pixel, what the flatness check must catch."""
    kernel = torch.ones(1, 1, cfg.j, cfg.j)
    return lambda logits, target: F.conv2d(logits, kernel, padding=cfg.j // 2).mean()


def test_flatness_check_catches_a_direct_window(monkeypatch):
    """A j x j window summed directly costs ~(31/3)^2 = 100x more at j = 31 than at 3: far outside the
    2x limit whatever the machine's load (the box sums' own flatness is what bench.json records)."""
    monkeypatch.setattr(measure, "outlier_fn", _windowed_sum_loss)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target = (torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0)) > 0.9).float()
        out = measure.loss_costs(LossConfig(terms=ALL_TERMS, i=1, j=3), target, 1.0, (3, 31), CPU, 5)
    finally:
        torch.set_num_threads(threads)
    assert [v["flat"] for v in out["outlier_by_j"]["flatness"].values()] == [False, False]
