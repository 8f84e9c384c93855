"""Where a run starts and what survives a kill: the run fingerprint, :class:`TrainState` and its checkpoint.

:func:`resume_point` decides where one seed's run starts: a stored ``result.json`` of the same
configuration (:func:`run_fingerprint`) is returned as it is, a checkpoint of it is resumed, anything
else starts afresh (a stale checkpoint or result is removed).

A :class:`Checkpoint` (``seed_<s>/checkpoint/``) saves and restores one :class:`TrainState`: the model,
the Adam state, the best weights so far, the history and the random streams (python, numpy, torch
CPU/CUDA of every rank, DataLoader generator): tensors in safetensors files, everything else in
``state.json``, written last and atomically, naming the tensor files it belongs to. A process killed
at any moment leaves the previous or the new checkpoint; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from lggseg.config import RunConfig
from lggseg.io import atomic_path, write_json
from lggseg.runtime import DistInfo, barrier

log = logging.getLogger(__name__)


CHECKPOINT_DIR = "checkpoint"


RESULT_FILE = "result.json"


STATE_FILE = "state.json"


CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- identity of a run


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
    for key, default in (("fused_adam", False), ("bn_recalibration_slices", 0), ("epoch_slices", None)):
        if cfg["train"].get(key) == default:
            cfg["train"].pop(key, None)
    if cfg["train"]["augment"].get("missing_sequence_p") == 0:
        cfg["train"]["augment"].pop("missing_sequence_p")
    blob = json.dumps({"run": cfg, "seed": seed, "data": store_fingerprint,
                       "device_type": device_type, "bf16": bool(bf16)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def store_fingerprint(store_dir: Path) -> dict[str, str | None]:
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


# --------------------------------------------------------------------------- random streams


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: python/numpy RNGs of a worker follow the torch seed of that worker."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def capture_rng(info: DistInfo, loader_gen: torch.Generator) -> dict[str, Any]:
    """The random streams a run draws from, for :attr:`TrainState.rng` (collective: every rank's torch
    CPU/CUDA state is gathered; python and numpy are this process's, the DataLoader generator the run's)."""
    mine = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(info.device)
    if not info.distributed:
        gathered = [mine]
    else:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, mine)
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": {f"rng.torch_{kind}.rank{r}": t for r, d in enumerate(gathered) for kind, t in d.items()},
        "loader": loader_gen.get_state(),
        "world_size": info.world_size,
    }


def restore_rng(rng: dict[str, Any], info: DistInfo, loader_gen: torch.Generator) -> bool:
    """Put back the streams of :func:`capture_rng`. Returns False when the checkpoint was made by another
    number of processes: then this rank's torch streams are left as they are (the caller reseeds them)."""
    python = rng["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = rng["numpy"]
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), numpy[2], numpy[3], numpy[4]))
    loader_gen.set_state(rng["loader"])
    if rng["world_size"] != info.world_size:
        return False
    torch.set_rng_state(rng["torch"][f"rng.torch_cpu.rank{info.rank}"])
    cuda = f"rng.torch_cuda.rank{info.rank}"
    if info.device.type == "cuda" and cuda in rng["torch"]:
        torch.cuda.set_rng_state(rng["torch"][cuda], info.device)
    return True


