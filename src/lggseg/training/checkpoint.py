"""Resumable training state: the run fingerprint, RNG states and the checkpoint of ``seed_<s>/checkpoint/``.

A checkpoint holds the model, the Adam state, the best weights so far, the history and the RNG states
(python, numpy, torch CPU/CUDA of every rank, DataLoader generator): tensors in safetensors files,
everything else in ``state.json``, written last and atomically, naming the tensor files it belongs to.
A process killed at any moment leaves the previous or the new checkpoint; nothing is ever unpickled.
A checkpoint of a different configuration (:func:`run_fingerprint`) is discarded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from lggseg.config import RunConfig
from lggseg.io import atomic_path, write_json
from lggseg.runtime import DistInfo

log = logging.getLogger(__name__)


CHECKPOINT_DIR = "checkpoint"


RESULT_FILE = "result.json"


STATE_FILE = "state.json"


CHECKPOINT_FORMAT = 1


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
