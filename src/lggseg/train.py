"""Training of one variant (paper section 4.1.3: Adam, lr 1e-3, seed 23; losses of eq. 13).

:func:`train_variant` trains one seed of a :class:`~lggseg.config.RunConfig` into
``models/<variant>/seed_<seed>/`` and keeps the weights of the epoch with the best validation Dice
(thresholded predictions at the model resolution, mean over slices, an empty prediction of an
empty mask counts 1). Every epoch is logged with DVCLive (``seed_<seed>/dvclive``) so that
``dvc plots show`` draws the curves. :func:`train_all_seeds` runs every seed of ``run.seeds``.

One code path serves CPU, one GPU and ``torchrun --nproc_per_node N`` (DistributedDataParallel;
``train.batch_size`` is the global batch, split over the ranks; only rank 0 logs and writes).

Reproducibility and resumption
    The shuffle order (``DistributedSampler``, seeded with ``seed + epoch``) and the augmentation
    (seeded per sample from ``(seed, epoch, row)``, see :mod:`lggseg.dataset`) are functions of
    the epoch alone. After every epoch a checkpoint in ``seed_<seed>/checkpoint/`` holds the
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

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
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

from lggseg.config import RunConfig
from lggseg.dataset import EpochSampler, SliceDataset
from lggseg.errors import DataError
from lggseg.io import atomic_path, write_json

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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``common.device`` (auto | cpu | cuda) -> a torch device; asking for cuda without one is an error."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("common.device is 'cuda' but torch sees no CUDA device")
    return torch.device("cuda", local_rank)


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


def run_fingerprint(run: RunConfig, seed: int, store_fingerprint: Any) -> str:
    """Identity of a training run: what decides the trained weights.

    Labels, table names, the device and the settings that only change speed (workers, threads,
    log interval) are left out, so changing them neither discards a checkpoint nor a result.
    """
    cfg = run.to_dict()
    for key in ("label", "tables", "seeds", "variant"):
        cfg.pop(key, None)
    cfg["common"].pop("device", None)
    for key in ("num_workers", "cpu_threads", "log_every"):
        cfg["train"].pop(key, None)
    blob = json.dumps({"run": cfg, "seed": seed, "data": store_fingerprint}, sort_keys=True)
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


def _slice_dice_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of per-slice Dice of ``logits > 0`` (p > 0.5) vs ``target``; empty/empty = 1."""
    pred = (logits.detach() > 0).flatten(1).float()
    truth = (target > 0.5).flatten(1).float()
    inter = (pred * truth).sum(1)
    denom = pred.sum(1) + truth.sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return dice.sum()


def _build_model(run: RunConfig, n_attributes: int) -> nn.Module:
    from lggseg.models import build_model

    return build_model(run.model, n_attributes, run.common.image_size)


def _make_loader(
    ds: SliceDataset, batch_size: int, sampler: Any, run: RunConfig, info: DistInfo, seed: int, drop_last: bool
) -> tuple[DataLoader, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    workers = run.train.num_workers
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=info.device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        generator=gen,
        drop_last=drop_last,
    )
    return loader, gen


class _Logger:
    """DVCLive on rank 0 (no-op elsewhere); rebuilt from the checkpoint history on resume so the
    curves never hold an epoch twice or miss one, wherever the previous process died."""

    def __init__(self, out_dir: Path, enabled: bool, params: dict[str, Any], history: list[dict[str, float]]) -> None:
        self.live = None
        if not enabled:
            return
        from dvclive import Live

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


def _store_fingerprint(store_dir: Path) -> Any:
    path = store_dir / "store.json"
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- training