def cpu_copy(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``tensors`` (e.g. a state dict), keys prefixed with ``prefix``."""
    # a copy: safetensors refuses tensors that share storage, and the copy must not alias live weights
    return {f"{prefix}{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


# --------------------------------------------------------------------------- the state and its checkpoint


@dataclass
class TrainState:
    """One run at an epoch boundary: what a :class:`Checkpoint` saves and a resumed run continues from.

    The trainer keeps one and updates it after every epoch. ``model`` (a state dict), ``optimizer``
    (``Optimizer.state_dict()``) and ``rng`` (:func:`capture_rng`) are filled only in the copy the
    trainer hands to :meth:`Checkpoint.save` and in the one :meth:`Checkpoint.load` gives back.
    """

    planned_epochs: int  # epochs this run will do: train.epochs, or fewer under train.max_minutes
    epoch: int = 0  # epochs completed
    stop_reason: str = "completed"
    history: list[dict[str, float]] = field(default_factory=list)  # one row of metrics per epoch
    best_val_dice: float = -1.0
    best_epoch: int = 0  # 1-based; 0 while no epoch was selected
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU copies
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)  # wall seconds of each epoch (the budget's estimate)
    train_images: int = 0
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


# TrainState fields kept in state.json (the tensors go to safetensors files)
_RECORD = ("epoch", "planned_epochs", "stop_reason", "history", "best_val_dice", "best_epoch", "train_seconds",
           "wall_seconds", "epoch_seconds", "train_images")


class Checkpoint:
    """The resumable state of one run in ``<out>/checkpoint/``; ``state.json`` is the commit record.

    A checkpoint of another configuration (``fingerprint``) is never loaded.
    """

    def __init__(self, out_dir: Path, fingerprint: str) -> None:
        self.dir = out_dir / CHECKPOINT_DIR
        self.fingerprint = fingerprint

    def load(self) -> TrainState | None:
        """The committed state (with its tensors), or None if absent or of another configuration."""
        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if record.get("format") != CHECKPOINT_FORMAT or record.get("fingerprint") != self.fingerprint:
                log.warning("%s: checkpoint of a different configuration; starting over", self.dir)
                return None
            tensors = load_file(str(self.dir / record["files"]["state"]))
            best = load_file(str(self.dir / record["files"]["best"])) if record["files"]["best"] else {}
            return TrainState(
                **{k: record[k] for k in _RECORD if k in record},  # epoch_seconds: absent before #20
                best_weights=best,
                model=_strip("model.", tensors),
                optimizer=_unflatten_optimizer(tensors, record["optimizer"]),
                rng={**record["rng"], "torch": {k: v for k, v in tensors.items() if k.startswith("rng.torch_")},
                     "loader": tensors["rng.loader"], "world_size": record["world_size"]},
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # The files named by a committed state.json are written before it, so this means
            # outside interference (a deleted or damaged file); training again is the safe answer.
            log.warning("%s: unreadable checkpoint (%s); starting over", self.dir, exc)
            return None

    def save(self, state: TrainState, best_changed: bool) -> None:
        """Write the tensor files under new names, commit ``state.json`` naming them, drop the rest.

        ``best_changed``: the best weights differ from those of the last commit (else their file is kept).
        """
        opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
        tensors = {**cpu_copy(state.model, "model."), **cpu_copy(opt_tensors), **state.rng["torch"],
                   "rng.loader": state.rng["loader"]}
        files = {"state": f"state_e{state.epoch:04d}.safetensors", "best": self._committed_best()}
        _save_tensors(self.dir / files["state"], tensors)
        if best_changed:
            files["best"] = f"best_e{state.epoch:04d}.safetensors"
            _save_tensors(self.dir / files["best"], state.best_weights)
        record = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "world_size": state.rng["world_size"],
            **{k: getattr(state, k) for k in _RECORD},
            "optimizer": opt_meta,
            "rng": {"python": state.rng["python"], "numpy": state.rng["numpy"]},
            "files": files,
        }
        write_json(self.dir / STATE_FILE, record)
        keep = {STATE_FILE, *(f for f in files.values() if f)}
        for path in self.dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _committed_best(self) -> str | None:
        try:
            return json.loads((self.dir / STATE_FILE).read_text())["files"]["best"]
        except (OSError, ValueError, KeyError):
            return None


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adam's state dict -> tensors (safetensors) + JSON-able rest (param groups, which keys are tensors)."""
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


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- where a run starts


def resume_point(run: RunConfig, store_dir: Path, out_dir: Path, seed: int, resume: bool, info: DistInfo,
                 bf16: bool) -> tuple[str, dict[str, Any] | None, TrainState | None]:
    """``(fingerprint, stored result, checkpoint state)`` of one seed's run in ``out_dir``.

    A stored result of the same fingerprint means the run is done (returned as is); otherwise the
    committed checkpoint to continue from, if any, and a stale checkpoint or result is removed.
    ``bf16``: the precision the run uses (:attr:`lggseg.training.step.StepSetup.bf16`), part of its identity.
    """
    fingerprint = run_fingerprint(run, seed, store_fingerprint(store_dir), info.device.type, bf16)
    ckpt = Checkpoint(out_dir, fingerprint)
    result_path = out_dir / RESULT_FILE
    if resume and result_path.is_file() and (out_dir / "model.safetensors").is_file():
        stored = json.loads(result_path.read_text())
        if stored.get("fingerprint") == fingerprint:
            barrier(info)
            if info.is_main:
                ckpt.remove()  # left behind if the previous run died right after result.json
            return fingerprint, stored, None
    state = ckpt.load() if resume else None
    barrier(info)  # every rank has read the checkpoint before rank 0 may delete it
    if info.is_main and state is None:
        ckpt.remove()
        result_path.unlink(missing_ok=True)
    return fingerprint, None, state
