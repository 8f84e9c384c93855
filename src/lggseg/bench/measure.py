"""The measurements of ``lggseg bench`` (:mod:`lggseg.bench.run` puts them together into ``metrics/bench.json``).

Every figure is the median of ``reps`` timed repetitions after ``warmup`` untimed ones (the first call,
which pays for cuDNN autotuning or compilation, is reported apart), each between two synchronisations of
the device. Things that are compared (step set-ups, loss terms and the
``j`` sweep, inference with and without TTA) take turns repetition by repetition,
so a busy neighbour slows them alike and their ratios hold.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lggseg.config import LossConfig, TrainConfig
from lggseg.runtime import cpu_bf16, cpu_channels_last_unsafe, cpu_name, probe_cpu_bf16
from lggseg.training.step import StepSetup, applied, step_setup, train_step

FLAT_RATIO_LIMIT = 2.0
"""Outlier-loss time at the largest ``j`` over the smallest must stay below this: box sums from an
integral image grow only with their zero padding ((256 + 81) / (256 + 21) = 1.2x from j = 21 to 81 at
256 px), an O(j) running window would give ~3.9x and a direct O(j^2) window ~15x."""


def r4(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (what bench.json stores)."""
    return float(f"{x:.{digits}g}")


def stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": r4(statistics.median(times)), "min_s": r4(min(times)), "all_s": [r4(t) for t in times]}


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, software versions and threads: the conditions every figure is measured under."""
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=bool(torch.cuda.is_bf16_supported()))
    else:
        info.update(name=info["cpu"], capability=torch.backends.cpu.get_cpu_capability(), bf16=probe_cpu_bf16())
    return info


def device_key(info: Mapping[str, Any]) -> str:
    """``<type>-<name slug>``, the key of the device's block; a CPU without native bf16 (AVX512-BF16/AMX)
    gets ``-no-bf16``, since that changes every bf16 timing about twofold."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(info["name"]).lower()).strip("-") or "unknown"
    no_bf16 = info["type"] == "cpu" and (info.get("bf16") or {}).get("native") is False
    return f"{info['type']}-{slug}" + ("-no-bf16" if no_bf16 else "")


def load_average() -> float | None:
    """1-minute load average (None where the OS has none): how busy the machine was."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, between two synchronisations of ``device``."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_interleaved(fns: Mapping[str, Callable[[], Any]], device: torch.device, warmup: int,
                     reps: int) -> dict[str, list[float]]:
    """Seconds of ``reps`` calls of each function after ``warmup`` untimed ones, taking turns: repetition
    k of every function runs before repetition k + 1 of any."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed_once(fn, device))
    return times


def candidate_setups(train: TrainConfig, device: torch.device) -> list[StepSetup]:
    """The plain float32 baseline, ours (:func:`step_setup`) and channels_last / bf16 / both alone (bf16
    only where the device computes it; channels_last on a CPU only under ``LGGSEG_CPU_CHANNELS_LAST=unsafe``,
    since it crashed libtorch_cpu, issue #21); set-ups with the same knobs are timed once (first name wins)."""
    cuda = device.type == "cuda"
    channels_last = cuda or cpu_channels_last_unsafe()
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_bf16()["supported"]
    setups = [StepSetup("baseline"), step_setup(train, device)]
    if channels_last:
        setups.append(StepSetup("channels_last", channels_last=True, cudnn_benchmark=cuda))
    if bf16:
        setups.append(StepSetup("bf16", bf16=True, cudnn_benchmark=cuda))
    if bf16 and channels_last:
        setups.append(StepSetup("bf16_channels_last", bf16=True, channels_last=True, cudnn_benchmark=cuda))
    unique: dict[tuple, StepSetup] = {}
    for s in setups:
        unique.setdefault(s.knobs(), s)
    return list(unique.values())