def train_variant(run: RunConfig, store_dir: Path, out_dir: Path, seed: int, resume: bool = True) -> dict[str, Any]:
    """Train seed ``seed`` of ``run`` on the store in ``store_dir``; outputs go to ``out_dir``.

    Returns the result dict also written to ``out_dir/result.json``. With ``resume`` a finished run
    is returned as stored and an interrupted one continues from its last epoch checkpoint.
    """
    from lggseg.losses import CompoundLoss
    from lggseg.manifest import load_store
    from lggseg.models import save_model

    store_dir, out_dir = Path(store_dir), Path(out_dir)
    info = init_distributed(run.common.device)
    fingerprint = run_fingerprint(run, seed, _store_fingerprint(store_dir))
    ckpt = Checkpoint(out_dir)
    result_path = out_dir / RESULT_FILE

    if resume and result_path.is_file():
        stored = json.loads(result_path.read_text())
        if stored.get("fingerprint") == fingerprint and (out_dir / "model.safetensors").is_file():
            if info.is_main:
                ckpt.remove()
            _barrier(info)
            return stored
    state = ckpt.load(fingerprint) if resume else None
    _barrier(info)  # every rank has read the checkpoint before rank 0 may replace it
    if info.is_main and state is None:
        ckpt.remove()
        result_path.unlink(missing_ok=True)

    cfg = run.train
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(seed + info.rank)

    store = load_store(store_dir)
    train_idx, val_idx = store.indices("train"), store.indices("val")
    if len(val_idx) == 0:
        raise DataError(f"{store_dir}: the val split is empty; training needs it to pick the best epoch")
    if cfg.batch_size % info.world_size:
        raise DataError(f"train.batch_size {cfg.batch_size} is not divisible by the {info.world_size} processes")
    batch = cfg.batch_size // info.world_size
    if len(train_idx) < cfg.batch_size:
        raise DataError(f"{store_dir}: {len(train_idx)} train slices, fewer than train.batch_size {cfg.batch_size}")
    n_attr = int(store.attributes.shape[1]) if store.attributes.ndim == 2 else 0
    if run.model.attributes and n_attr == 0:
        raise DataError(f"{store_dir}: variant {run.variant} uses attributes but the store has none")
    size = run.common.image_size

    train_ds = SliceDataset(store, train_idx, size, cfg.augment, seed=seed)
    # Each rank validates its own interleaved share of the val slices; sums are all-reduced.
    val_ds = SliceDataset(store, val_idx[info.rank :: info.world_size], size, None)
    sampler = EpochSampler(
        DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed, drop_last=True)
    )
    train_loader, loader_gen = _make_loader(train_ds, batch, sampler, run, info, seed, drop_last=True)
    val_loader, _ = _make_loader(val_ds, batch, None, run, info, seed, drop_last=False)

    torch.manual_seed(seed)  # identical initial weights on every rank
    model = _build_model(run, n_attr)
    memory_format = torch.channels_last if (cuda and cfg.channels_last) else torch.contiguous_format
    model = model.to(info.device, memory_format=memory_format)
    if info.distributed and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = CompoundLoss(run.loss)
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(info.device)

    history: list[dict[str, float]] = []
    start_epoch, best_dice, best_epoch = 0, -1.0, -1
    best_weights: dict[str, torch.Tensor] = {}
    files: dict[str, str | None] = {"state": None, "best": None}
    seconds, images = 0.0, 0
    if state is not None:
        tensors = state["tensors"]
        model.load_state_dict(_strip("model.", tensors))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        best_weights = state["best_tensors"]
        start_epoch, best_dice, best_epoch = state["epoch"], state["best_val_dice"], state["best_epoch"]
        history, files = state["history"], state["files"]
        seconds, images = state["train_seconds"], state["train_images"]
        _set_python_rng_state(state["rng"]["python"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        loader_gen.set_state(tensors["rng.loader"])
        if state["world_size"] == info.world_size:
            torch.set_rng_state(tensors[f"rng.torch_cpu.rank{info.rank}"])
            if cuda and f"rng.torch_cuda.rank{info.rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.torch_cuda.rank{info.rank}"], info.device)
        else:
            log.warning("checkpoint was written by %d processes, now %d: random streams restart", state["world_size"], info.world_size)
            torch.manual_seed(seed + start_epoch * 1000 + info.rank)
        del state

    net: nn.Module = model
    if cfg.compile and cuda:
        net = torch.compile(model)
    train_net: nn.Module = net
    if info.distributed:
        train_net = nn.parallel.DistributedDataParallel(net, device_ids=[info.device.index] if cuda else None)

    use_attr = run.model.attributes
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if (cuda and cfg.amp) else nullcontext()
    )

    def to_device(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = b["image"].to(info.device, non_blocking=True, memory_format=memory_format)
        y = b["mask"].to(info.device, non_blocking=True)
        a = b["attributes"].to(info.device, non_blocking=True) if use_attr else None
        return x, y, a

    live = _Logger(
        out_dir,
        info.is_main,
        {"variant": run.variant, "seed": seed, "encoder": run.model.encoder, "image_size": size, "epochs": cfg.epochs,
         "batch_size": cfg.batch_size, "lr": cfg.lr, "world_size": info.world_size, "device": info.device.type},
        history,
    )
    label = f"{run.variant} seed {seed}"
    epochs_bar = tqdm(range(start_epoch, cfg.epochs), desc=label, unit="epoch", disable=not info.is_main,
                      initial=start_epoch, total=cfg.epochs)
    for epoch in epochs_bar:
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        train_net.train()
        sums = torch.zeros(3, device=info.device)  # loss*n, dice sum, n
        part_sums: dict[str, torch.Tensor] = {}
        steps = len(train_loader)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not info.is_main)
        for step, b in enumerate(bar, 1):
            x, y, a = to_device(b)
            with autocast:
                logits = train_net(x, a)
            total, parts = loss_fn(logits.float(), y, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            n = x.shape[0]
            sums[0] += total.detach() * n
            sums[1] += _slice_dice_sums(logits, y)
            sums[2] += n
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, 0) + torch.as_tensor(v).detach().float() * n
            if step % cfg.log_every == 0 or step == steps:  # the only host syncs of the loop
                bar.set_postfix(loss=f"{(sums[0] / sums[2]).item():.4f}")
        train_time = time.perf_counter() - t0

        val_sums = evaluate_loader(net, val_loader, loss_fn, epoch, to_device, autocast, info)
        totals = _all_sum(info, sums)
        parts_tot = _all_sum(info, torch.stack([part_sums[k] for k in sorted(part_sums)])) if part_sums else None
        train_loss = float(totals[0] / totals[2])
        if not math.isfinite(train_loss):
            raise RuntimeError(f"{label}: the training loss became {train_loss} in epoch {epoch + 1}; try a lower train.lr")
        val_dice = float(val_sums[1] / val_sums[2])
        row = {
            "epoch": epoch + 1,
            "train/loss": train_loss,
            "train/dice": float(totals[1] / totals[2]),
            "val/loss": float(val_sums[0] / val_sums[2]),
            "val/dice": val_dice,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "gamma": run.loss.gamma_at(epoch) if "outlier" in run.loss.terms else 0.0,
        }
        if parts_tot is not None:
            for k, v in zip(sorted(part_sums), parts_tot, strict=True):
                row[f"train/loss_{k}"] = float(v / totals[2])  # unweighted term of eq. 13
        seconds += train_time
        images += int(totals[2])
        history.append(row)
        improved = val_dice > best_dice
        if improved:
            best_dice, best_epoch = val_dice, epoch + 1
            best_weights = _cpu_tensors("", model.state_dict())

        # Collective calls first (every rank), then rank 0 writes.
        rng_tensors = _torch_rng_states(info)
        if info.is_main:
            tensors = {**_cpu_tensors("model.", model.state_dict()), **rng_tensors, "rng.loader": loader_gen.get_state()}
            opt_tensors, opt_meta = _flatten_optimizer(optimizer)
            tensors.update(_cpu_tensors("", opt_tensors))
            record = {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": fingerprint,
                "variant": run.variant,
                "seed": seed,
                "epoch": epoch + 1,
                "world_size": info.world_size,
                "best_val_dice": best_dice,
                "best_epoch": best_epoch,
                "train_seconds": seconds,
                "train_images": images,
                "history": history,
                "optimizer": opt_meta,
                "rng": {"python": _python_rng_state(), "numpy": _numpy_rng_state()},
                "files": files,
            }
            files = ckpt.save(record, tensors, best_weights if improved else None)
            live.log(row)
        _barrier(info)
        epochs_bar.set_postfix(val_dice=f"{val_dice:.4f}", best=f"{best_dice:.4f}")

    result = {
        "variant": run.variant,
        "seed": seed,
        "fingerprint": fingerprint,
        "best_epoch": best_epoch,
        "best_val_dice": best_dice,
        "epochs": cfg.epochs,
        "final": history[-1],
        "train_seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 2) if seconds > 0 else None,
        "seconds_per_epoch": round(seconds / len(history), 3) if history else None,
        "device": info.device.type,
        "world_size": info.world_size,
    }
    if info.is_main:
        model.load_state_dict({k: v.to(info.device) for k, v in best_weights.items()})
        meta = {
            "run_config": run.to_dict(),
            "seed": seed,
            "attribute_names": list(store.attribute_names),
            "n_attributes": n_attr,
            "image_size": size,
            "best_epoch": best_epoch,
            "best_val_dice": best_dice,
            "epochs": cfg.epochs,
            "train_seconds": result["train_seconds"],
            "images_per_second": result["images_per_second"],
            "fingerprint": fingerprint,
        }
        save_model(model.to("cpu"), out_dir, meta)
        write_json(result_path, result)
        ckpt.remove()
        live.end()
    _barrier(info)
    return result


