"""Benchmark parts of issue #11 (part 7): the device-resident data path against the DataLoader path, and
several variants trained at once against one after another. :func:`lggseg.bench.run.run_benchmark` calls
both and stores them in the device's block of ``metrics/bench.json`` (``data_paths``, ``concurrent``).

**Data paths** (:func:`bench_data_paths`): images/s of a whole training step including its data, the
step :mod:`lggseg.training.trainer` runs on this device (:func:`lggseg.training.step.step_setup`), fed once by the
training DataLoader (:func:`lggseg.bench.loader.make_loader`: memmap read, resize, albumentations on
``train.num_workers`` workers, copy to the device) and once by :class:`lggseg.data.resident.ResidentBatches`
(the split on the device, batched and augmented there), at each size of ``bench.path_sizes`` (64 and
256 px). Both start from the same weights with a fresh Adam; each path is timed as the wall time of
``reps`` steps between two synchronisations, after a first step (worker start-up, cuDNN autotuning)
and ``warmup`` more, untimed. The two paths take turns, block by block, over ``bench.path_rounds``
rounds, so a busy neighbour slows both alike; the median block and the ratio resident / loader are
reported, and the one-time cost of making the split resident apart (``resident_load_s``).

**Concurrent variants** (:func:`bench_concurrent`): two variants (the benchmarked model with every
loss term of eq. 13, and with BCE alone: Table 2's first and last rows) trained for
``bench.concurrent_epochs`` on a synthetic store of ``bench.concurrent_cases`` cases on the resident
path: first one after another with :func:`lggseg.training.train_variant`, then at once with
:func:`lggseg.training.concurrent.train_variants`; the wall times (store opening, data loading, training and
validation, everything a call does), their ratio, and on the CPU whether the results agree bit for
bit (they must; on CUDA the runs are not deterministic). Before the timing each model takes one
untimed step, so that neither mode pays for the first use of a kernel (or cuDNN's autotuning) alone.
The image size is ``common.image_size`` on CUDA and ``bench.concurrent_cpu_size`` on the CPU, where a
256 px epoch of a deep encoder would take minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lggseg.training.step import applied, step_setup, train_step


def _r(x: float, nd: int = 4) -> float:
    return float(f"{x:.{nd}g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(batches: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a resident split, epoch after epoch (each epoch its own order and augmentation)."""
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def time_block(next_batch: Callable[[], dict[str, torch.Tensor]], step: Callable[..., Any], device: torch.device,
               warmup: int, reps: int) -> tuple[float, float]:
    """``(first step s, wall s of reps steps)``: one step = the next batch on the device + ``step(x, y, a)``."""
    def one() -> None:
        b = next_batch()
        step(b["image"], b["mask"], b["attributes"])

    _sync(device)
    t0 = time.perf_counter()
    one()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        one()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        one()
    _sync(device)
    return first, time.perf_counter() - t0


def bench_data_paths(cfg: Any, store: Any, device: torch.device, profile: Any, batch_size: int) -> dict[str, Any]:
    """Images/s of the training step fed by each data path at each ``bench.path_sizes`` (see the module doc)."""
    from lggseg.bench.loader import make_loader
    from lggseg.data.resident import ResidentBatches
    from lggseg.losses import CompoundLoss
    from lggseg.models import build_model

    setup = step_setup(cfg.train, device)
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    loss_fn = CompoundLoss(cfg.loss).to(device)
    epoch = cfg.loss.gamma_warmup_epochs + cfg.loss.gamma_ramp_epochs  # the outlier term at full weight
    rows = store.indices("train")
    rows = rows if len(rows) else np.arange(len(store.images), dtype=np.int64)
    n_attr = int(store.attributes.shape[1]) if cfg.model.attributes else 0
    steps = 1 + profile.warmup + profile.reps
    out: dict[str, Any] = {}
    for size in cfg.bench.path_sizes:
        sized = dataclasses.replace(cfg, common=dataclasses.replace(cfg.common, image_size=size))
        torch.manual_seed(cfg.common.seed)
        model = build_model(cfg.model, n_attr, size).to(device, memory_format=fmt)
        init = copy.deepcopy(model.state_dict())
        t0 = time.perf_counter()
        resident = ResidentBatches(store, rows, size, device, batch_size, cfg.train.augment, seed=cfg.common.seed,
                                   shuffle=True, drop_last=True)
        _sync(device)
        load_s = time.perf_counter() - t0
        if len(resident) == 0:
            raise ValueError(f"bench data paths: {len(rows)} train slices make no batch of {batch_size}")
        blocks: dict[str, list[tuple[float, float]]] = {"loader": [], "resident": []}
        with applied(setup, device):
            for _ in range(cfg.bench.path_rounds):
                for path in blocks:
                    model.load_state_dict(init)
                    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)

                    def step(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, optimizer=optimizer, model=model) -> None:
                        x = x.to(device, non_blocking=True, memory_format=fmt)
                        y = y.to(device, non_blocking=True)
                        a = a.to(device, non_blocking=True) if cfg.model.attributes else None
                        train_step(model, optimizer, loss_fn, x, y, a, epoch, setup.bf16)

                    if path == "loader":
                        batches = iter(make_loader(store, sized, batch_size, steps, cfg.train.num_workers, device))
                    else:
                        batches = _cycle(resident)
                    blocks[path].append(time_block(lambda b=batches: next(b), step, device, profile.warmup,
                                                   profile.reps))
                    del batches
        entry: dict[str, Any] = {}
        for path, timed in blocks.items():
            walls = [w for _, w in timed]
            entry[path] = {"images_per_s": _r(profile.reps * batch_size / statistics.median(walls)),
                           "block_s": [_r(w) for w in walls], "first_step_s": [_r(f) for f, _ in timed]}
        entry["loader"]["workers"] = cfg.train.num_workers
        entry["resident"]["resident_load_s"] = _r(load_s)
        entry["ratio_resident_over_loader"] = _r(entry["resident"]["images_per_s"] / entry["loader"]["images_per_s"], 3)
        out[f"{size}px"] = entry
        del model, resident
    return {"setup": setup.describe(), "batch_size": batch_size, "steps_per_block": profile.reps,
            "rounds": cfg.bench.path_rounds, "train_slices": len(rows), "sizes": out}


