"""Training of one variant (paper section 4.1.3: Adam, lr 1e-3, seed 23; losses of eq. 13).

:func:`train_variant` trains one seed of a :class:`~lggseg.config.RunConfig` into
``models/<variant>/seed_<seed>/`` and keeps the weights of the epoch with the best validation Dice
(thresholded predictions at the model resolution, mean over slices, an empty prediction of an
empty mask counts 1). With the outlier term only epochs at its full weight ``loss.gamma`` count (section
3.4: the term is added once training is stable, so an epoch of the warm-up or ramp is not yet the
configured loss); a run that stops before reaching it keeps its last epoch, and ``selection_rule``
in the result says which rule applied. Every epoch is logged with DVCLive (``seed_<seed>/dvclive``) so that
``dvc plots show`` draws the curves; without dvclive installed the same files (``plots/metrics/*.tsv``,
``metrics.json``, ``params.yaml``) and a ``metrics.csv`` are written by :class:`_Logger` itself.
:func:`train_all_seeds` runs every seed of ``run.seeds``.

One code path serves CPU, one GPU and ``torchrun --nproc_per_node N`` (DistributedDataParallel;
``train.batch_size`` is the global batch, split over the ranks; only rank 0 logs and writes).

Reproducibility and resumption
    The shuffle order (``DistributedSampler``, seeded with ``seed + epoch``) and the augmentation
    (seeded per sample from ``(seed, epoch, row)``, see :mod:`lggseg.data.dataset`) are functions of
    the epoch alone; so are the batches of the device-resident path (:mod:`lggseg.data.resident`,
    ``train.data_path``). After every ``train.checkpoint_every`` epochs, and after the last epoch
    of the run, a checkpoint in ``seed_<seed>/checkpoint/`` holds the
    model, the Adam state, the best weights so far, the history and the RNG states (python,
    numpy, torch CPU/CUDA of every rank, DataLoader generator): tensors in safetensors files,
    everything else in ``state.json``, which is written last and atomically and names the tensor
    files it belongs to. A process killed at any moment therefore leaves the previous or the new
    checkpoint, and a restart replays from that epoch boundary; on CPU (deterministic algorithms)
    the final weights and metrics equal those of an uninterrupted run. Nothing is ever unpickled.
    When training ends the best model is written with :func:`lggseg.models.save_model`, then
    ``result.json`` (the completion marker), and the checkpoint is removed; a rerun returns the
    stored result. A checkpoint or result of a different configuration is discarded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from lggseg.config import ConfigError, RunConfig, TrainConfig
from lggseg.data.dataset import EmptySliceSubsampler, EpochSampler, SliceDataset
from lggseg.errors import DataError, TrainingError
from lggseg.io import atomic_path, write_json, write_text, write_yaml
from lggseg.runtime import cpu_bf16, machine_facts, resolve_device, software_versions

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
RESULT_FILE = "result.json"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- devices and ranks


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes (env RANK/WORLD_SIZE/LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Leave the process group joined by :func:`init_distributed` (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _all_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# --------------------------------------------------------------------------- fingerprints and RNG


def run_fingerprint(run: RunConfig, seed: int, store_fingerprint: Any, device_type: str = "cpu",
                    bf16: bool = False) -> str:
    """Identity of a training run: what decides the trained weights.

    Labels, table names and the settings that only change speed (workers, threads, log and
    checkpoint intervals) are left out, so changing them neither discards a checkpoint nor a
    result. The device type
    (``cpu``/``cuda``) and the precision actually used (``bf16``: autocast on, as
    :func:`step_setup` decided) are in: a float32 CPU checkpoint is not continued in bf16 on a
    GPU, nor the reverse, and a result made on one is not taken for the other. ``train.data_path``
    is in: the DataLoader and the device-resident path draw different random streams.
    """
    cfg = run.to_dict()
    for key in ("label", "tables", "seeds", "variant"):
        cfg.pop(key, None)
    cfg["common"].pop("device", None)
    for key in ("num_workers", "cpu_threads", "log_every", "checkpoint_every"):
        cfg["train"].pop(key, None)
    # Settings added later count only when used, so that runs made before them keep their identity.
    for key, default in (("fused_adam", False), ("bn_recalibration_slices", 0)):
        if cfg["train"].get(key) == default:
            cfg["train"].pop(key, None)
    if cfg["train"]["augment"].get("missing_sequence_p") == 0:
        cfg["train"]["augment"].pop("missing_sequence_p")
    blob = json.dumps({"run": cfg, "seed": seed, "data": store_fingerprint,
                       "device_type": device_type, "bf16": bool(bf16)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: python/numpy RNGs of a worker follow the torch seed of that worker."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_python_rng_state(state: list[Any]) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


def _set_numpy_rng_state(state: list[Any]) -> None:
    np.random.set_state((state[0], np.asarray(state[1], dtype=np.uint32), state[2], state[3], state[4]))


def _torch_rng_states(info: DistInfo) -> dict[str, torch.Tensor]:
    """Torch CPU (and CUDA) RNG state of every rank, gathered on rank 0."""
    mine = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(info.device)
    if not info.distributed:
        gathered = [mine]
    else:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, mine)
    return {f"rng.torch_{kind}.rank{r}": t for r, d in enumerate(gathered) for kind, t in d.items()}


# --------------------------------------------------------------------------- checkpoints


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adam state -> tensors (safetensors) + JSON-able rest (param groups, which keys are tensors)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, pstate in sd["state"].items():
        entry: dict[str, Any] = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
                entry[key] = {"tensor": f"optim.{pid}.{key}"}
            else:
                entry[key] = value
        meta["state"][str(pid)] = entry
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def _cpu_tensors(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage, and the copy must not alias live weights
    return {f"{prefix}{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class Checkpoint:
    """The resumable state in ``<out>/checkpoint/``; ``state.json`` is the commit record."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / CHECKPOINT_DIR

    def load(self, fingerprint: str) -> dict[str, Any] | None:
        """The committed state (with its tensors), or None if absent or of another configuration."""
        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
                log.warning("%s: checkpoint of a different configuration; starting over", self.dir)
                return None
            state["tensors"] = load_file(str(self.dir / state["files"]["state"]))
            state["best_tensors"] = load_file(str(self.dir / state["files"]["best"])) if state["files"]["best"] else {}
        except (OSError, ValueError, KeyError) as exc:
            # The files named by a committed state.json are written before it, so this means
            # outside interference (a deleted or damaged file); training again is the safe answer.
            log.warning("%s: unreadable checkpoint (%s); starting over", self.dir, exc)
            return None
        return state

    def save(
        self, record: dict[str, Any], tensors: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None
    ) -> dict[str, str | None]:
        """Write tensor files under new names, commit ``state.json`` naming them, drop the rest.

        Returns the file names now committed (``best`` keeps its older file when ``best`` is None).
        """
        epoch = record["epoch"]
        files = dict(record["files"])
        files["state"] = f"state_e{epoch:04d}.safetensors"
        _save_tensors(self.dir / files["state"], tensors)
        if best is not None:
            files["best"] = f"best_e{epoch:04d}.safetensors"
            _save_tensors(self.dir / files["best"], best)
        write_json(self.dir / STATE_FILE, {**record, "files": files})
        self.prune(files)
        return files

    def prune(self, files: dict[str, str | None]) -> None:
        keep = {STATE_FILE, *(f for f in files.values() if f)}
        for path in self.dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