@torch.no_grad()
def evaluate_loader(net, loader, loss_fn, epoch, to_device, autocast, info: DistInfo) -> torch.Tensor:
    """``[loss * n, Dice sum, n]`` over ``loader``, summed over all ranks."""
    net.eval()
    sums = torch.zeros(3, device=info.device)
    for b in loader:
        x, y, a = to_device(b)
        with autocast:
            logits = net(x, a)
        total, _ = loss_fn(logits.float(), y, epoch=epoch)
        n = x.shape[0]
        sums[0] += total.detach() * n
        sums[1] += _slice_dice_sums(logits, y)
        sums[2] += n
    return _all_sum(info, sums)


def train_all_seeds(run: RunConfig, store_dir: Path, models_dir: Path, resume: bool = True) -> dict[str, Any]:
    """Train every seed of ``run.seeds`` into ``models_dir/seed_<s>/``; write ``models_dir/summary.json``."""
    models_dir = Path(models_dir)
    results = {str(s): train_variant(run, store_dir, models_dir / f"seed_{s}", s, resume=resume) for s in run.seeds}
    dices = np.array([r["best_val_dice"] for r in results.values()], dtype=float)
    summary = {
        "variant": run.variant,
        "seeds": list(run.seeds),
        "best_val_dice_mean": float(dices.mean()),
        "best_val_dice_std": float(dices.std(ddof=1)) if len(dices) > 1 else 0.0,
        "per_seed": results,
    }
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(models_dir / "summary.json", summary)
    return summary
