"""Several training variants in one process, their steps interleaved (issue #11, part 2).

:func:`train_variants` trains a list of (variant, seed) runs the way :func:`lggseg.training.trainer.train_variant`
trains one, but all at once: one opened manifest store for all of them and, on the device-resident
path (:mod:`lggseg.data.resident`), one copy of each split on the device per image size; each run keeps
its own model, optimiser, loss, checkpoint, log and, on CUDA, its own ``torch.cuda.Stream``. The
runs take turns step by step (round robin over :meth:`lggseg.training.trainer.Trainer.step`), so while the
host launches one run's kernels the GPU can still be busy with the kernels another run queued on its
stream, and no run's host synchronisation waits for another's work. On the CPU the turns buy no
speed (one core set does all the work either way); they exist there so that this scheduling is
tested where runs are deterministic.

Same result as alone
    Every run gets exactly what it gets from ``train_variant``: the same history, best epoch and
    saved weights bit for bit on the CPU (``tests/training/test_concurrent.py``). A step draws on
    process-wide state: Python's ``random``, NumPy's global generator, torch's CPU generator and the
    device's, and the switches of :func:`lggseg.training.step.applied` (threads, deterministic algorithms,
    cuDNN autotuning). Each run owns a copy of the random streams (:class:`RandomState`), swapped
    in before each of its turns and captured after it, and has its own set-up applied around the
    turn; the caller's random streams are put back at the end. Everything else a step uses
    (DataLoader generator, sampler, per-sample augmentation seeds, the resident path's generators)
    is a function of the run's seed and epoch already.

Time budget
    ``train.max_minutes`` keeps its meaning, over a clock that the runs share: a run's epoch time
    is measured from the end of its previous epoch to the end of this one's validation, turns of the
    other runs (their validations, checkpoints, a finished variant's evaluation) included,
    so its estimate of "one more epoch" is what one more round of all running variants costs, and
    each run stops at an epoch boundary before the budget would be overrun. For the same reason
    ``train_seconds`` and ``images_per_second`` in a run's ``result.json`` describe its share of the
    device; the images of all runs over the wall time of the whole call is the device's throughput.

Checkpoints, resumption and outputs are those of ``train_variant`` for each run: a finished run is
returned as stored, an interrupted one continues from its checkpoint, and ``result.json`` plus the
model files are written in each run's folder as soon as that run finishes. One run's failure does
not stop the others.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lggseg.config import ConfigError, RunConfig
from lggseg.runtime import init_distributed
from lggseg.training.checkpoint import resume_point
from lggseg.training.step import StepSetup, applied, step_setup
from lggseg.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class RandomState:
    """The process-wide random streams a training step can draw from."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        # the CUDA generator's state (seed, offset) is held on the host: reading it does not synchronise
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self, device: torch.device) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state(self.torch_cuda, device)


@dataclass
class _Lane:
    """One run in the rotation: its trainer, set-up, stream and random streams."""

    index: int
    label: str
    trainer: Trainer | None
    setup: StepSetup
    stream: Any  # torch.cuda.Stream on CUDA, None on the CPU
    rng: RandomState
    reported: int = 0  # history rows handed to on_epoch


def side_stream(device: torch.device) -> Any:
    """A new ``torch.cuda.Stream`` on a CUDA ``device`` for one run's work; ``None`` on the CPU."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def on_stream(stream: Any) -> contextlib.AbstractContextManager:
    """Work inside is queued on ``stream`` (of :func:`side_stream`); with ``None``, where it would go anyway."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _turn(lane: _Lane, device: torch.device) -> Iterator[None]:
    """``lane``'s random streams, set-up and stream for the work inside; its streams captured after."""
    lane.rng.restore(device)
    try:
        with applied(lane.setup, device), on_stream(lane.stream):
            yield
    finally:
        lane.rng = RandomState.capture(device)


