"""Benchmark of the hot paths of training and inference (issue #6; the model of paper sections 3.1-3.4).

One call of :func:`run_benchmark` measures, on whatever device it is given, and merges into
``metrics/bench.json`` under a per-device key (``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``, ...)
so that CPU and CUDA results live side by side:

1. **Training throughput** (images/s) of the configured network (DeepLabv3+ ``regnetz_040`` with the
   attribute encoder, at ``common.image_size``) with the full eq. 13 loss, for a small set of step
   set-ups on one fixed batch: the plain baseline (fp32, contiguous, no compile, torch's default
   threads), the set-up :mod:`lggseg.train` uses on this device ("ours"), and the candidates that
   could make it faster (channels_last, bf16 autocast, both, and ``torch.compile`` on CUDA; bf16
   only where the CPU supports bf16). Each reports its speed-up over the baseline; the best one
   is named so that a real win can be adopted by the training code. Then "ours" and the best are
   timed again **fed by the real DataLoader**, whose workers share the cores with the step: on a
   small CPU box that contention, not arithmetic, can decide the speed, so the CPU also tries fewer
   torch threads and ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads that sleep instead of spinning
   while they wait; tried in a subprocess because OpenMP reads it at start-up).
2. **Loss cost**: forward + backward time of each term of eq. 13 (BCE, Dice, outlier in both modes,
   and the whole compound loss) on logits of the training batch's shape, as a share of "our"
   training step; and the outlier terms at ``j`` = 21, 41, 81, which must stay flat (their box
   counts are O(1) per pixel whatever the window).
3. **Data pipeline**: images/s that the training DataLoader (memmap read, resize, augmentation,
   ``train.num_workers`` workers) delivers, divided by the images/s that "our" training step
   consumes; it must stay above :data:`DATA_RATIO_TARGET` or the GPU waits for the CPU.
4. **Inference**: slices/s of the inference function of ``lggseg predict``, with and without TTA.
5. **Data paths and concurrent variants** (:mod:`lggseg.bench_paths`, issue #11; ``--no-paths`` skips
   them): the whole training step fed by the device-resident path against the DataLoader path at 64
   and 256 px, and two variants trained at once (:mod:`lggseg.concurrent`) against one after another.
6. **Demo wall time**: the time of the whole demo ``dvc repro``, taken as an input (it is far too
   long to run here) and recorded with its source.

Plus the model's size and forward FLOPs per image (``torch.utils.flop_counter``), the measured
matmul rate of the device (fp32 and bf16) and the share of it that training achieves.

Timing: every figure is the median of ``reps`` repetitions after ``warmup`` untimed ones (the first
call, which pays for cudnn autotuning or compilation, is reported apart); on CUDA each repetition
is bracketed by CUDA events read after one synchronisation, so asynchronous launches are neither
missed nor double-counted. Things that are compared (the step set-ups, the loss terms and the j
sweep, inference with and without TTA) are timed in turns, repetition by repetition, so that a busy
neighbour slows them alike and their ratios hold. The loader-fed loop is timed as wall time of
``reps`` steps between two synchronisations. Timings are still noisy on a shared machine: the
load average before and after is recorded (``machine_load``) and ``all_s`` keeps every repetition. The input of the isolated step is one augmented batch of the store, the
weights are random (speed does not depend on them), and every set-up starts from the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from lggseg.config import (
    CommonConfig,
    ConfigError,
    LossConfig,
    ManifestConfig,
    ModelConfig,
    TrainConfig,
    deep_merge,
    from_dict,
    load_section,
    read_params,
)
from lggseg.errors import DataError, LggsegError
from lggseg.hardware import cpu_bf16, cpu_name, resolve_device
from lggseg.io import write_json
from lggseg.train import StepSetup, applied, step_setup, train_step

DATA_RATIO_TARGET = 1.5
"""The DataLoader must deliver at least this many times the images the training step consumes."""

FLAT_RATIO_LIMIT = 2.0
"""Outlier-loss time at the largest ``j`` over the smallest must stay below this. O(1)-per-pixel box
counts grow only with their zero padding, (256 + 81) / (256 + 21) = 1.2x from j = 21 to 81 at
256 x 256; an O(j) running window would give ~3.9x and a direct O(j^2) window ~15x."""

DEMO_TIME_FILE = Path("demo/metrics/demo_time.json")
"""Where ``make demo`` records its ``dvc repro`` wall time (``{"seconds": ...}``), if it does."""

ALL_TERMS = ("bce", "dice", "outlier")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DeviceProfile:
    """How much work the benchmark does on one kind of device."""

    batch_size: int  # 0: train.batch_size
    warmup: int
    reps: int
    loss_reps: int
    data_batches: int
    infer_batches: int
    matmul_size: int

    def __post_init__(self) -> None:
        for name in ("batch_size", "warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"bench.<device>.{name} must be a non-negative integer, got {v!r}")
        for name in ("reps", "loss_reps", "data_batches", "infer_batches", "matmul_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"bench.<device>.{name} must be a positive integer, got {v!r}")
        if self.batch_size == 1:
            # BatchNorm after ASPP's global pooling sees one value per channel: training fails.
            raise ConfigError("bench.<device>.batch_size must be 0 (train.batch_size) or at least 2")


_CPU_PROFILE = DeviceProfile(
    batch_size=4, warmup=1, reps=7, loss_reps=10, data_batches=12, infer_batches=3, matmul_size=1024
)
_CUDA_PROFILE = DeviceProfile(
    batch_size=0, warmup=5, reps=20, loss_reps=20, data_batches=40, infer_batches=10, matmul_size=8192
)


@dataclass(frozen=True)
class BenchParams:
    """The optional ``bench`` section of ``params.yaml`` (every key has a default)."""

    cpu: DeviceProfile = field(default_factory=lambda: _CPU_PROFILE)
    cuda: DeviceProfile = field(default_factory=lambda: _CUDA_PROFILE)
    outlier_js: tuple[int, ...] = (21, 41, 81)
    candidates: bool = True  # also time the candidate set-ups (False: only the baseline and ours)
    compile: bool = True  # also time torch.compile on CUDA (never on CPU: compile time dwarfs the run)
    synthetic_cases: int = 3  # size of the generated store when no manifest store is given
    # issue #11 (lggseg.bench_paths): resident vs DataLoader path, and two variants at once vs one after another
    paths: bool = True  # measure them at all
    path_sizes: tuple[int, ...] = (64, 256)
    path_rounds: int = 2
    concurrent_cases: int = 8
    concurrent_epochs: int = 1
    concurrent_cpu_size: int = 64  # on CUDA: common.image_size

    def __post_init__(self) -> None:
        def positive_int(name: str, v: Any, least: int = 1) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"bench.{name} must be an integer >= {least}, got {v!r}")

        if not self.path_sizes:
            raise ConfigError("bench.path_sizes must name at least one image size")
        for size in (*self.path_sizes, self.concurrent_cpu_size):
            positive_int("path_sizes / concurrent_cpu_size", size, 32)
            if size % 16:
                raise ConfigError(f"bench image sizes must be multiples of 16, got {size}")
        positive_int("path_rounds", self.path_rounds)
        positive_int("concurrent_cases", self.concurrent_cases, 3)
        positive_int("concurrent_epochs", self.concurrent_epochs)
        if len(self.outlier_js) < 1 or any(isinstance(j, bool) or not isinstance(j, int) or j < 3 or j % 2 == 0
                                           for j in self.outlier_js):
            raise ConfigError(f"bench.outlier_js must be odd integers >= 3, got {self.outlier_js!r}")
        if isinstance(self.synthetic_cases, bool) or not isinstance(self.synthetic_cases, int) or self.synthetic_cases < 3:
            raise ConfigError("bench.synthetic_cases must be an integer >= 3 (one case per split)")

    def profile(self, device: torch.device) -> DeviceProfile:
        return self.cuda if device.type == "cuda" else self.cpu


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run needs: the params sections it measures plus its inputs."""

    common: CommonConfig = field(default_factory=CommonConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(terms=ALL_TERMS, gamma_warmup_epochs=0, gamma_ramp_epochs=0))
    train: TrainConfig = field(default_factory=TrainConfig)
    bench: BenchParams = field(default_factory=BenchParams)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    data_dir: Path | None = None  # a manifest store; None: generate a small synthetic one
    demo_seconds: float | None = None
    demo_time_file: Path | None = DEMO_TIME_FILE


