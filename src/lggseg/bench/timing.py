"""What the benchmark measures with: its parameters (``bench`` section), device facts, the timers, and
the demo's wall time (:func:`demo_time`).

Part of ``lggseg bench`` (:mod:`lggseg.bench.run` has the whole story in its docstring).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

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
from lggseg.errors import DataError
from lggseg.runtime import cpu_name, probe_cpu_bf16

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
    # issue #11 (lggseg.bench.paths): resident vs DataLoader path, and two variants at once vs one after another
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
        info.update(name=info["cpu"], capability=torch.backends.cpu.get_cpu_capability(), bf16=probe_cpu_bf16())
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