def train_variants(
    runs: Sequence[RunConfig],
    store_dir: str | Path,
    out_dirs: Sequence[str | Path],
    seeds: int | Sequence[int],
    resume: bool = True,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
    on_error: Callable[[int, BaseException], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, Any] | None]:
    """Train ``runs[k]`` with seed ``seeds[k]`` into ``out_dirs[k]``, all on one store, steps interleaved.

    Returns the results in the order of ``runs`` (each also in its ``result.json``; ``None`` for a run
    that failed). ``on_result(k, result)`` is called as soon as run ``k`` has finished (or at once for a
    run already finished earlier), outside every run's turn, so it may evaluate or write files.
    A run that raises is dropped and the others go on; the error goes to ``on_error(k, exc)`` if
    given, else the first one is raised once the others have finished. ``on_epoch(k, row)`` gets each
    history row of run ``k`` as soon as its epoch has ended (a resumed run's earlier rows first), also
    outside every turn. One process only (no torchrun).
    """
    runs, out_dirs = list(runs), [Path(d) for d in out_dirs]
    seeds = [seeds] * len(runs) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not len(runs) == len(out_dirs) == len(seeds):
        raise ValueError(f"train_variants: {len(runs)} runs, {len(out_dirs)} output folders, {len(seeds)} seeds")
    if not runs:
        return []
    if len({d.resolve() for d in out_dirs}) < len(out_dirs):
        raise ConfigError("train_variants: two runs were given the same output folder")
    devices = sorted({r.common.device for r in runs})
    if len(devices) > 1:
        raise ConfigError(f"train_variants: the runs ask for different devices {devices}; common.device must agree")
    info = init_distributed(devices[0])
    if info.distributed:
        raise ConfigError("train_variants runs in one process; under torchrun train one variant per launch")
    from lggseg.data.store import load_store

    store_dir, device = Path(store_dir), info.device
    store = load_store(store_dir)
    shared: dict[tuple, Any] = {}  # one device copy of each split per image size (lggseg.training.batches)
    results: list[dict[str, Any] | None] = [None] * len(runs)
    errors: list[tuple[int, BaseException]] = []

    def failed(k: int, exc: BaseException) -> None:
        log.error("%s seed %d failed: %s", runs[k].variant, seeds[k], exc)
        if on_error is not None:
            on_error(k, exc)
        else:
            errors.append((k, exc))

    def finished(k: int, result: dict[str, Any]) -> None:
        results[k] = result
        if on_result is not None:
            on_result(k, result)

    outer = RandomState.capture(device)
    lanes: list[_Lane] = []
    try:
        for k, (run, out, seed) in enumerate(zip(runs, out_dirs, seeds, strict=True)):
            setup = step_setup(run.train, device)
            fingerprint, stored, state = resume_point(run, store_dir, out, seed, resume, info, setup.bf16)
            if stored is not None:
                finished(k, stored)
                continue
            stream = side_stream(device)
            lane = _Lane(k, f"{run.variant} seed {seed}", None, setup, stream, outer)
            try:
                with _turn(lane, device):  # the Trainer seeds every stream itself, as train_variant's does
                    lane.trainer = Trainer(run, store_dir, out, seed, info, setup, fingerprint, state, store=store,
                                           shared=shared, progress=False)
            except Exception as exc:  # noqa: BLE001 - this run cannot start; the others still can
                failed(k, exc)
                continue
            del state
            lanes.append(lane)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the shared data and every model, made on their streams, are complete
        log.info("training %d run(s) in turns on %s", len(lanes), device)
        t0 = time.perf_counter()
        active = list(lanes)
        while active:
            for lane in list(active):
                result = None
                try:
                    with _turn(lane, device):
                        if lane.trainer.done:
                            result = lane.trainer.finish()
                        else:
                            lane.trainer.step()
                except Exception as exc:  # noqa: BLE001 - one run's failure does not stop the others
                    active.remove(lane)
                    lane.trainer = None
                    failed(lane.index, exc)
                    continue
                if on_epoch is not None and lane.trainer is not None:
                    history = lane.trainer.state.history
                    for row in history[lane.reported:]:
                        on_epoch(lane.index, dict(row))
                    lane.reported = len(history)
                if result is not None:
                    active.remove(lane)
                    lane.trainer = None  # its model and optimiser can go before the next turn
                    finished(lane.index, result)
                    if device.type == "cuda":
                        # the caching allocator reuses a freed block only on the stream it was used on: hand
                        # the finished run's memory (and that of on_result's work) back for the others
                        gc.collect()
                        torch.cuda.empty_cache()
        log.info("%d run(s) trained in %.1f s", len(lanes), time.perf_counter() - t0)
    finally:
        outer.restore(device)
    if errors:
        raise errors[0][1]
    return results
