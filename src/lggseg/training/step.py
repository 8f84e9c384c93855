"""The one optimisation step and the process-wide switches around it: what training, the benchmark and preflight share.

:func:`step_setup` turns ``train`` params into a :class:`StepSetup` for a device (bf16 autocast,
channels_last, ``torch.compile``, cuDNN autotuning, deterministic algorithms, threads), :func:`applied`
sets those switches for a block, and :func:`train_step` is one forward/backward/Adam step.
:func:`lr_factor` is the learning-rate multiplier before each step; :func:`recalibrate_batchnorm` the
optional precise-BN pass before validation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lggseg.config import TrainConfig
from lggseg.runtime import cpu_bf16, cpu_channels_last_unsafe


@dataclass(frozen=True)
class StepSetup:
    """How the training step runs: everything that changes its speed and nothing else.

    :func:`step_setup` gives the one training uses; the benchmark (:mod:`lggseg.bench.run`) times it
    against a plain float32 baseline and other candidates built from the same fields.
    """

    name: str
    bf16: bool = False  # autocast of the forward pass (the loss is float32 in every case)
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms
    threads: int = 0  # torch.set_num_threads; 0 keeps the default

    def knobs(self) -> tuple:
        return dataclasses.astuple(self)[1:]

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


def step_setup(cfg: TrainConfig, device: torch.device) -> StepSetup:
    """The set-up of the training step on ``device`` under ``cfg``.

    CUDA: bf16 autocast (``train.amp``), channels_last, optional ``torch.compile`` and cuDNN
    autotuning (fixed input size); bitwise repeatability is traded for speed.
    CPU: deterministic algorithms, so that a CPU run, and a resumed one, repeats exactly. bf16
    autocast only on CPUs with native bf16 (AVX512-BF16 or AMX; ``LGGSEG_CPU_BF16`` overrides the probe,
    see :func:`lggseg.runtime.cpu_bf16`): emulated bf16 is slower than float32. No channels_last:
    with bf16 it crashed libtorch_cpu (SIGSEGV in 2 of 2 preflights over all variants at 128 px, and in
    2 of 9 for repvgg_b2 alone, on an AVX512-BF16 EPYC), and in float32 for repvgg_b2 (oneDNN's 1x1
    stride-2 weight gradient over 3 channels in NHWC, uxlfoundation/oneDNN#6035; docs/cpu-bf16.md);
    without it bf16 ran as fast with 0 crashes in 5 (issue 21). ``LGGSEG_CPU_CHANNELS_LAST=unsafe``
    brings it back (with ``train.channels_last`` and native bf16, as before), at that risk.
    """
    if device.type == "cuda":
        return StepSetup("ours", bf16=cfg.amp, channels_last=cfg.channels_last, compile=cfg.compile,
                         cudnn_benchmark=True)
    bf16 = cfg.amp and cpu_bf16()["native"]
    return StepSetup("ours", bf16=bf16, channels_last=cfg.channels_last and bf16 and cpu_channels_last_unsafe(),
                     deterministic=True, threads=cfg.cpu_threads)


@contextmanager
def applied(setup: StepSetup, device: torch.device) -> Iterator[None]:
    """Set the process-wide switches of ``setup``, restored afterwards (tests share a process)."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    try:
        if setup.threads > 0:
            torch.set_num_threads(setup.threads)
        torch.use_deterministic_algorithms(setup.deterministic, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = setup.cudnn_benchmark
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int, planned_epochs: int) -> float:
    """Multiplier of ``train.lr`` before optimisation step ``step`` (0-based, counted over all epochs).

    ``constant``: 1 after the warm-up. ``cosine``: ``0.5 * (1 + cos(pi * p))`` with ``p`` the share of
    the post-warm-up steps done, over ``planned_epochs * steps_per_epoch`` steps in all (so the rate
    reaches ~0 at the last planned step). Warm-up: linear from ``1/w`` to 1 over the first
    ``w = warmup_epochs * steps_per_epoch`` steps.
    """
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    total = max(planned_epochs * steps_per_epoch - warm, 1.0)
    p = min(max((step - warm) / total, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * p))


def adam(params: Any, cfg: TrainConfig) -> torch.optim.Adam:
    """The optimiser of section 4.1.3 (Adam, ``train.lr``, ``train.weight_decay``); fused if ``train.fused_adam``."""
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if cfg.fused_adam else None)


RECALIBRATION_BATCH = 16  # slices per forward pass of recalibrate_batchnorm (any size gives the same averages)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                          bf16: bool = False) -> int:
    """Set every BatchNorm layer's running statistics to the exact average over ``batches`` ("precise BN").

    Each layer's running mean becomes the mean of its per-batch means and its running variance the
    mean of its per-batch (unbiased) variances, with equal weight per batch. The model runs in train
    mode without gradients; its mode, the layers' momenta and the global random streams (dropout,
    drop-path) are restored afterwards.

    Args:
        model: the network, called as ``model(x, a)``.
        batches: yields ``(x, a)``: images ``(B, 3, H, W)`` and attributes ``(B, A)`` or ``None``.
        bf16: run the forward passes under bf16 autocast.

    Returns:
        the number of BatchNorm layers (0: nothing to do, nothing run).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
        model.train()
        for x, a in batches:
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
                model(x, a)
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    return len(layers)


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None,
    epoch: int,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step: forward (bf16 autocast if asked), float32 loss, backward, Adam.

    Args:
        net: the network (possibly compiled or DDP-wrapped).
        optimizer: steps ``net``'s parameters.
        loss_fn: ``loss_fn(logits, y, epoch=) -> (total, parts)``, e.g. :class:`lggseg.losses.CompoundLoss`.
        x: images ``(B, 3, H, W)``.
        y: masks ``(B, 1, H, W)`` in {0, 1} (empty masks are ordinary targets).
        a: attributes ``(B, A)``, or ``None`` for networks without the attribute encoder.
        epoch: passed to ``loss_fn`` (the outlier weight's schedule).
        bf16: autocast the forward pass.

    Returns:
        ``(logits (B, 1, H, W) in the autocast dtype, total loss scalar, {term: detached scalar})``,
        all still on the device (no host sync here).
    """
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x, a)
    total, parts = loss_fn(logits.float(), y, epoch=epoch)  # gamma schedule by epoch
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return logits, total, parts