def drain(gen: Generator[Any, None, Any]) -> Any:
    """Run a generator to its end; returns its return value (the uninterleaved use of a step generator)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _slice_dice_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of per-slice Dice of ``logits > 0`` (p > 0.5) vs ``target``; empty/empty = 1."""
    pred = (logits.detach() > 0).flatten(1).float()
    truth = (target > 0.5).flatten(1).float()
    inter = (pred * truth).sum(1)
    denom = pred.sum(1) + truth.sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return dice.sum()


class _Logger:
    """DVCLive on rank 0 (no-op elsewhere); rebuilt from the checkpoint history on resume so the
    curves never hold an epoch twice or miss one, wherever the previous process died.

    Without dvclive (a lean install, the device-resident path needs none of it) the epochs go to
    :class:`_FileLog` in the same folder, with a warning once.
    """

    def __init__(self, out_dir: Path, enabled: bool, params: dict[str, Any], history: list[dict[str, float]]) -> None:
        self.live: Any = None
        if not enabled:
            return
        try:
            from dvclive import Live
        except ImportError:
            log.warning("dvclive is not installed: epochs are logged to %s (metrics.csv, plots/metrics/*.tsv)",
                        out_dir / "dvclive")
            self.live = _FileLog(out_dir / "dvclive")
        else:
            # dvcyaml=None: the pipeline's dvc.yaml declares the plots; dvclive must not edit it.
            self.live = Live(dir=str(out_dir / "dvclive"), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
        self.live.log_params(params)
        for row in history:
            self.log(row)

    def log(self, row: dict[str, float]) -> None:
        if self.live is None:
            return
        for key, value in row.items():
            if key != "epoch":
                self.live.log_metric(key, value)
        self.live.next_step()

    def end(self) -> None:
        if self.live is not None:
            self.live.end()


class _FileLog:
    """The part of DVCLive's ``Live`` that :class:`_Logger` uses, writing DVCLive's own layout
    (``plots/metrics/<key>.tsv`` with ``step``, ``metrics.json``, ``params.yaml``, so the plots of
    ``dvc.yaml`` still resolve) plus ``metrics.csv``, one row per epoch. Starts afresh like
    ``Live(resume=False)``; every file is rewritten atomically after each epoch."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        shutil.rmtree(folder, ignore_errors=True)
        self.rows: list[dict[str, float]] = []
        self.row: dict[str, float] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        write_yaml(self.dir / "params.yaml", params)

    def log_metric(self, key: str, value: float) -> None:
        self.row[key] = float(value)

    def next_step(self) -> None:
        self.rows.append({"step": len(self.rows), **self.row})
        self.row = {}
        keys = list(dict.fromkeys(k for r in self.rows for k in r if k != "step"))
        lines = [",".join(["step", *keys])]
        lines += [",".join([str(r["step"]), *(repr(r[k]) if k in r else "" for k in keys)]) for r in self.rows]
        write_text(self.dir / "metrics.csv", "\n".join(lines) + "\n")
        last = self.rows[-1]
        for key in keys:
            if key in last:
                points = [f"{r['step']}\t{r[key]!r}" for r in self.rows if key in r]
                write_text(self.dir / "plots" / "metrics" / f"{key}.tsv",
                           "\n".join([f"step\t{key.split('/')[-1]}", *points]) + "\n")
        nested: dict[str, Any] = {}
        for key, value in last.items():
            *parents, leaf = key.split("/")
            node = nested
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        write_json(self.dir / "metrics.json", {**{k: v for k, v in nested.items() if k != "step"}, "step": last["step"]})

    def end(self) -> None:
        pass


def _store_fingerprint(store_dir: Path) -> Any:
    """The raw data's fingerprint plus a hash of ``manifest.csv``.

    The raw fingerprint alone misses what the manifest stage decides from the same images: the
    split (``manifest.split_unit``, seed, fractions) and the attribute vectors. Without the
    manifest's hash a re-split store would "resume" a model trained on the other split.
    """
    try:
        data = json.loads((store_dir / "store.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        data = None
    try:
        manifest = hashlib.sha256((store_dir / "manifest.csv").read_bytes()).hexdigest()
    except OSError:
        manifest = None
    return {"data": data, "manifest_sha256": manifest}


# --------------------------------------------------------------------------- training


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
    autocast and channels_last only on CPUs with native bf16 (AVX512-BF16 or AMX), where together
    they made the 256x256 step of regnetz_040 1.8x faster (metrics/bench.json); emulated bf16 is slower than float32,
    and channels_last alone was slower at 64x64.
    """
    if device.type == "cuda":
        return StepSetup("ours", bf16=cfg.amp, channels_last=cfg.channels_last, compile=cfg.compile,
                         cudnn_benchmark=True)
    native = cpu_bf16()["native"]
    return StepSetup("ours", bf16=cfg.amp and native, channels_last=cfg.channels_last and cfg.amp and native,
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

    ``batches`` yields ``(x, a)``: images ``(B, 3, H, W)`` and attributes ``(B, A)`` or None. Each layer's
    running mean becomes the mean of its per-batch means and its running variance the mean of its
    per-batch (unbiased) variances, with equal weight per batch. The model runs in train mode without
    gradients; its mode, the layers' momenta and the global random streams (dropout, drop-path) are
    restored afterwards. Returns the number of BatchNorm layers (0: nothing to do, nothing run).
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

    ``x`` is ``(B, 3, H, W)``, ``y`` ``(B, 1, H, W)`` in {0, 1}, ``a`` ``(B, A)`` or None. Returns
    the logits, the total loss and its terms, all still on the device (no host sync here).
    """
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x, a)
    total, parts = loss_fn(logits.float(), y, epoch=epoch)  # gamma schedule by epoch
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return logits, total, parts


class _Trainer:
    """The state of one seed's training: data, network, optimizer, best weights, history."""

    def __init__(self, run: RunConfig, store_dir: Path, out_dir: Path, seed: int, info: DistInfo, fingerprint: str,
                 setup: StepSetup, *, store: Any = None, shared: dict[tuple, Any] | None = None,
                 progress: bool = True):
        """``store``: the opened manifest store of ``store_dir`` (opened here when None). ``shared``: a
        cache of device-resident splits that variants trained in one process share (see
        :mod:`lggseg.training.concurrent`). ``progress``: per-step progress bars."""
        from lggseg.data.manifest import load_store
        from lggseg.losses import CompoundLoss

        self.run, self.cfg, self.seed, self.info = run, run.train, seed, info
        self.out_dir, self.fingerprint = out_dir, fingerprint
        self.label = f"{run.variant} seed {seed}"
        self.cuda = info.device.type == "cuda"
        self.progress = progress
        cfg = run.train

        self.store = store = load_store(store_dir) if store is None else store
        train_idx, val_idx = store.indices("train"), store.indices("val")
        if len(val_idx) == 0:
            raise DataError(f"{store_dir}: the val split is empty; training needs it to pick the best epoch")
        if cfg.batch_size % info.world_size:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by the {info.world_size} processes")
        if len(train_idx) < cfg.batch_size:
            raise DataError(f"{store_dir}: {len(train_idx)} train slices, fewer than train.batch_size {cfg.batch_size}")
        self.n_attributes = int(store.attributes.shape[1])
        if run.model.attributes and self.n_attributes == 0:
            raise DataError(f"{store_dir}: variant {run.variant} uses attributes but the store has none")
        size = run.common.image_size
        batch = cfg.batch_size // info.world_size

        # Each rank validates an interleaved share of the val slices; the sums are all-reduced.
        val_share = val_idx[info.rank :: info.world_size]
        cached = shared is not None and ("train", size) in shared
        self.data_path = self._data_path(len(train_idx) + len(val_share), size, cached)
        self.loader_gen = torch.Generator().manual_seed(seed)
        if self.data_path == "resident":
            if cfg.empty_slice_fraction < 1:
                raise ConfigError("train.empty_slice_fraction < 1 needs train.data_path: loader (the resident path "
                                  "draws every slice each epoch)")

            # the same contract as the loaders below: shuffled by (seed, epoch), drop_last, the rank's share
            self.train_loader = self._resident(shared, "train", train_idx, size, batch, augment=cfg.augment,
                                               seed=seed, shuffle=True, drop_last=True, rank=info.rank,
                                               world_size=info.world_size)
            self.sampler = self.train_loader
            self.val_loader = self._resident(shared, "val", val_share, size, batch)
            recal = self._recalibration_indices(train_idx)
            self.recal_loader = self._resident(None, "recal", recal, size, RECALIBRATION_BATCH) if len(recal) else None
        else:
            train_ds = SliceDataset(store, train_idx, size, cfg.augment, seed=seed)
            val_ds = SliceDataset(store, val_share, size, None)
            # One shuffling code path for 1..N processes: seeded with seed + epoch, the same on every rank.
            if cfg.empty_slice_fraction < 1:
                is_tumour = store.table["tumour_pixels"].to_numpy()[train_idx] > 0
                base = EmptySliceSubsampler(is_tumour, cfg.empty_slice_fraction, seed, info.world_size, info.rank)
            else:
                base = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=seed, drop_last=True)
            self.sampler = EpochSampler(base)
            # drop_last: no ragged last batch (BatchNorm on a batch of one fails; compiled graphs stay static)
            self.train_loader = self._loader(train_ds, batch, self.sampler, drop_last=True)
            self.val_loader = self._loader(val_ds, batch, None, drop_last=False)
            recal = self._recalibration_indices(train_idx)
            self.recal_loader = (self._loader(SliceDataset(store, recal, size, None), RECALIBRATION_BATCH, None, drop_last=False)
                                 if len(recal) else None)

        from lggseg.models import build_model

        torch.manual_seed(seed)  # the same initial weights on every rank and in every rerun
        model = build_model(run.model, self.n_attributes, size)
        if info.distributed:
            torch.manual_seed(seed * 1000 + info.rank)  # but independent dropout / drop-path per rank
        self.setup = setup  # the switches train_variant has applied
        self.memory_format = torch.channels_last if self.setup.channels_last else torch.contiguous_format
        model = model.to(info.device, memory_format=self.memory_format)
        if info.distributed and self.cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # per-GPU batches are small
        self.model = model
        self.optimizer = adam(model.parameters(), cfg)
        self.loss_fn = CompoundLoss(run.loss).to(info.device)

        self.net: nn.Module = torch.compile(model) if self.setup.compile else model
        self.train_net: nn.Module = self.net
        if info.distributed:
            self.train_net = nn.parallel.DistributedDataParallel(self.net, device_ids=[info.device.index] if self.cuda else None)
        # Validation runs at the precision of lggseg.predict (bf16 on CUDA, float32 on CPU), so the
        # stored best_val_dice is what inference with the saved weights reproduces.
        self.val_autocast = torch.autocast(device_type=info.device.type, dtype=torch.bfloat16,
                                           enabled=self.setup.bf16 and self.cuda)

        self.epoch = 0  # epochs completed
        # Epochs this run will do: train.epochs, or fewer once a time budget has measured an epoch.
        self.planned_epochs = cfg.epochs
        self.stop_reason = "completed"
        self.steps_per_epoch = len(self.train_loader)
        self.history: list[dict[str, float]] = []
        self.best_dice, self.best_epoch = -1.0, 0
        self.best_weights: dict[str, torch.Tensor] = {}
        self.files: dict[str, str | None] = {"state": None, "best": None}
        self.best_unsaved = False  # best weights newer than the checkpoint's (train.checkpoint_every > 1)
        self.train_seconds, self.wall_seconds, self.images = 0.0, 0.0, 0

    def _recalibration_indices(self, train_idx: np.ndarray) -> np.ndarray:
        """The train slices of ``train.bn_recalibration_slices`` (a fixed seeded draw; this rank's share)."""
        n = min(self.cfg.bn_recalibration_slices, len(train_idx))
        if n == 0:
            return train_idx[:0]
        chosen = np.sort(np.random.default_rng(self.seed).permutation(len(train_idx))[:n])
        return train_idx[chosen][self.info.rank :: self.info.world_size]

    def _data_path(self, n: int, size: int, cached: bool = False) -> str:
        """``train.data_path`` resolved on this device (the same on every rank); logged once.

        ``cached``: another variant of this process already holds the splits on the device at this
        size, so ``auto`` takes the resident path without asking for more memory.
        """
        from lggseg.data.resident import choose_data_path

        if cached and self.cfg.data_path == "auto" and self.info.device.type == "cuda":
            path, why = "resident", "train.data_path: auto, the splits are already on the device (shared)"
        else:
            path, why = choose_data_path(self.cfg.data_path, self.info.device, n, size, self.n_attributes)
        if self.info.distributed and self.cfg.data_path == "auto":
            # resident only if it fits on every rank: all ranks must iterate the same way
            agree = _all_sum(self.info, torch.tensor([float(path == "resident")], device=self.info.device))
            if path == "resident" and int(agree.item()) != self.info.world_size:
                path, why = "loader", f"{why}; another rank lacks the memory"
        if self.info.is_main:
            log.info("%s: data path %s (%s)", self.label, path, why)
        return path

    def _resident(self, shared: dict[tuple, Any] | None, split: str, rows: np.ndarray, size: int, batch: int,
                  **options: Any) -> Any:
        """A :class:`~lggseg.data.resident.ResidentBatches` of ``rows``; with ``shared``, over the one device copy of
        that split at that size that every variant of the process reads (loaded by the first to ask)."""
        from lggseg.data.resident import ResidentBatches

        if shared is None:
            return ResidentBatches(self.store, rows, size, self.info.device, batch, **options)
        key = (split, size)
        if key not in shared:
            shared[key] = ResidentBatches(self.store, rows, size, self.info.device, batch)
        return shared[key].view(batch, **options)

    def _loader(self, ds: SliceDataset, batch: int, sampler: Any, drop_last: bool) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=batch,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.cuda,
            persistent_workers=workers > 0,
            worker_init_fn=seed_worker,
            generator=self.loader_gen,
            drop_last=drop_last,
        )

    # ------------------------------------------------------------------ checkpoint state

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a committed checkpoint (an epoch boundary)."""
        tensors, info = state["tensors"], self.info
        self.model.load_state_dict(_strip("model.", tensors))
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        self.best_weights = state["best_tensors"]
        self.epoch, self.history, self.files = state["epoch"], state["history"], state["files"]
        self.best_dice, self.best_epoch = state["best_val_dice"], state["best_epoch"]
        self.train_seconds, self.images = state["train_seconds"], state["train_images"]
        self.wall_seconds = state.get("wall_seconds", self.train_seconds)
        self.planned_epochs = state.get("planned_epochs", self.cfg.epochs)
        self.stop_reason = state.get("stop_reason", "completed")
        _set_python_rng_state(state["rng"]["python"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        self.loader_gen.set_state(tensors["rng.loader"])
        if state["world_size"] == info.world_size:
            torch.set_rng_state(tensors[f"rng.torch_cpu.rank{info.rank}"])
            if self.cuda and f"rng.torch_cuda.rank{info.rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.torch_cuda.rank{info.rank}"], info.device)
        else:
            log.warning("%s: checkpoint of %d processes resumed by %d; random streams restart",
                        self.label, state["world_size"], info.world_size)
            torch.manual_seed(self.seed * 1000 + self.epoch * 100 + info.rank)

    def checkpoint(self, ckpt: Checkpoint, improved: bool) -> None:
        """Commit the state after ``self.epoch`` (collective; rank 0 writes)."""
        rng = _torch_rng_states(self.info)
        if not self.info.is_main:
            return
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer)
        tensors = {
            **_cpu_tensors("model.", self.model.state_dict()),
            **_cpu_tensors("", opt_tensors),
            **rng,
            "rng.loader": self.loader_gen.get_state(),
        }
        record = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "variant": self.run.variant,
            "seed": self.seed,
            "epoch": self.epoch,
            "world_size": self.info.world_size,
            "best_val_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "planned_epochs": self.planned_epochs,
            "stop_reason": self.stop_reason,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
            "train_images": self.images,
            "history": self.history,
            "optimizer": opt_meta,
            "rng": {"python": _python_rng_state(), "numpy": _numpy_rng_state()},
            "files": self.files,
        }
        self.files = ckpt.save(record, tensors, self.best_weights if improved else None)

    # ------------------------------------------------------------------ one epoch

    def _to_device(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dev = self.info.device
        x = b["image"].to(dev, non_blocking=True, memory_format=self.memory_format)
        y = b["mask"].to(dev, non_blocking=True)
        a = b["attributes"].to(dev, non_blocking=True) if self.run.model.attributes else None
        return x, y, a

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pass over the train split; returns device sums ``[loss*n, Dice, n]`` and per-term loss sums."""
        return drain(self.train_steps(epoch))

    def train_steps(self, epoch: int) -> Generator[None, None, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """:meth:`train_epoch` as a generator that yields after every optimisation step, so that
        :mod:`lggseg.training.concurrent` can interleave the steps of several variants; returns the sums."""
        self.sampler.set_epoch(epoch)
        self.train_net.train()
        sums = torch.zeros(3, device=self.info.device)
        parts_sum: dict[str, torch.Tensor] = {}
        steps = len(self.train_loader)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not (self.info.is_main and self.progress))
        scheduled = self.cfg.lr_schedule != "constant" or self.cfg.warmup_epochs > 0
        for step, b in enumerate(bar, 1):
            x, y, a = self._to_device(b)
            if scheduled:
                lr = self.cfg.lr * lr_factor(self.cfg, epoch * steps + step - 1, steps, self.planned_epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            logits, total, parts = train_step(self.train_net, self.optimizer, self.loss_fn, x, y, a, epoch, self.setup.bf16)
            n = x.shape[0]
            sums[0] += total.detach() * n
            sums[1] += _slice_dice_sums(logits, y)
            sums[2] += n
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float() * n
            if self.progress and (step % self.cfg.log_every == 0 or step == steps):  # the loop's only host syncs
                bar.set_postfix(loss=f"{(sums[0] / sums[2]).item():.4f}")
            yield
        return sums, parts_sum

    @torch.no_grad()
    def validate(self, epoch: int) -> torch.Tensor:
        """``[loss*n, Dice sum, n]`` over the val split, summed over all ranks."""
        self.net.eval()
        sums = torch.zeros(3, device=self.info.device)
        for b in self.val_loader:
            x, y, a = self._to_device(b)
            with self.val_autocast:
                logits = self.net(x, a)
            total, _ = self.loss_fn(logits.float(), y, epoch=epoch)
            sums[0] += total * x.shape[0]
            sums[1] += _slice_dice_sums(logits, y)
            sums[2] += x.shape[0]
        return _all_sum(self.info, sums)

    def run_epoch(self, epoch: int, ckpt: Checkpoint, live: _Logger) -> float:
        """Train and validate epoch ``epoch``, commit the checkpoint; returns the epoch's wall seconds."""
        return drain(self.epoch_steps(epoch, ckpt, live))

    def epoch_steps(self, epoch: int, ckpt: Checkpoint, live: _Logger) -> Generator[None, None, float]:
        """:meth:`run_epoch` as a generator: yields after each training step (validation, the epoch's
        record and the checkpoint follow the last one without a yield). Its wall seconds run from
        the first step to the end, including any other variant's work interleaved with them."""
        t0 = time.perf_counter()
        sums, parts = yield from self.train_steps(epoch)
        t_train = time.perf_counter() - t0
        if self.recal_loader is not None:
            recalibrate_batchnorm(self.model, ((x, a) for x, _, a in map(self._to_device, self.recal_loader)),
                                  self.setup.bf16 and self.cuda)
        val = self.validate(epoch)
        sums = _all_sum(self.info, sums)
        names = sorted(parts)
        part_sums = _all_sum(self.info, torch.stack([parts[k] for k in names])) if names else []
        n = float(sums[2])
        row = {
            "epoch": epoch + 1,
            "train/loss": float(sums[0]) / n,
            "train/dice": float(sums[1]) / n,
            "val/loss": float(val[0] / val[2]),
            "val/dice": float(val[1] / val[2]),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "gamma": self.loss_fn.weights(epoch).get("outlier", 0.0),
        }
        row.update({f"train/loss_{k}": float(v) / n for k, v in zip(names, part_sums, strict=True)})  # unweighted eq. 13 terms
        if not math.isfinite(row["train/loss"]):
            raise TrainingError(f"{self.label}: the training loss became {row['train/loss']} in epoch {epoch + 1}; try a lower train.lr")
        improved = self.selectable(epoch) and row["val/dice"] > self.best_dice
        if improved:
            self.best_dice, self.best_epoch = row["val/dice"], epoch + 1
            self.best_weights = _cpu_tensors("", self.model.state_dict())
        self.epoch = epoch + 1
        self.history.append(row)
        self.train_seconds += t_train
        self.images += int(n)
        seconds = time.perf_counter() - t0
        self.wall_seconds += seconds
        self.plan(seconds)
        self.best_unsaved = self.best_unsaved or improved
        # Not after the run's last epoch: the model and result.json written next are the commit, and the
        # checkpoint would be deleted right after them (for a 1-epoch demo variant of 80M parameters it was
        # 1.3 GB, fsync'd, of nothing). A run that dies in between replays the epochs since the last commit.
        if self.epoch % self.cfg.checkpoint_every == 0 and self.epoch < self.planned_epochs:
            self.checkpoint(ckpt, self.best_unsaved)
            self.best_unsaved = False
        if self.info.is_main:
            # after the commit: a replayed epoch is never logged twice (a resumed run rebuilds the log
            # from the checkpoint's history, so epochs after the last checkpoint are logged anew, once)
            live.log(row)
        _barrier(self.info)
        return seconds

    def selectable(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` may be kept as the best one: its outlier weight is the full ``loss.gamma``.

        During the gamma warm-up and ramp the run is not yet the configured loss; a model picked
        there (often the best early Dice, before the outlier term weighs in) would be reported as
        the outlier variant without having been trained with it. Without the term, any epoch.
        """
        if "outlier" not in self.run.loss.terms:
            return True
        return self.loss_fn.weights(epoch)["outlier"] == float(self.run.loss.gamma)

    def select_last_if_none(self) -> None:
        """No epoch was selectable (training stopped before full gamma): keep the last epoch."""
        if self.best_epoch == 0 and self.history:
            self.best_dice, self.best_epoch = self.history[-1]["val/dice"], self.epoch
            self.best_weights = _cpu_tensors("", self.model.state_dict())

    def selection_rule(self) -> str:
        """How ``best_epoch`` was chosen, in words (recorded in the result)."""
        rule = "best val/dice (slice mean at the model's resolution, empty/empty = 1)"
        if "outlier" not in self.run.loss.terms:
            return f"{rule} over all epochs (no outlier term)"
        gamma = float(self.run.loss.gamma)
        first = next((e + 1 for e in range(self.cfg.epochs) if self.selectable(e)), None)
        if self.best_epoch and self.selectable(self.best_epoch - 1):
            return f"{rule} among the epochs at the full outlier weight gamma={gamma:g} (epoch {first} on)"
        reached = f"not before epoch {first}" if first else "never within train.epochs"
        return (f"last epoch: no trained epoch reached the full outlier weight gamma={gamma:g} ({reached}), "
                f"so the best-validation rule could not apply")

    def plan(self, epoch_seconds: float) -> None:
        """Under ``train.max_minutes``: fix the number of epochs after the first and stop before an
        epoch that would overrun the budget (judged by the last epoch's time).

        Every rank gets the same decision (rank 0's clock), so DDP processes stop together.
        """
        budget = self.cfg.max_minutes
        if budget is None or self.epoch >= self.planned_epochs:
            return
        seconds = torch.tensor([self.wall_seconds, epoch_seconds], dtype=torch.float64)
        if self.info.distributed:
            dist.broadcast(seconds, src=0)
        spent, last = (float(v) for v in seconds)
        budget_s = budget * 60.0
        if self.epoch == 1:
            fits = max(1, int(budget_s // max(last, 1e-9)))
            if fits < self.planned_epochs:
                self.planned_epochs = fits
                self.stop_reason = (f"time budget: train.max_minutes={budget:g} fits {fits} of "
                                    f"{self.cfg.epochs} epochs at {last:.0f} s for the first")
        if self.epoch < self.planned_epochs and spent + last > budget_s:
            self.planned_epochs = self.epoch
            self.stop_reason = (f"time budget: train.max_minutes={budget:g} reached after {self.epoch} of "
                                f"{self.cfg.epochs} epochs ({spent:.0f} s spent, last epoch {last:.0f} s)")

    # ------------------------------------------------------------------ the end

    def result(self) -> dict[str, Any]:
        return {
            "variant": self.run.variant,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "best_epoch": self.best_epoch,
            "best_val_dice": self.best_dice,
            "best_epoch_gamma": self.history[self.best_epoch - 1]["gamma"] if self.best_epoch else None,
            "selection_rule": self.selection_rule(),
            "epochs": self.cfg.epochs,
            "epochs_done": self.epoch,
            "epochs_planned": self.planned_epochs,
            "stop_reason": self.stop_reason,
            "max_minutes": self.cfg.max_minutes,
            "final": self.history[-1],
            "history": self.history,
            "wall_seconds": round(self.wall_seconds, 3),
            "train_seconds": round(self.train_seconds, 3),
            "seconds_per_epoch": round(self.wall_seconds / len(self.history), 3),
            "images_per_second": round(self.images / self.train_seconds, 2) if self.train_seconds > 0 else None,
            "device": self.info.device.type,
            "data_path": self.data_path,
            "world_size": self.info.world_size,
            "hardware": machine_facts(self.info.device, self.setup.bf16),
            "software": software_versions(),
            "pretrained": self.run.model.pretrained,
        }

    def save_best(self, result: dict[str, Any]) -> None:
        from lggseg.models import save_model

        self.model.load_state_dict(self.best_weights)
        meta = {
            "run_config": self.run.to_dict(),
            "seed": self.seed,
            "attribute_names": list(self.store.attribute_names),
            "n_attributes": self.n_attributes,
            "image_size": self.run.common.image_size,
            **{k: result[k] for k in ("best_epoch", "best_val_dice", "epochs", "epochs_done", "stop_reason",
                                      "wall_seconds", "train_seconds",
                                      "images_per_second", "fingerprint")},
            # provenance that evaluation copies into metrics/<variant>.json
            **{k: result[k] for k in ("best_epoch_gamma", "selection_rule", "epochs_planned", "max_minutes", "device",
                                      "world_size", "hardware", "software", "pretrained")},
        }
        save_model(self.model, self.out_dir, meta)


def resume_point(run: RunConfig, store_dir: Path, out_dir: Path, seed: int, resume: bool, info: DistInfo,
                 setup: StepSetup) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """``(fingerprint, stored result, checkpoint state)`` of one seed's run in ``out_dir``.

    A stored result of the same fingerprint means the run is done (returned as is); otherwise the
    committed checkpoint to continue from, if any, and a stale checkpoint or result is removed.
    """
    fingerprint = run_fingerprint(run, seed, _store_fingerprint(store_dir), info.device.type, setup.bf16)
    ckpt = Checkpoint(out_dir)
    result_path = out_dir / RESULT_FILE
    if resume and result_path.is_file() and (out_dir / "model.safetensors").is_file():
        stored = json.loads(result_path.read_text())
        if stored.get("fingerprint") == fingerprint:
            _barrier(info)
            if info.is_main:
                ckpt.remove()  # left behind if the previous run died right after result.json
            return fingerprint, stored, None
    state = ckpt.load(fingerprint) if resume else None
    _barrier(info)  # every rank has read the checkpoint before rank 0 may delete it
    if info.is_main and state is None:
        ckpt.remove()
        result_path.unlink(missing_ok=True)
    return fingerprint, None, state


class Session:
    """One seed's training from its first epoch (or checkpoint) to ``result.json``, in the pieces that
    :func:`train_variant` runs one after another and :func:`lggseg.training.concurrent.train_variants` interleaves.

    Create it under :func:`applied` of its ``setup``; it seeds every random stream itself.
    ``progress=False`` replaces the progress bars by one log line per epoch (several sessions at once).
    """

    def __init__(self, run: RunConfig, store_dir: Path, out_dir: Path, seed: int, info: DistInfo, setup: StepSetup,
                 fingerprint: str, state: dict[str, Any] | None, *, store: Any = None,
                 shared: dict[tuple, Any] | None = None, progress: bool = True) -> None:
        self.info, self.out_dir, self.progress = info, out_dir, progress
        seed_everything(seed + info.rank)
        self.trainer = trainer = _Trainer(run, store_dir, out_dir, seed, info, fingerprint, setup, store=store,
                                          shared=shared, progress=progress)
        if state is not None:
            trainer.restore(state)
        params = {"variant": run.variant, "seed": seed, "encoder": run.model.encoder, "image_size": run.common.image_size,
                  "epochs": run.train.epochs, "batch_size": run.train.batch_size, "lr": run.train.lr,
                  "world_size": info.world_size, "device": info.device.type}
        self.ckpt = Checkpoint(out_dir)
        self.live = _Logger(out_dir, info.is_main, params, trainer.history)
        self.bar = tqdm(desc=trainer.label, unit="epoch", initial=trainer.epoch, total=trainer.planned_epochs,
                        disable=not (info.is_main and progress))

    @property
    def done(self) -> bool:
        return self.trainer.epoch >= self.trainer.planned_epochs

    def run_epoch(self) -> None:
        """The next epoch, uninterrupted."""
        self.trainer.run_epoch(self.trainer.epoch, self.ckpt, self.live)
        self._epoch_done()

    def steps(self) -> Iterator[None]:
        """Every remaining epoch as a generator that yields after each training step."""
        while not self.done:
            yield from self.trainer.epoch_steps(self.trainer.epoch, self.ckpt, self.live)
            self._epoch_done()

    def _epoch_done(self) -> None:
        t = self.trainer
        self.bar.total = t.planned_epochs
        self.bar.update(1)
        self.bar.set_postfix(val_dice=f"{t.history[-1]['val/dice']:.4f}", best=f"{t.best_dice:.4f}")
        if not self.progress and self.info.is_main:
            log.info("%s: epoch %d/%d val/dice %.4f (best %.4f)", t.label, t.epoch, t.planned_epochs,
                     t.history[-1]["val/dice"], t.best_dice)

    def finish(self) -> dict[str, Any]:
        """Keep the best weights, write the model and ``result.json``, drop the checkpoint; the result."""
        trainer, info = self.trainer, self.info
        self.bar.close()
        if trainer.stop_reason != "completed" and info.is_main:
            log.warning("%s: %s", trainer.label, trainer.stop_reason)
        trainer.select_last_if_none()
        result = trainer.result()
        if info.is_main:
            trainer.save_best(result)
            write_json(self.out_dir / RESULT_FILE, result)  # the completion marker, after the model
            self.ckpt.remove()
            self.live.end()
        _barrier(info)
        return result


def train_variant(run: RunConfig, store_dir: Path, out_dir: Path, seed: int, resume: bool = True) -> dict[str, Any]:
    """Train seed ``seed`` of ``run`` on the manifest store ``store_dir`` into ``out_dir``.

    Returns the result also written to ``out_dir/result.json`` (best epoch and val Dice, the
    per-epoch history, timings). With ``resume`` a finished run is returned as stored and an
    interrupted one continues from its last checkpoint; without, training starts over.
    """
    store_dir, out_dir = Path(store_dir), Path(out_dir)
    info = init_distributed(run.common.device)
    setup = step_setup(run.train, info.device)
    fingerprint, stored, state = resume_point(run, store_dir, out_dir, seed, resume, info, setup)
    if stored is not None:
        return stored
    with applied(setup, info.device):
        session = Session(run, store_dir, out_dir, seed, info, setup, fingerprint, state)
        del state
        while not session.done:
            session.run_epoch()
        return session.finish()


def train_all_seeds(run: RunConfig, store_dir: Path, models_dir: Path, resume: bool = True) -> dict[str, Any]:
    """Train every seed of ``run.seeds`` into ``models_dir/seed_<s>/``; write ``models_dir/summary.json``.

    ``seed_<s>/`` folders of seeds no longer in ``run.seeds`` are removed first, so that a kept
    output folder (DVC ``persist: true``, needed to resume inside ``dvc repro``) holds exactly the
    models that evaluation should read.
    """
    models_dir = Path(models_dir)
    if int(os.environ.get("RANK", "0")) == 0 and models_dir.is_dir():
        wanted = {f"seed_{s}" for s in run.seeds}
        for stale in models_dir.glob("seed_*"):
            if stale.is_dir() and stale.name not in wanted:
                shutil.rmtree(stale)
    results = {str(s): train_variant(run, store_dir, models_dir / f"seed_{s}", s, resume=resume) for s in run.seeds}
    dices = np.array([r["best_val_dice"] for r in results.values()], dtype=float)
    summary = {
        "variant": run.variant,
        "seeds": list(run.seeds),
        "best_val_dice_mean": float(dices.mean()),
        "best_val_dice_std": float(dices.std(ddof=1)) if len(dices) > 1 else 0.0,
        "per_seed": {s: {k: v for k, v in r.items() if k != "history"} for s, r in results.items()},
    }
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(models_dir / "summary.json", summary)
    return summary