def load_bench_params(params: Mapping[str, Any]) -> BenchParams:
    """``params["bench"]`` merged over the defaults (a partial ``cpu:`` block keeps the other CPU values)."""
    section = params.get("bench") or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"bench must be a mapping, got {type(section).__name__}")
    merged = deep_merge(dataclasses.asdict(BenchParams()), section)
    return from_dict(BenchParams, merged, "bench")


def bench_config(
    params: Mapping[str, Any] | str | Path,
    data_dir: str | Path | None = None,
    demo_seconds: float | None = None,
    demo_time_file: str | Path | None = DEMO_TIME_FILE,
) -> BenchConfig:
    """The :class:`BenchConfig` of a params file or dict.

    The network is built with random weights (speed does not depend on them, and no download is
    needed) and trained with every term of eq. 13, the loss of the paper's full model.
    """
    if not isinstance(params, Mapping):
        params = read_params(params)
    model = replace(load_section("model", params), pretrained=False, weights_file=None)
    loss = replace(load_section("loss", params), terms=ALL_TERMS)
    if demo_seconds is not None and (not math.isfinite(demo_seconds) or demo_seconds <= 0):
        raise ConfigError(f"--demo-seconds must be a positive number, got {demo_seconds!r}")
    return BenchConfig(
        common=load_section("common", params),
        model=model,
        loss=loss,
        train=load_section("train", params),
        bench=load_bench_params(params),
        manifest=load_section("manifest", params),
        data_dir=Path(data_dir) if data_dir is not None else None,
        demo_seconds=demo_seconds,
        demo_time_file=Path(demo_time_file) if demo_time_file is not None else None,
    )


# --------------------------------------------------------------------------- device facts


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, software versions and thread settings: the conditions every figure is measured under."""
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16=bool(torch.cuda.is_bf16_supported()),
            tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
            tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
        )
    else:
        info.update(name=info["cpu"], capability=torch.backends.cpu.get_cpu_capability(), bf16=cpu_bf16())
    return info


def load_average() -> float | None:
    """1-minute load average (None where the OS has none): how busy the machine was while timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_load(start: float | None, end: float | None) -> dict[str, Any]:
    """Load averages around the run; ``busy`` when other work held more than half of the CPUs,
    a state in which the timings say more about the neighbours than about this code."""
    cpus = os.cpu_count() or 1
    # The benchmark itself raises the load by about its thread count by the end; judge the start.
    busy = start is not None and start > 0.5 * cpus
    return {"start": start, "end": end, "cpu_count": cpus, "busy": busy}


