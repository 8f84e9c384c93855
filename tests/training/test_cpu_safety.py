"""The CPU training step never uses channels_last unless asked to at the documented risk (issue 21).

With bf16 autocast and channels_last on a 2-core AMD EPYC with AVX512-BF16, libtorch_cpu died with
SIGSEGV / a general-protection fault (``lggseg preflight --image-size 128 --batch-size 16``: 2 of 2 runs
over all variants, 2 of 9 for repvgg_b2 alone), and channels_last in float32 had crashed repvgg_b2
before; without channels_last 0 of 5 crashed at the same speed. The float32 crash is oneDNN's: the
weight gradient of a 1x1 stride-2 convolution over <= 4 input channels in channels_last (repvgg's stem
has one on the RGB input) corrupts the heap, SIGSEGV in 3 of 3 runs with torch 2.14.1 on an AVX2-only EPYC
(docs/cpu-bf16.md has the 10-line reproducer). The table pins the set-up
:func:`lggseg.training.step.step_setup` chooses under every switch; the slow test runs repeated steps
of repvgg_b2 in the project's default CPU set-up in a subprocess and fails on a signal (with channels_last
forced on in step_setup it died with SIGSEGV on the first steps there).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lggseg.config import ConfigError, TrainConfig, read_params, resolve_variant, variant_names
from lggseg.training.step import step_setup

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("switch", "amp", "channels_last_env", "bf16_on", "cl_on"),
    [
        ("native", True, "", True, False),  # the default on an AVX512-BF16/AMX CPU: bf16, contiguous
        ("native", True, "off", True, False),
        ("native", True, "unsafe", True, True),  # the explicit opt-in brings the old fast path back
        ("native", False, "unsafe", False, False),  # channels_last alone was slower on a CPU
        ("off", True, "", False, False),  # emulated bf16 is slower than float32
        ("off", True, "unsafe", False, False),
    ],
)
def test_cpu_step_setup_uses_channels_last_only_when_opted_in(monkeypatch, switch, amp, channels_last_env, bf16_on,
                                                              cl_on):
    monkeypatch.setenv("LGGSEG_CPU_BF16", switch)
    monkeypatch.setenv("LGGSEG_CPU_CHANNELS_LAST", channels_last_env)
    s = step_setup(TrainConfig(amp=amp, channels_last=True, cpu_threads=2), CPU)
    assert (s.bf16, s.channels_last, s.deterministic, s.compile, s.threads) == (bf16_on, cl_on, True, False, 2)


@pytest.mark.parametrize("switch", ["native", "off"])
def test_cuda_step_setup_ignores_the_cpu_switches(monkeypatch, switch):
    monkeypatch.setenv("LGGSEG_CPU_BF16", switch)
    monkeypatch.setenv("LGGSEG_CPU_CHANNELS_LAST", "")
    s = step_setup(TrainConfig(amp=True, channels_last=True, compile=False), torch.device("cuda"))
    assert (s.bf16, s.channels_last, s.cudnn_benchmark, s.deterministic) == (True, True, True, False)


@pytest.mark.parametrize("params", ["params.yaml", "params.cpu.yaml", "params.laptop.yaml", "params.demo.yaml"])
@pytest.mark.parametrize("switch", ["native", "off"])
def test_no_shipped_variant_runs_channels_last_on_a_cpu(monkeypatch, params, switch):
    from lggseg.config import deep_merge

    monkeypatch.setenv("LGGSEG_CPU_BF16", switch)
    monkeypatch.delenv("LGGSEG_CPU_CHANNELS_LAST", raising=False)
    merged = read_params(REPO / "params.yaml")
    if params != "params.yaml":  # the profiles are overrides of params.yaml
        merged = deep_merge(merged, read_params(REPO / params))
    for name in variant_names(merged):
        assert not step_setup(resolve_variant(merged, name).train, CPU).channels_last, (params, name)


@pytest.mark.parametrize(("env", "value"), [("LGGSEG_CPU_BF16", "yes"), ("LGGSEG_CPU_CHANNELS_LAST", "1")])
def test_an_unknown_switch_value_is_a_config_error(monkeypatch, env, value):
    monkeypatch.setenv("LGGSEG_CPU_BF16", "native")
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=env):
        step_setup(TrainConfig(), CPU)


@pytest.mark.slow
def test_repeated_repvgg_b2_steps_in_the_default_cpu_setup_do_not_crash(tmp_path):
    """repvgg_b2 (the variant that crashed most) through ``lggseg preflight``: the training step of
    :func:`step_setup` (bf16 on a CPU with native bf16, float32 otherwise; contiguous) repeated, then an
    evaluation batch, in a child process; a crash shows as a negative return code (the signal)."""
    env = {k: v for k, v in os.environ.items() if k != "LGGSEG_CPU_CHANNELS_LAST"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "lggseg.preflight", "--params", str(REPO / "params.yaml"), "--device", "cpu",
           "--variants", "repvgg_b2_bce", "--image-size", "64", "--batch-size", "8", "--steps", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode < 0:
        pytest.fail(f"killed by {signal.Signals(-proc.returncode).name}: {proc.stdout[-1000:]} {proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "OK   repvgg_b2_bce" in proc.stdout
