"""What a run records: every epoch (:class:`EpochLog`: DVCLive when installed, else the same files,
``dvclive/plots/metrics/*.tsv``, ``metrics.json``, ``params.yaml``, and ``dvclive/metrics.csv`` written by
:class:`_FileLog`), its ``result.json`` (:func:`run_result`) and the training facts in ``model.json``
(:func:`model_meta`), which evaluation copies into the metrics.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from lggseg.config import LossConfig, RunConfig
from lggseg.io import write_json, write_text, write_yaml
from lggseg.losses import full_gamma_epoch
from lggseg.runtime import DistInfo, machine_facts, software_versions
from lggseg.training.checkpoint import TrainState

log = logging.getLogger(__name__)


class EpochLog:
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
    """The part of DVCLive's ``Live`` that :class:`EpochLog` uses, writing DVCLive's own layout
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


def selection_rule(loss: LossConfig, s: TrainState, epochs: int) -> str:
    """How ``s.best_epoch`` was chosen, in words: by validation Dice, among the epochs trained at the full
    outlier weight if the run has the term; the last epoch if none was (``epochs``: ``train.epochs``)."""
    rule = "best val/dice (slice mean at the model's resolution, empty/empty = 1)"
    if "outlier" not in loss.terms:
        return f"{rule} over all epochs (no outlier term)"
    gamma = float(loss.gamma)
    full = [row["epoch"] for row in s.history if row["gamma"] == gamma]
    if s.best_epoch in full:
        return f"{rule} among the epochs at the full outlier weight gamma={gamma:g} (epoch {full[0]} on)"
    first = full_gamma_epoch(loss, s.planned_epochs) + 1
    reached = f"not before epoch {first}" if first <= epochs else "never within train.epochs"
    return (f"last epoch: no trained epoch reached the full outlier weight gamma={gamma:g} ({reached}), "
            f"so the best-validation rule could not apply")


def run_result(run: RunConfig, seed: int, fingerprint: str, s: TrainState, data_path: str, info: DistInfo,
               bf16: bool) -> dict[str, Any]:
    """The content of ``result.json`` of a finished run in state ``s`` (a best epoch selected).

    With the outlier term, ``gamma_max`` is the largest outlier weight any epoch trained with and
    ``gamma_reached_full`` whether that was ``loss.gamma`` (None without the term): a false one means
    the model is not the variant it names, however it scores.
    """
    outlier = "outlier" in run.loss.terms
    return {
        "variant": run.variant, "seed": seed, "fingerprint": fingerprint,
        "best_epoch": s.best_epoch, "best_val_dice": s.best_val_dice,
        "best_epoch_gamma": s.history[s.best_epoch - 1]["gamma"] if s.best_epoch else None,
        "selection_rule": selection_rule(run.loss, s, run.train.epochs),
        "gamma_max": max(row["gamma"] for row in s.history) if outlier else None,
        "gamma_reached_full": any(row["gamma"] == float(run.loss.gamma) for row in s.history) if outlier else None,
        "epochs": run.train.epochs, "epochs_done": s.epoch, "epochs_planned": s.planned_epochs,
        "stop_reason": s.stop_reason, "max_minutes": run.train.max_minutes,
        "final": s.history[-1], "history": s.history,
        "wall_seconds": round(s.wall_seconds, 3),
        "train_seconds": round(s.train_seconds, 3),
        "seconds_per_epoch": round(s.wall_seconds / len(s.history), 3),
        "images_per_second": round(s.train_images / s.train_seconds, 2) if s.train_seconds > 0 else None,
        "device": info.device.type, "data_path": data_path, "world_size": info.world_size,
        "hardware": machine_facts(info.device, bf16), "software": software_versions(),
        "pretrained": run.model.pretrained,
    }


def model_meta(run: RunConfig, seed: int, attribute_names: list[str], n_attributes: int,
               result: dict[str, Any]) -> dict[str, Any]:
    """The training facts stored with the best weights in ``model.json`` (:func:`lggseg.models.save_model`)."""
    return {
        "run_config": run.to_dict(),
        "seed": seed,
        "attribute_names": attribute_names,
        "n_attributes": n_attributes,
        "image_size": run.common.image_size,
        **{k: result[k] for k in ("best_epoch", "best_val_dice", "epochs", "epochs_done", "stop_reason",
                                  "wall_seconds", "train_seconds", "images_per_second", "fingerprint")},
        # provenance that evaluation copies into metrics/<variant>.json
        **{k: result[k] for k in ("best_epoch_gamma", "selection_rule", "gamma_max", "gamma_reached_full", "epochs_planned",
                                  "max_minutes", "device", "world_size", "hardware", "software", "pretrained")},
    }
