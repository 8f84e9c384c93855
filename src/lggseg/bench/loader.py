"""The benchmark's measurements of the data pipeline: the manifest store it reads, the training
DataLoader's rate against what the step consumes, and the training loop fed by that loader (the
variants that need another OpenMP setting in a child process).

The step on a fixed batch is :mod:`lggseg.bench.step`; part of ``lggseg bench`` (see :mod:`lggseg.bench.run`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from lggseg.bench.step import Batch, _prepare, full_gamma_epoch
from lggseg.bench.timing import (
    DATA_RATIO_TARGET,
    BenchConfig,
    DeviceProfile,
    _r,
    _timed_once,
    bench_config,
)
from lggseg.training.step import StepSetup, applied, train_step

# --------------------------------------------------------------------------- data pipeline


@contextlib.contextmanager
def open_store(cfg: BenchConfig) -> Iterator[tuple[Any, str]]:
    """The manifest store to read (``cfg.data_dir``), or a small synthetic one built in a temp dir."""
    from lggseg.data.manifest import build_manifest
    from lggseg.data.store import load_store

    if cfg.data_dir is not None:
        yield load_store(cfg.data_dir), str(cfg.data_dir)
        return
    from lggseg.data.synthetic import generate_demo

    with tempfile.TemporaryDirectory(prefix="lggseg-bench-") as tmp:
        raw = generate_demo(Path(tmp) / "raw", n_cases=cfg.bench.synthetic_cases, seed=cfg.common.seed)
        build_manifest(raw, Path(tmp) / "manifest", cfg.common, cfg.manifest)
        yield load_store(Path(tmp) / "manifest"), f"synthetic demo store ({cfg.bench.synthetic_cases} cases)"


def _train_rows(store: Any) -> np.ndarray:
    rows = store.indices("train")
    return rows if len(rows) else np.arange(len(store.images), dtype=np.int64)


def make_loader(store: Any, cfg: BenchConfig, batch_size: int, n_batches: int, workers: int,
                device: torch.device) -> DataLoader:
    """The training DataLoader of :mod:`lggseg.training.trainer` (same dataset, augmentation and workers), drawing
    ``n_batches`` random batches of train slices (with replacement, so any store size will do)."""
    from lggseg.data.dataset import EpochSampler, SliceDataset
    from lggseg.training.checkpoint import seed_worker

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
    code = "import sys; from lggseg.bench.loader import _child_main; _child_main(sys.argv[1])"
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