def training_steps(model: nn.Module, loss_fn: nn.Module, batch: Mapping[str, Tensor | None], setups: list[StepSetup],
                   device: torch.device, warmup: int, reps: int, lr: float, epoch: int) -> dict[str, dict[str, Any]]:
    """Images/s of :func:`train_step` under each set-up, on one batch, from the same starting weights
    (each set-up trains its own copy: memory format, Adam state, compiled graph)."""
    calls, out = {}, {}
    for setup in setups:
        fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
        net = copy.deepcopy(model).to(memory_format=fmt).train()
        net = torch.compile(net) if setup.compile else net
        step = functools.partial(train_step, net, torch.optim.Adam(net.parameters(), lr=lr), loss_fn,
                                 batch["image"].contiguous(memory_format=fmt), batch["mask"], batch["attributes"],
                                 epoch, setup.bf16)

        def call(step: Callable[[], Any] = step, setup: StepSetup = setup) -> None:
            with applied(setup, device):
                step()

        with applied(setup, device):
            out[setup.name] = {"setup": setup.describe(), "threads": torch.get_num_threads(),
                               "first_step_s": r4(timed_once(step, device))}
        calls[setup.name] = call
    n = batch["image"].shape[0]
    for name, t in time_interleaved(calls, device, max(warmup - 1, 0), reps).items():
        out[name].update(images_per_s=r4(n / statistics.median(t)), step=stats(t))
    return out


