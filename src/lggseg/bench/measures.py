"""The benchmark's measurements: the training step, the loss terms, the data pipeline, the loader-fed loop
(in a child process) and inference. Part of ``lggseg bench`` (see :mod:`lggseg.bench.run`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from lggseg.bench.timing import (
    DATA_RATIO_TARGET,
    FLAT_RATIO_LIMIT,
    BenchConfig,
    BenchParams,
    DeviceProfile,
    _r,
    _stats,
    _timed_once,
    bench_config,
    time_interleaved,
)
from lggseg.config import (
    LossConfig,
    TrainConfig,
)
from lggseg.errors import DataError
from lggseg.runtime import cpu_bf16
from lggseg.training.step import StepSetup, applied, step_setup, train_step

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
    code = "import sys; from lggseg.bench.measures import _child_main; _child_main(sys.argv[1])"
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
    """Slices/s of ``lggseg predict``'s inference function (:func:`lggseg.inference.infer_probabilities`,
    probabilities upsampled to the ``native`` slice size as predict does) without and with TTA."""
    from lggseg.inference import infer_probabilities

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