def device_key(info: Mapping[str, Any]) -> str:
    """``<type>-<name slug>``: the key of this device's block in bench.json.

    CPUs of one name differ in whether they compute bf16 natively (AVX512-BF16/AMX), which changes
    every bf16 timing nearly twofold; one without it gets ``-no-bf16`` so that neither entry replaces
    the other.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", str(info["name"]).lower()).strip("-") or "unknown"
    no_bf16 = info["type"] == "cpu" and (info.get("bf16") or {}).get("native") is False
    return f"{info['type']}-{slug}" + ("-no-bf16" if no_bf16 else "")


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones (CUDA events on GPU)."""
    return time_interleaved({"fn": fn}, device, warmup, reps)["fn"]


def time_interleaved(fns: Mapping[str, Callable[[], Any]], device: torch.device, warmup: int,
                     reps: int) -> dict[str, list[float]]:
    """Like :func:`time_calls` for several functions, taking turns: repetition k of every function
    runs before repetition k + 1 of any, so a neighbour's burst of work slows all of them alike and
    their ratios (loss shares, the j sweep, TTA over plain) survive a busy machine."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    if device.type == "cuda":
        events = {k: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
                  for k in fns}
        for r in range(reps):
            for k, fn in fns.items():
                start, end = events[k][r]
                start.record()
                fn()
                end.record()
        torch.cuda.synchronize(device)
        return {k: [start.elapsed_time(end) / 1000.0 for start, end in ev] for k, ev in events.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def _timed_once(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _r(x: float, nd: int = 4) -> float:
    return float(f"{x:.{nd}g}")


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": _r(statistics.median(times)), "min_s": _r(min(times)), "all_s": [_r(t) for t in times]}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, warmup: int = 2, reps: int = 5) -> float:
    """Measured TFLOP/s of an ``n x n`` by ``n x n`` matmul: the device's practical peak for ``dtype``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    times = time_calls(lambda: torch.mm(a, b), device, warmup, reps)
    return 2.0 * n**3 / statistics.median(times) / 1e12


# --------------------------------------------------------------------------- the training step


def candidate_setups(train: TrainConfig, device: torch.device, bench: BenchParams) -> list[StepSetup]:
    """Baseline, ours and the candidates worth trying on ``device``; duplicates dropped (first name wins)."""
    cuda = device.type == "cuda"
    bf16_ok = bool(torch.cuda.is_bf16_supported()) if cuda else cpu_bf16()["supported"]
    setups = [StepSetup("baseline"), step_setup(train, device)]
    if not bench.candidates:
        return _unique(setups)
    setups.append(StepSetup("channels_last", channels_last=True, cudnn_benchmark=cuda))
    if bf16_ok:
        setups += [
            StepSetup("bf16", bf16=True, cudnn_benchmark=cuda),
            StepSetup("bf16_channels_last", bf16=True, channels_last=True, cudnn_benchmark=cuda),
        ]
    if cuda and bench.compile:
        setups.append(StepSetup("bf16_channels_last_compile", bf16=bf16_ok, channels_last=True, compile=True,
                                cudnn_benchmark=True))
    return _unique(setups)


def _unique(setups: list[StepSetup]) -> list[StepSetup]:
    unique: dict[tuple, StepSetup] = {}
    for s in setups:
        unique.setdefault(s.knobs(), s)
    return list(unique.values())


@dataclass
class Batch:
    image: Tensor
    mask: Tensor
    attributes: Tensor | None


def forward_flops(model: nn.Module, batch: Batch) -> float:
    """Forward FLOPs per image (multiply-add = 2), counted on two images in eval mode."""
    x = batch.image[:2]
    a = None if batch.attributes is None else batch.attributes[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, a)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / x.shape[0]


def _prepare(model: nn.Module, init: Mapping[str, Tensor], setup: StepSetup, lr: float,
             device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, torch.memory_format]:
    """Reset ``model`` to ``init`` in the memory format of ``setup``; a fresh Adam; compiled if asked."""
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    model.load_state_dict(init)
    model.to(memory_format=fmt).train()
    net: nn.Module = torch.compile(model) if setup.compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return net, torch.optim.Adam(model.parameters(), lr=lr), fmt


def full_gamma_epoch(cfg: LossConfig) -> int:
    """An epoch after the outlier weight's warm-up and ramp: the step of most of training."""
    return cfg.gamma_warmup_epochs + cfg.gamma_ramp_epochs


def _under(setup: StepSetup, device: torch.device, fn: Callable[[], Any]) -> Callable[[], None]:
    def call() -> None:
        with applied(setup, device):
            fn()

    return call


def bench_training(
    model: nn.Module,
    loss_cfg: LossConfig,
    batch: Batch,
    setups: list[StepSetup],
    device: torch.device,
    profile: DeviceProfile,
    lr: float,
    progress: tqdm | None = None,
) -> dict[str, dict[str, Any]]:
    """Time the training step under every set-up on the same batch and starting weights.

    Each set-up trains its own copy of ``model`` (its memory format, optimizer state, compiled
    graph), and the repetitions take turns across set-ups (:func:`time_interleaved`), so the
    speed-ups compare steps that ran under the same conditions.
    """
    from lggseg.losses import CompoundLoss

    loss_fn = CompoundLoss(loss_cfg)
    epoch = full_gamma_epoch(loss_cfg)
    init = copy.deepcopy(model.state_dict())
    calls: dict[str, Callable[[], None]] = {}
    results: dict[str, dict[str, Any]] = {}
    for setup in setups:
        if progress is not None:
            progress.set_postfix_str(f"train step: {setup.name}")
        replica = copy.deepcopy(model)
        net, optimizer, fmt = _prepare(replica, init, setup, lr, device)
        x = batch.image.contiguous(memory_format=fmt)
        step = functools.partial(train_step, net, optimizer, loss_fn, x, batch.mask, batch.attributes, epoch, setup.bf16)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with applied(setup, device):
            first = _timed_once(step, device)  # includes cudnn autotuning / compilation
            threads = torch.get_num_threads()
        results[setup.name] = {"setup": setup.describe(), "threads": threads, "first_step_s": _r(first)}
        if device.type == "cuda":
            # activations + optimizer state of one step (the other copies' weights excluded)
            results[setup.name]["step_memory_gib"] = _r((torch.cuda.max_memory_allocated(device) - before) / 2**30, 3)
        calls[setup.name] = _under(setup, device, step)
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.set_postfix_str("train steps, in turns")
    times = time_interleaved(calls, device, max(profile.warmup - 1, 0), profile.reps)
    for name, t in times.items():
        results[name].update(images_per_s=_r(batch.image.shape[0] / statistics.median(t)), step=_stats(t))
    del calls
    return results