def concurrent_runs(cfg: Any, device: torch.device, size: int) -> list[Any]:
    """The two benchmarked variants: the model with every loss term, and with BCE alone."""
    from lggseg.config import RunConfig

    train = dataclasses.replace(cfg.train, epochs=cfg.bench.concurrent_epochs, data_path="resident", max_minutes=None,
                                warmup_epochs=0)
    common = dataclasses.replace(cfg.common, image_size=size, device=device.type)
    full = RunConfig("bench_full_loss", common, cfg.model, cfg.loss, train, seeds=(cfg.common.seed,))
    bce = RunConfig("bench_bce", common, cfg.model, dataclasses.replace(cfg.loss, terms=("bce",)), train,
                    seeds=(cfg.common.seed,))
    return [full, bce]


def _warm_up(runs: list[Any], store: Any, device: torch.device, batch_size: int) -> None:
    """One untimed step of each run's model at its size: first-use costs fall on neither timed mode."""
    from lggseg.data.resident import ResidentBatches
    from lggseg.losses import CompoundLoss
    from lggseg.models import build_model

    rows = store.indices("train")
    for run in runs:
        setup = step_setup(run.train, device)
        fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
        b = next(iter(ResidentBatches(store, rows[:batch_size], run.common.image_size, device, batch_size)))
        with applied(setup, device):
            n_attr = int(store.attributes.shape[1]) if run.model.attributes else 0
            model = build_model(run.model, n_attr, run.common.image_size).to(device, memory_format=fmt)
            a = b["attributes"] if run.model.attributes else None
            train_step(model, torch.optim.Adam(model.parameters()), CompoundLoss(run.loss).to(device),
                       b["image"].contiguous(memory_format=fmt), b["mask"], a, 0, setup.bf16)
        _sync(device)


def bench_concurrent(cfg: Any, device: torch.device) -> dict[str, Any]:
    """Wall time of two variants trained one after another and at once (see the module doc)."""
    from lggseg.data.manifest import build_manifest
    from lggseg.data.store import load_store
    from lggseg.data.synthetic import generate_demo
    from lggseg.training import train_variant, train_variants

    size = cfg.common.image_size if device.type == "cuda" else cfg.bench.concurrent_cpu_size
    runs = concurrent_runs(cfg, device, size)
    seed = cfg.common.seed
    with tempfile.TemporaryDirectory(prefix="lggseg-bench-concurrent-") as tmp:
        root = Path(tmp)
        raw = generate_demo(root / "raw", n_cases=cfg.bench.concurrent_cases, seed=seed)
        build_manifest(raw, root / "store", cfg.common, cfg.manifest)
        store = load_store(root / "store")
        _warm_up(runs, store, device, runs[0].train.batch_size)
        t0 = time.perf_counter()
        alone = [train_variant(run, root / "store", root / "alone" / run.variant, seed, resume=False) for run in runs]
        _sync(device)
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = train_variants(runs, root / "store", [root / "together" / r.variant for r in runs], seed,
                                  resume=False)
        _sync(device)
        concurrent = time.perf_counter() - t0
        n_train = len(store.indices("train"))
    per_epoch = (n_train // runs[0].train.batch_size) * runs[0].train.batch_size
    images = per_epoch * cfg.bench.concurrent_epochs * len(runs)
    out: dict[str, Any] = {
        "variants": {r.variant: {"loss_terms": list(r.loss.terms), "encoder": r.model.encoder} for r in runs},
        "image_size": size, "epochs": cfg.bench.concurrent_epochs, "cases": cfg.bench.concurrent_cases,
        "train_slices": n_train, "batch_size": runs[0].train.batch_size, "data_path": "resident",
        "sequential_s": _r(sequential), "concurrent_s": _r(concurrent),
        "ratio_concurrent_over_sequential": _r(concurrent / sequential, 3),
        "train_images_per_s": {"sequential": _r(images / sequential), "concurrent": _r(images / concurrent)},
    }
    if device.type == "cpu":
        out["identical_results"] = all(a["history"] == b["history"] and a["best_epoch"] == b["best_epoch"]
                                       for a, b in zip(alone, together, strict=True))
    return out
