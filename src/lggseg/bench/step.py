"""The benchmark's measurements on one fixed batch: the training step under each set-up, the loss
terms (and the outlier term's cost against its window ``j``), and inference.

What the data pipeline feeds and costs is :mod:`lggseg.bench.loader`; part of ``lggseg bench`` (see
:mod:`lggseg.bench.run`).
"""

from __future__ import annotations

import copy
import functools
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from lggseg.bench.timing import (
    FLAT_RATIO_LIMIT,
    BenchParams,
    DeviceProfile,
    _r,
    _stats,
    _timed_once,
    time_interleaved,
)
from lggseg.config import LossConfig, TrainConfig
from lggseg.runtime import cpu_bf16, cpu_channels_last_unsafe
from lggseg.training.step import StepSetup, applied, step_setup, train_step

# --------------------------------------------------------------------------- the training step


def candidate_setups(train: TrainConfig, device: torch.device, bench: BenchParams) -> list[StepSetup]:
    """Baseline, ours and the candidates worth trying on ``device``; duplicates dropped (first name wins)."""
    cuda = device.type == "cuda"
    bf16_ok = bool(torch.cuda.is_bf16_supported()) if cuda else cpu_bf16()["supported"]
    setups = [StepSetup("baseline"), step_setup(train, device)]
    if not bench.candidates:
        return _unique(setups)
    # channels_last crashed libtorch_cpu (issue 21): timed on a CPU only under LGGSEG_CPU_CHANNELS_LAST=unsafe
    cl_ok = cuda or cpu_channels_last_unsafe()
    if cl_ok:
        setups.append(StepSetup("channels_last", channels_last=True, cudnn_benchmark=cuda))
    if bf16_ok:
        setups.append(StepSetup("bf16", bf16=True, cudnn_benchmark=cuda))
    if bf16_ok and cl_ok:
        setups.append(StepSetup("bf16_channels_last", bf16=True, channels_last=True, cudnn_benchmark=cuda))
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