# --------------------------------------------------------------------------- loss cost


def outlier_loss_fn(cfg: LossConfig, mode: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The outlier term of ``mode`` (``paper`` or ``isolated_bce``) with the windows of ``cfg``."""
    from lggseg.losses import isolated_bce_loss, outlier_loss

    if mode == "paper":
        return lambda lg, t: outlier_loss(lg, t, cfg)
    return lambda lg, t: isolated_bce_loss(lg, t, cfg)


def _loss_fns(cfg: LossConfig) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    from lggseg.losses import CompoundLoss, bce_loss, dice_loss

    compound = CompoundLoss(cfg)
    epoch = full_gamma_epoch(cfg)
    return {
        "bce": bce_loss,
        "dice": lambda lg, t: dice_loss(lg, t, smooth=cfg.smooth),
        "outlier_paper": outlier_loss_fn(cfg, "paper"),
        "outlier_isolated_bce": outlier_loss_fn(cfg, "isolated_bce"),
        "compound": lambda lg, t: compound(lg, t, epoch=epoch)[0],
    }


def _loss_call(fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, target: Tensor) -> Callable[[], None]:
    def call() -> None:
        logits.grad = None
        fn(logits, target).backward()

    return call


def bench_losses(
    cfg: LossConfig, target: Tensor, step_s: float, js: tuple[int, ...], device: torch.device, profile: DeviceProfile
) -> dict[str, Any]:
    """Forward + backward seconds of each loss term and their share of a training step of ``step_s``;
    the outlier terms for every ``j`` of ``js`` (all timed in turns, see :func:`time_interleaved`)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (3.0 * torch.randn(target.shape, generator=gen)).to(device).requires_grad_(True)
    target = target.float()
    calls = {name: _loss_call(fn, logits, target) for name, fn in _loss_fns(cfg).items()}
    for j in js:
        cfg_j = replace(cfg, j=j)  # re-validates: i < j
        for mode in ("paper", "isolated_bce"):
            calls[f"j{j}/{mode}"] = _loss_call(outlier_loss_fn(cfg_j, mode), logits, target)
    times = time_interleaved(calls, device, max(profile.warmup, 2), profile.loss_reps)

    terms: dict[str, Any] = {}
    for name in _loss_fns(cfg):
        med = statistics.median(times[name])
        terms[name] = {"fwd_bwd_s": _r(med), "share_of_step": _r(med / step_s, 3)}
    terms["outlier"] = {**terms[f"outlier_{cfg.outlier_mode}"], "mode": cfg.outlier_mode}
    sweep: dict[str, Any] = {}
    for j in js:
        row = {}
        for mode in ("paper", "isolated_bce"):
            row[f"{mode}_s"] = _r(statistics.median(times[f"j{j}/{mode}"]))
            row[f"{mode}_min_s"] = _r(min(times[f"j{j}/{mode}"]))
        sweep[str(j)] = row
    flat = {}
    for mode in ("paper", "isolated_bce"):
        med = [sweep[str(j)][f"{mode}_s"] for j in js]
        best = [sweep[str(j)][f"{mode}_min_s"] for j in js]
        # Interference from other processes only ever adds time, so the fastest repetition is the
        # cleanest estimate of the algorithm's own cost: flatness is judged on it.
        ratio = max(best) / min(best)
        flat[mode] = {"max_over_min": _r(max(med) / min(med), 3), "max_over_min_fastest": _r(ratio, 3),
                      "flat": ratio < FLAT_RATIO_LIMIT}
    n_pixels = int(target.numel())
    return {
        "terms": terms,
        "step_s": _r(step_s),
        "outlier_by_j": {"i": cfg.i, "j": list(js), "seconds": sweep, "flatness": flat,
                         "flat_limit": FLAT_RATIO_LIMIT, "pixels": n_pixels},
    }


# --------------------------------------------------------------------------- data pipeline


@contextlib.contextmanager
def open_store(cfg: BenchConfig) -> Iterator[tuple[Any, str]]:
    """The manifest store to read (``cfg.data_dir``), or a small synthetic one built in a temp dir."""
    from lggseg.manifest import build_manifest, load_store

    if cfg.data_dir is not None:
        yield load_store(cfg.data_dir), str(cfg.data_dir)
        return
    from lggseg.demo import generate_demo

    with tempfile.TemporaryDirectory(prefix="lggseg-bench-") as tmp:
        raw = generate_demo(Path(tmp) / "raw", n_cases=cfg.bench.synthetic_cases, seed=cfg.common.seed)
        build_manifest(raw, Path(tmp) / "manifest", cfg.common, cfg.manifest)
        yield load_store(Path(tmp) / "manifest"), f"synthetic demo store ({cfg.bench.synthetic_cases} cases)"


def _train_rows(store: Any) -> np.ndarray:
    rows = store.indices("train")
    return rows if len(rows) else np.arange(len(store.images), dtype=np.int64)


def make_loader(store: Any, cfg: BenchConfig, batch_size: int, n_batches: int, workers: int,
                device: torch.device) -> DataLoader:
    """The training DataLoader of :mod:`lggseg.train` (same dataset, augmentation and workers), drawing
    ``n_batches`` random batches of train slices (with replacement, so any store size will do)."""
    from lggseg.dataset import EpochSampler, SliceDataset
    from lggseg.train import seed_worker

    ds = SliceDataset(store, _train_rows(store), cfg.common.image_size, cfg.train.augment, seed=cfg.common.seed)
    gen = torch.Generator().manual_seed(cfg.common.seed)
    sampler = EpochSampler(RandomSampler(ds, replacement=True, num_samples=batch_size * n_batches, generator=gen))
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", worker_init_fn=seed_worker, generator=gen, drop_last=True)


def first_batch(store: Any, cfg: BenchConfig, batch_size: int, device: torch.device) -> Batch:
    """One augmented training batch on ``device``: the fixed input of every timed step."""
    b = next(iter(make_loader(store, cfg, batch_size, 1, 0, torch.device("cpu"))))
    attrs = b["attributes"].to(device) if cfg.model.attributes else None
    return Batch(b["image"].to(device), b["mask"].to(device), attrs)


def loader_rate(store: Any, cfg: BenchConfig, batch_size: int, n_batches: int, workers: int,
                device: torch.device) -> dict[str, Any]:
    """Images/s delivered after the first batch (worker start-up is timed apart)."""
    loader = make_loader(store, cfg, batch_size, n_batches + 1, workers, device)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = 0
    for b in it:
        n += int(b["image"].shape[0])
    t2 = time.perf_counter()
    return {"workers": workers, "images_per_s": _r(n / (t2 - t1)), "images": n, "startup_s": _r(t1 - t0)}


def bench_data(store: Any, cfg: BenchConfig, batch_size: int, model_ips: float, device: torch.device,
               profile: DeviceProfile) -> dict[str, Any]:
    """Loader images/s over the images/s the training step consumes (``model_ips``), against
    :data:`DATA_RATIO_TARGET`; with workers, also one process's rate and the workers needed."""
    workers = cfg.train.num_workers
    main = loader_rate(store, cfg, batch_size, profile.data_batches, workers, device)
    ratio = main["images_per_s"] / model_ips
    out: dict[str, Any] = {
        "loader": main,
        "model_images_per_s": _r(model_ips),
        "ratio": _r(ratio, 3),
        "target": DATA_RATIO_TARGET,
        "ok": ratio >= DATA_RATIO_TARGET,
    }
    if workers > 0:
        # One process's rate tells how many workers the model needs, whatever this machine has.
        single = loader_rate(store, cfg, batch_size, max(2, profile.data_batches // 4), 0, device)
        out["single_process_images_per_s"] = single["images_per_s"]
        out["workers_needed"] = max(1, math.ceil(DATA_RATIO_TARGET * model_ips / single["images_per_s"]))
    return out


# --------------------------------------------------------------------------- training fed by the loader


def bench_loop(model: nn.Module, init: Mapping[str, Tensor], cfg: BenchConfig, store: Any, setup: StepSetup,
               device: torch.device, profile: DeviceProfile, batch_size: int) -> dict[str, Any]:
    """Images/s of the training loop fed by the real DataLoader (its workers compete with the step's
    threads for the cores, as in training): wall time of ``reps`` steps after ``1 + warmup``."""
    from lggseg.losses import CompoundLoss

    loss_fn = CompoundLoss(cfg.loss)
    epoch = full_gamma_epoch(cfg.loss)
    net, optimizer, fmt = _prepare(model, init, setup, cfg.train.lr, device)
    n_steps = 1 + profile.warmup + profile.reps
    loader = make_loader(store, cfg, batch_size, n_steps, cfg.train.num_workers, device)
    use_attr = cfg.model.attributes
    with applied(setup, device):
        batches = iter(loader)

        def one() -> None:
            b = next(batches)
            x = b["image"].to(device, non_blocking=True, memory_format=fmt)
            y = b["mask"].to(device, non_blocking=True)
            a = b["attributes"].to(device, non_blocking=True) if use_attr else None
            train_step(net, optimizer, loss_fn, x, y, a, epoch, setup.bf16)

        first = _timed_once(one, device)  # worker start-up, autotuning, compilation
        for _ in range(profile.warmup):
            one()
        seconds = _timed_once(lambda: [one() for _ in range(profile.reps)], device)
        threads = torch.get_num_threads()
    model.to(memory_format=torch.contiguous_format)
    return {"setup": setup.describe(), "threads": threads, "workers": cfg.train.num_workers,
            "images_per_s": _r(profile.reps * batch_size / seconds), "seconds": _r(seconds),
            "steps": profile.reps, "first_step_s": _r(first)}


_CHILD_RESULT = "LGGSEG_BENCH_RESULT "


def _as_params(cfg: BenchConfig) -> dict[str, Any]:
    return {k: dataclasses.asdict(getattr(cfg, k)) for k in ("common", "model", "loss", "train", "bench", "manifest")}


def _child_main(payload: str) -> None:
    """Entry point of :func:`loop_in_child`: one :func:`bench_loop` in a fresh process."""
    from lggseg.models import build_model

    p = json.loads(payload)
    cfg = bench_config(p["params"], data_dir=p["store"], demo_time_file=None)
    device = torch.device(p["device"])
    with open_store(cfg) as (store, _):
        torch.manual_seed(cfg.common.seed)
        n_attr = int(store.attributes.shape[1]) if cfg.model.attributes else 0
        model = build_model(cfg.model, n_attr, cfg.common.image_size).to(device)
        result = bench_loop(model, copy.deepcopy(model.state_dict()), cfg, store, StepSetup(**p["setup"]), device,
                            DeviceProfile(**p["profile"]), p["batch_size"])
    print(_CHILD_RESULT + json.dumps(result), flush=True)


def loop_in_child(cfg: BenchConfig, store_dir: Path, setup: StepSetup, device: torch.device, profile: DeviceProfile,
                  batch_size: int, env: Mapping[str, str]) -> dict[str, Any]:
    """:func:`bench_loop` in a subprocess with extra environment ``env``: OpenMP reads its settings
    (``OMP_WAIT_POLICY``) once, when the process starts, so they cannot be tried in this one."""
    payload = json.dumps({"params": _as_params(cfg), "store": str(store_dir), "setup": dataclasses.asdict(setup),
                          "profile": dataclasses.asdict(profile), "batch_size": batch_size, "device": str(device)})
    code = "import sys; from lggseg.bench import _child_main; _child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, payload], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_CHILD_RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark subprocess with {dict(env)} failed (exit {proc.returncode}): {tail}")
    return {**json.loads(lines[-1][len(_CHILD_RESULT):]), "env": dict(env)}


def loop_variants(best: StepSetup, ours: StepSetup, device: torch.device, workers: int) -> list[tuple[StepSetup, dict[str, str]]]:
    """Set-ups to time with the loader: ours, the best isolated step, and on CPU the thread settings
    that matter when DataLoader workers share the cores (fewer threads, passive OpenMP waiting)."""
    variants: list[tuple[StepSetup, dict[str, str]]] = [(ours, {})]
    if best.knobs() != ours.knobs():
        variants.append((best, {}))
    if device.type == "cpu":
        default = torch.get_num_threads()
        spare = max(1, (os.cpu_count() or default) - workers)
        if spare < default:
            variants.append((replace(best, name=f"{best.name}_threads{spare}", threads=spare), {}))
        variants.append((replace(best, name=f"{best.name}_omp_passive"), {"OMP_WAIT_POLICY": "PASSIVE"}))
    return variants


def bench_with_loader(model: nn.Module, cfg: BenchConfig, store: Any, variants: list[tuple[StepSetup, dict[str, str]]],
                      device: torch.device, profile: DeviceProfile, batch_size: int,
                      progress: tqdm | None = None) -> dict[str, Any]:
    init = copy.deepcopy(model.state_dict())
    out: dict[str, Any] = {}
    for setup, env in variants:
        if progress is not None:
            progress.set_postfix_str(f"train + loader: {setup.name}")
        if env:
            out[setup.name] = loop_in_child(cfg, Path(store.root), setup, device, profile, batch_size, env)
        else:
            out[setup.name] = bench_loop(model, init, cfg, store, setup, device, profile, batch_size)
        if progress is not None:
            progress.update()
    model.load_state_dict(init)
    return out


# --------------------------------------------------------------------------- inference


def bench_inference(model: nn.Module, batch: Batch, native: tuple[int, int], device: torch.device,
                    profile: DeviceProfile) -> dict[str, Any]:
    """Slices/s of ``lggseg predict``'s inference function (:func:`lggseg.predict.infer_probabilities`,
    probabilities upsampled to the ``native`` slice size as predict does) without and with TTA."""
    from lggseg.predict import infer_probabilities

    model.eval()
    out: dict[str, Any] = {}
    try:
        calls = {("tta" if tta else "plain"): functools.partial(infer_probabilities, model, batch.image,
                                                               batch.attributes, out_size=native, tta=tta)
                 for tta in (False, True)}
        times = time_interleaved(calls, device, max(profile.warmup, 1), profile.infer_batches)
        for name, t in times.items():
            out[name] = {"slices_per_s": _r(batch.image.shape[0] / statistics.median(t)), **_stats(t)}
    finally:
        model.train()
    return out


# --------------------------------------------------------------------------- demo time


def demo_time(seconds: float | None, path: Path | None) -> dict[str, Any]:
    """The demo ``dvc repro`` wall time, from the command line or from the file the demo writes."""
    if seconds is not None:
        return {"seconds": _r(seconds), "source": "--demo-seconds"}
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable demo time file ({exc})") from None
        value = data.get("seconds") if isinstance(data, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise DataError(f"{path}: expected a JSON object with a positive 'seconds', got {data!r}")
        return {"seconds": _r(float(value)), "source": str(path)}
    where = f" or write {path}" if path is not None else ""
    return {"seconds": None, "source": f"not measured: pass --demo-seconds{where}"}


# --------------------------------------------------------------------------- the whole run


def _conditions(info: Mapping[str, Any], threads: int, image_size: int, batch_size: int) -> dict[str, Any]:
    return {"device": info["name"], "torch": info["torch"], "threads": threads,
            "image_size": image_size, "batch_size": batch_size}


def _merge_write(out_json: Path, key: str, entry: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if out_json.is_file():
        try:
            doc = json.loads(out_json.read_text())
        except ValueError as exc:
            raise DataError(f"{out_json}: existing benchmark file is not valid JSON ({exc}); move it away") from None
        if not isinstance(doc, dict):
            raise DataError(f"{out_json}: existing benchmark file is not a JSON object; move it away")
    doc[key] = entry
    write_json(out_json, doc)
    return doc


def run_benchmark(cfg: BenchConfig, out_json: str | Path, device: str | torch.device = "auto") -> dict[str, Any]:
    """Run every measurement on ``device``, merge them into ``out_json`` under this device's key.

    Returns this device's block (its key under ``"key"``).
    """
    t_start = time.perf_counter()
    load_start = load_average()
    dev = resolve_device(device, indexed=True)
    profile = cfg.bench.profile(dev)
    batch_size = profile.batch_size or cfg.train.batch_size
    size = cfg.common.image_size
    info = device_info(dev)
    key = device_key(info)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    setups = candidate_setups(cfg.train, dev, cfg.bench)
    # model + per-setup steps + loss + data + inference + matmul
    paths = cfg.bench.paths
    progress = tqdm(total=len(setups) + 5 + 2 * paths, desc=f"bench {key}", unit="part")
    try:
        with open_store(cfg) as (store, store_source):
            torch.manual_seed(cfg.common.seed)
            n_attr = int(store.attributes.shape[1]) if cfg.model.attributes else 0
            from lggseg.models import build_model, count_parameters

            model = build_model(cfg.model, n_attr, size).to(dev)
            batch = first_batch(store, cfg, batch_size, dev)
            fwd_flops = forward_flops(model, batch)
            progress.update()

            training = bench_training(model, cfg.loss, batch, setups, dev, profile, cfg.train.lr, progress)
            base_ips = training["baseline"]["images_per_s"]
            for entry in training.values():
                entry["speedup_vs_baseline"] = _r(entry["images_per_s"] / base_ips, 3)
            best = max(training, key=lambda n: training[n]["images_per_s"])
            ours = next(s.name for s in setups if s.knobs() == step_setup(cfg.train, dev).knobs())
            by_name = {s.name: s for s in setups}
            variants = loop_variants(by_name[best], by_name[ours], dev, cfg.train.num_workers)
            progress.total += len(variants)
            with_loader = bench_with_loader(model, cfg, store, variants, dev, profile, batch_size, progress)
            recommended = max(with_loader, key=lambda n: with_loader[n]["images_per_s"])
            ours_ips = training[ours]["images_per_s"]
            ours_step = training[ours]["step"]["median_s"]
            threads = training[ours]["threads"]

            progress.set_postfix_str("matmul rate")
            rates = {"float32": matmul_rate(dev, torch.float32, profile.matmul_size)}
            bf16_ok = info["bf16"] if dev.type == "cuda" else info["bf16"]["supported"]
            if bf16_ok:
                rates["bfloat16"] = matmul_rate(dev, torch.bfloat16, profile.matmul_size)
            progress.update()
            train_flops = 3.0 * fwd_flops
            for entry in training.values():
                achieved = train_flops * entry["images_per_s"]
                dtype = "bfloat16" if entry["setup"]["bf16"] and "bfloat16" in rates else "float32"
                entry["achieved_tflops"] = _r(achieved / 1e12, 3)
                entry["share_of_matmul_rate"] = {"dtype": dtype, "share": _r(achieved / (rates[dtype] * 1e12), 3)}

            progress.set_postfix_str("loss terms")
            losses = bench_losses(cfg.loss, batch.mask, ours_step, cfg.bench.outlier_js, dev, profile)
            progress.update()
            progress.set_postfix_str("data loader")
            data = bench_data(store, cfg, batch_size, ours_ips, dev, profile)
            progress.update()
            progress.set_postfix_str("inference")
            native = (int(store.masks.shape[1]), int(store.masks.shape[2]))
            inference = bench_inference(model, batch, native, dev, profile)
            progress.update()
            n_params = count_parameters(model)
            data_paths = concurrent = None
            if paths:
                from lggseg.bench_paths import bench_concurrent, bench_data_paths

                del model, batch
                progress.set_postfix_str("resident vs loader path")
                data_paths = bench_data_paths(cfg, store, dev, profile, batch_size)
                progress.update()
                progress.set_postfix_str("two variants at once vs one after another")
                concurrent = bench_concurrent(cfg, dev)
                progress.update()
    finally:
        progress.close()

    cond = _conditions(info, threads, size, batch_size)
    entry: dict[str, Any] = {
        "key": key,
        "measured_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": info,
        "settings": {
            "arch": cfg.model.arch, "encoder": cfg.model.encoder, "attributes": cfg.model.attributes,
            "n_attributes": n_attr, "image_size": size, "batch_size": batch_size, "loss_terms": list(cfg.loss.terms),
            "outlier_mode": cfg.loss.outlier_mode, "warmup": profile.warmup, "reps": profile.reps,
            "loss_reps": profile.loss_reps, "data_batches": profile.data_batches,
            "infer_batches": profile.infer_batches, "statistic": "median", "store": store_source,
        },
        "model": {
            "parameters_m": _r(n_params / 1e6),
            "forward_gflop_per_image": _r(fwd_flops / 1e9),
            "train_gflop_per_image": _r(train_flops / 1e9),
            "flop_note": "train = 3 x forward (backward ~ 2 x forward); FlopCounterMode over-counts the "
                         "backward of grouped convolutions (regnetz), so it is not counted directly",
        },
        "matmul_tflops": {k: _r(v, 3) for k, v in rates.items()} | {"n": profile.matmul_size},
        "training": {
            "conditions": cond,
            "ours": ours,
            "speedup": training[ours]["speedup_vs_baseline"],
            "best": best,
            "best_speedup": training[best]["speedup_vs_baseline"],
            "setups": training,
            "with_loader": with_loader,
            "with_loader_recommended": recommended,
            "with_loader_gain_vs_ours": _r(with_loader[recommended]["images_per_s"] / with_loader[ours]["images_per_s"], 3),
        },
        "loss": {"conditions": cond, **losses},
        "data": {"conditions": cond, **data},
        "inference": {"conditions": cond, **inference},
        **({"data_paths": data_paths, "concurrent": concurrent} if paths else {}),
        "demo_repro": demo_time(cfg.demo_seconds, cfg.demo_time_file),
        "machine_load": machine_load(load_start, load_average()),
    }
    entry["bench_seconds"] = _r(time.perf_counter() - t_start)
    _merge_write(Path(out_json), key, entry)
    return entry


def summary_lines(entry: Mapping[str, Any]) -> list[str]:
    """A few human-readable lines of one device's results."""
    tr, loss, data, inf = entry["training"], entry["loss"], entry["data"], entry["inference"]
    s = tr["setups"]
    lines = [f"{entry['key']} ({entry['settings']['encoder']}, {entry['settings']['image_size']}px, "
             f"batch {entry['settings']['batch_size']}, {tr['conditions']['threads']} threads)"]
    lines += [f"  train {name:<28} {v['images_per_s']:>9.2f} img/s  x{v['speedup_vs_baseline']:.2f}" for name, v in s.items()]
    lines.append(f"  ours = {tr['ours']} (x{tr['speedup']:.2f}); best = {tr['best']} (x{tr['best_speedup']:.2f})")
    lines += [f"  train + loader {name:<28} {v['images_per_s']:>9.2f} img/s ({v['threads']} threads, {v['workers']} workers"
              + (f", {' '.join(f'{k}={x}' for k, x in v['env'].items())}" if v.get("env") else "") + ")"
              for name, v in tr["with_loader"].items()]
    lines.append(f"  with the loader, {tr['with_loader_recommended']} is x{tr['with_loader_gain_vs_ours']:.2f} ours")
    t = loss["terms"]
    lines.append("  loss share of step: " + ", ".join(f"{k} {t[k]['share_of_step']:.1%}" for k in ("bce", "dice", "outlier")))
    fl = loss["outlier_by_j"]["flatness"]
    lines.append("  outlier j sweep, slowest/fastest j (fastest reps): "
                 + ", ".join(f"{m} {v['max_over_min_fastest']:.2f}{'' if v['flat'] else ' NOT FLAT'}" for m, v in fl.items()))
    lines.append(f"  data: {data['loader']['images_per_s']:.1f} img/s with {data['loader']['workers']} workers, "
                 f"ratio {data['ratio']:.2f} ({'ok' if data['ok'] else 'BELOW ' + str(DATA_RATIO_TARGET)})")
    lines.append(f"  inference: {inf['plain']['slices_per_s']:.2f} slices/s, TTA {inf['tta']['slices_per_s']:.2f} slices/s")
    if "data_paths" in entry:
        for size, v in entry["data_paths"]["sizes"].items():
            lines.append(f"  step + data at {size}: loader {v['loader']['images_per_s']:.2f} img/s, resident "
                         f"{v['resident']['images_per_s']:.2f} img/s (x{v['ratio_resident_over_loader']:.2f})")
        c = entry["concurrent"]
        same = "" if "identical_results" not in c else (", results identical" if c["identical_results"]
                                                          else ", RESULTS DIFFER")
        lines.append(f"  2 variants at {c['image_size']}px: one after another {c['sequential_s']:.1f} s, at once "
                     f"{c['concurrent_s']:.1f} s (x{c['ratio_concurrent_over_sequential']:.2f}){same}")
    demo = entry["demo_repro"]
    lines.append(f"  demo dvc repro: {demo['source']}" if demo["seconds"] is None
                 else f"  demo dvc repro: {demo['seconds']:.0f} s ({demo['source']})")
    load = entry["machine_load"]
    if load["busy"]:
        lines.append(f"  WARNING: the machine was busy (load average {load['start']} -> {load['end']} on "
                     f"{load['cpu_count']} CPUs): these timings are unreliable")
    lines.append(f"  benchmark took {entry['bench_seconds']:.0f} s")
    return lines


def build_parser(prog: str = "lggseg bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Benchmark training, loss, data loading and inference.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="metrics/bench.json", help="bench JSON to merge this device's results into")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: common.device)")
    ap.add_argument("--data", default=None, help="manifest store to read (default: a small synthetic one)")
    ap.add_argument("--demo-seconds", type=float, default=None, help="wall time of the demo's dvc repro")
    ap.add_argument("--demo-time-file", default=str(DEMO_TIME_FILE), help='JSON {"seconds": ...} written by make demo')
    ap.add_argument("--batch-size", type=int, default=None, help="override the device profile's batch size")
    ap.add_argument("--reps", type=int, default=None, help="override the device profile's repetitions")
    ap.add_argument("--no-candidates", action="store_true", help="time only the baseline and our set-up")
    ap.add_argument("--no-compile", action="store_true", help="do not time torch.compile on CUDA")
    ap.add_argument("--no-paths", action="store_true",
                    help="skip resident vs DataLoader path and concurrent vs sequential variants")
    return ap


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of the params file with the command line's overrides of the ``bench`` section."""
    params = read_params(args.params)
    over: dict[str, Any] = {}
    profile = {k: v for k, v in (("batch_size", args.batch_size), ("reps", args.reps)) if v is not None}
    if profile:
        over.update(cpu=profile, cuda=profile)
    if args.no_candidates:
        over["candidates"] = False
    if args.no_compile:
        over["compile"] = False
    if args.no_paths:
        over["paths"] = False
    params = deep_merge(params, {"bench": over})
    return bench_config(params, args.data, args.demo_seconds, args.demo_time_file)


def main(argv: list[str] | None = None, prog: str = "lggseg bench") -> int:
    """``lggseg bench``: run the benchmark; exit 2 with a one-line message on bad input."""
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = config_from_args(args)
        entry = run_benchmark(cfg, args.out, args.device or cfg.common.device)
    except LggsegError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(entry)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