def outlier_fn(cfg: LossConfig, mode: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The outlier term of ``mode`` (``paper``: eq. 12; ``isolated_bce``: ours) with the windows of ``cfg``."""
    from lggseg.losses import isolated_bce_loss, outlier_loss

    fn = outlier_loss if mode == "paper" else isolated_bce_loss
    return lambda logits, target: fn(logits, target, cfg)


def loss_costs(cfg: LossConfig, target: Tensor, step_s: float, js: tuple[int, ...], device: torch.device,
               reps: int) -> dict[str, Any]:
    """Forward + backward seconds of each loss term and their share of a training step of ``step_s``;
    the outlier terms at every ``j`` of ``js`` (``flat``: slowest over fastest j below :data:`FLAT_RATIO_LIMIT`,
    judged on each j's fastest repetition, since a neighbour's work only ever adds time)."""
    from lggseg.losses import bce_loss, dice_loss

    gen = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(target.shape, generator=gen)).to(device).requires_grad_(True)
    target = target.float()
    fns = {"bce": bce_loss, "dice": lambda lg, t: dice_loss(lg, t, smooth=cfg.smooth),
           "outlier_paper": outlier_fn(cfg, "paper"), "outlier_isolated_bce": outlier_fn(cfg, "isolated_bce")}
    for j in js:
        for mode in ("paper", "isolated_bce"):
            fns[f"{j}/{mode}"] = outlier_fn(dataclasses.replace(cfg, j=j), mode)  # re-validates i < j

    def call(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], None]:
        def run() -> None:
            logits.grad = None
            fn(logits, target).backward()
        return run

    times = time_interleaved({k: call(fn) for k, fn in fns.items()}, device, 2, reps)
    terms = {k: {"fwd_bwd_s": r4(statistics.median(times[k])), "share_of_step": r4(statistics.median(times[k]) / step_s, 3)}
             for k in ("bce", "dice", "outlier_paper", "outlier_isolated_bce")}
    seconds = {str(j): {f"{m}_{s}": r4(f(times[f"{j}/{m}"])) for m in ("paper", "isolated_bce")
                        for s, f in (("s", statistics.median), ("min_s", min))} for j in js}
    flatness = {}
    for m in ("paper", "isolated_bce"):
        fastest = [seconds[str(j)][f"{m}_min_s"] for j in js]
        ratio = max(fastest) / min(fastest)
        flatness[m] = {"max_over_min_fastest": r4(ratio, 3), "flat": ratio < FLAT_RATIO_LIMIT}
    return {"terms": terms, "step_s": r4(step_s), "outlier_by_j": {
        "i": cfg.i, "j": list(js), "seconds": seconds, "flatness": flatness, "flat_limit": FLAT_RATIO_LIMIT}}


def train_rows(store: Any) -> np.ndarray:
    rows = store.indices("train")
    return rows if len(rows) else np.arange(len(store.images), dtype=np.int64)


def make_loader(store: Any, size: int, train: TrainConfig, seed: int, batch_size: int, n_batches: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The training DataLoader's work (memmap read, resize, augmentation on ``train.num_workers`` workers)
    for ``n_batches`` random batches of train slices, drawn with replacement so any store will do."""
    from torch.utils.data import DataLoader, RandomSampler

    from lggseg.data.dataset import EpochSampler, SliceDataset

    ds = SliceDataset(store, train_rows(store), size, train.augment, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    sampler = EpochSampler(RandomSampler(ds, replacement=True, num_samples=batch_size * n_batches, generator=gen))
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=train.num_workers,
                      pin_memory=device.type == "cuda", drop_last=True)


def loader_rate(loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    """Images/s the loader delivers after its first batch (worker start-up is timed apart)."""
    t0 = time.perf_counter()
    batches = iter(loader)
    next(batches)
    t1 = time.perf_counter()
    n = sum(int(b["image"].shape[0]) for b in batches)
    seconds = time.perf_counter() - t1
    return {"workers": loader.num_workers, "images_per_s": r4(n / seconds), "images": n, "startup_s": r4(t1 - t0)}


def inference(model: nn.Module, batch: Mapping[str, Tensor | None], native: tuple[int, int], device: torch.device,
              warmup: int, reps: int) -> dict[str, Any]:
    """Slices/s of ``lggseg predict``'s inference (probabilities upsampled to the ``native`` slice size),
    without and with TTA."""
    from lggseg.inference import infer_probabilities

    model.eval()
    try:
        calls = {name: functools.partial(infer_probabilities, model, batch["image"], batch["attributes"],
                                         out_size=native, tta=name == "tta") for name in ("plain", "tta")}
        times = time_interleaved(calls, device, max(warmup, 1), reps)
    finally:
        model.train()
    return {k: {"slices_per_s": r4(batch["image"].shape[0] / statistics.median(t)), **stats(t)} for k, t in times.items()}


def concurrent_variants(runs: list[Any], store: Any, seed: int, device: torch.device) -> dict[str, Any]:
    """Wall time of ``runs`` trained one after another (:func:`lggseg.training.train_variant`) and
    in turns in one process (:func:`lggseg.training.concurrent.train_variants`), everything a call does
    included; on the CPU also whether both gave the same results (they must). Each model first takes
    one untimed step, so that neither mode pays alone for the first use of a kernel."""
    from pathlib import Path

    from lggseg.losses import CompoundLoss
    from lggseg.models import build_model
    from lggseg.training import train_variant
    from lggseg.training.concurrent import train_variants

    store_dir, n = Path(store.root), runs[0].train.batch_size
    root, width = store_dir.parent, int(store.attributes.shape[1])
    for run in runs:
        setup, size, n_attr = step_setup(run.train, device), run.common.image_size, width if run.model.attributes else 0
        with applied(setup, device):
            model = build_model(run.model, n_attr, size).to(device)
            train_step(model, torch.optim.Adam(model.parameters()), CompoundLoss(run.loss, run.train.epochs).to(device),
                       torch.randn(n, 3, size, size, device=device), torch.ones(n, 1, size, size, device=device),
                       torch.zeros(n, n_attr, device=device) if n_attr else None, 0, setup.bf16)
    alone, together = [], []
    sequential = timed_once(lambda: alone.extend(train_variant(r, store_dir, root / "alone" / r.variant, seed,
                                                               resume=False) for r in runs), device)
    concurrent = timed_once(lambda: together.extend(train_variants(
        runs, store_dir, [root / "together" / r.variant for r in runs], seed, resume=False)), device)
    out: dict[str, Any] = {"sequential_s": r4(sequential), "concurrent_s": r4(concurrent),
                           "ratio_concurrent_over_sequential": r4(concurrent / sequential, 3)}
    if device.type == "cpu":
        out["identical_results"] = all(a["history"] == b["history"] and a["best_epoch"] == b["best_epoch"]
                                       for a, b in zip(alone, together, strict=True))
    return out
