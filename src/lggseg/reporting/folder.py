"""The ``lggseg reproduce`` folder format, its one owner: the file names (:data:`FILES`), the writer
(:class:`FolderWriter`, used by :mod:`lggseg.reproduce`) and the readers (:func:`read_folder`, which
also reads the snapshots of :mod:`lggseg.reporting.snapshot`, and :func:`load_folder_figures`);
``lggseg report DIR [DIR ...]`` (:mod:`lggseg.reporting.merge`) makes the tables of one or several.

The folder holds the eight files of :data:`FILES`, whatever the number of variants, each written
atomically (files shared by several variants gain a ``variant`` column or key):

* ``params.yaml``: the merged parameters, ``variants`` reduced to those asked for;
* ``metrics.json``: ``{variant: metrics}``, each exactly the ``metrics/<variant>.json`` of the
  evaluate stage (with its ``provenance`` block);
* ``slices.csv``: the evaluate stage's per-slice rows of every variant (raw and post-processed);
* ``patients.csv``: the evaluate stage's per-patient rows of every variant (``variant`` column first), which
  :func:`lggseg.reporting.paired.load_patients` reads for the paired comparisons of ``tables.md``;
* ``figure_slices.npz``: the inputs of Figures 7-8: the evaluate stage's :data:`SHARED_FIGURE_KEYS`
  (the same for every variant: the same store and evaluation settings) and, per variant, each of
  :data:`PER_VARIANT_FIGURE_KEYS` under :func:`variant_key` (``prob__<variant>``; compressed);
* ``training.csv``: one row per variant, seed and epoch: the training history of ``result.json``,
  rewritten after every epoch of every run while training goes on (:meth:`FolderWriter.add_epoch`);
* ``environment.json``: what :mod:`lggseg.reproduce` records of the run (device, versions, data,
  wall times, per variant and seed the epochs done and why training stopped);
* ``components.csv``: the store's ground-truth components (the report's dataset section).

Every file is written as soon as its content exists (``training.csv`` after each epoch, a variant's
metrics, rows and figure arrays as its evaluation ends, ``environment.json`` at every phase), each
atomically, so a process killed at any moment leaves every finished piece readable
(:func:`read_folder`), only the unfinished ones missing.

``lggseg report DIR`` (:mod:`lggseg.reporting.merge`) reads the folder back and writes ``tables.md``
(with the paired per-patient comparisons of ``patients.csv``) and the figures through
:func:`lggseg.reporting.report.write_report`, the function the report stage ends in. Kept in
reporting, below :mod:`lggseg.reproduce`, so reporting never imports the code that trains.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from lggseg.config import read_params
from lggseg.errors import DataError
from lggseg.io import atomic_path, write_bytes, write_csv, write_json, write_yaml
from lggseg.reporting.results import check_figure_slices
from lggseg.reporting.snapshot import is_snapshot, read_snapshot

log = logging.getLogger(__name__)

FILES: Final[dict[str, str]] = {
    "params": "params.yaml",
    "metrics": "metrics.json",
    "slices": "slices.csv",
    "patients": "patients.csv",
    "figures": "figure_slices.npz",
    "training": "training.csv",
    "environment": "environment.json",
    "components": "components.csv",
}
"""The files of the folder (kind -> file name)."""

SHARED_FIGURE_KEYS: Final[tuple[str, ...]] = ("ids", "rows", "image", "truth", "threshold", "min_area", "selection")
"""Arrays of ``figure_slices.npz`` stored once for all variants."""

PER_VARIANT_FIGURE_KEYS: Final[tuple[str, ...]] = ("prob", "prob_seed")
"""Arrays of ``figure_slices.npz`` stored per variant, as :func:`variant_key` names them."""


def variant_key(key: str, variant: str) -> str:
    """The name of array ``key`` of ``variant`` in ``figure_slices.npz``, e.g. ``prob__regnet_bce``."""
    return f"{key}__{variant}"


class FolderWriter:
    """Writes the folder, rewriting it (file by file, atomically) each time a variant is added."""

    def __init__(self, out: Path, params: Mapping[str, Any], environment: dict[str, Any]) -> None:
        self.out = out
        self.environment = environment
        self.metrics: dict[str, Any] = {}
        self.slices: dict[str, pd.DataFrame] = {}
        self.patients: dict[str, pd.DataFrame] = {}
        self.variants = list(params.get("variants") or {})
        self.training: dict[tuple[str, int], list[dict[str, Any]]] = {}  # (variant, seed) -> history rows
        self.figures: dict[str, np.ndarray] = {}
        out.mkdir(parents=True, exist_ok=True)
        stray = sorted(p.name for p in out.iterdir() if p.name not in FILES.values())
        if stray:
            log.warning("%s already holds %s; they are left as they are", out, ", ".join(stray[:5]))
        write_yaml(out / FILES["params"], dict(params))
        self.write_environment()

    def write_environment(self) -> None:
        """(Re)write ``environment.json`` from :attr:`environment`, which the caller keeps updating."""
        write_json(self.out / FILES["environment"], self.environment)

    def add_components(self, store_dir: Path) -> None:
        """Copy the store's ``components.csv``."""
        write_bytes(self.out / FILES["components"], (store_dir / "components.csv").read_bytes())

    def add_epoch(self, variant: str, seed: int, row: Mapping[str, Any]) -> None:
        """Add one finished epoch's history ``row`` of ``variant``, seed ``seed``; rewrite ``training.csv``."""
        self.training.setdefault((variant, int(seed)), []).append(dict(row))
        self._write_training()

    def _rank(self, variant: str) -> tuple[int, str]:
        # params order, whatever order the variants finish in, so that a rerun writes the same files
        return (self.variants.index(variant) if variant in self.variants else len(self.variants), variant)

    def _write_training(self) -> None:
        keys = sorted(self.training, key=lambda k: (*self._rank(k[0]), k[1]))
        rows = [{"variant": v, "seed": s, **row} for v, s in keys for row in self.training[(v, s)]]
        write_csv(self.out / FILES["training"], pd.DataFrame(rows))

    def add_variant(self, variant: str, metrics: dict[str, Any], slices: pd.DataFrame,
                    figures: Mapping[str, np.ndarray], results: Sequence[dict[str, Any]],
                    patients: pd.DataFrame | None = None) -> None:
        """Add a variant's evaluation (``metrics``, per-slice rows, figure arrays, per-patient rows) and its
        seeds' ``result.json`` contents (``results``), and rewrite every file."""
        self.metrics[variant] = metrics
        self.slices[variant] = slices.assign(variant=variant)[["variant", *slices.columns]]
        if patients is not None:
            self.patients[variant] = patients.assign(variant=variant)[["variant", *patients.columns]]
        for r in results:  # the stored history is the record (an epoch seen live and replayed after a resume: once)
            self.training[(variant, int(r["seed"]))] = [dict(row) for row in r["history"]]
        for key in SHARED_FIGURE_KEYS:
            self.figures.setdefault(key, np.asarray(figures[key]))
        for key in PER_VARIANT_FIGURE_KEYS:
            self.figures[variant_key(key, variant)] = np.asarray(figures[key])
        done = sorted(self.metrics, key=self._rank)
        write_json(self.out / FILES["metrics"], {v: self.metrics[v] for v in done})
        write_csv(self.out / FILES["slices"], pd.concat([self.slices[v] for v in done], ignore_index=True))
        if self.patients:
            write_csv(self.out / FILES["patients"],
                      pd.concat([self.patients[v] for v in done if v in self.patients], ignore_index=True))
        self._write_training()
        with atomic_path(self.out / FILES["figures"], suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **self.figures)
        self.write_environment()


def read_folder(folder: str | Path) -> dict[str, Any]:
    """What a results folder holds, whichever wrote it: a (possibly unfinished or killed) ``lggseg reproduce``
    folder (this module's format) or a snapshot (:func:`lggseg.reporting.snapshot.read_snapshot`).

    Keys: ``layout`` (``reproduce`` | ``snapshot``), ``params``, ``metrics`` (``{variant: metrics}``),
    ``training``, ``slices`` and ``patients`` (DataFrames with a ``variant`` column), ``environment``
    (``environment.json``) or ``snapshot`` (``snapshot.json``), ``commit`` (the project's), ``files``
    (``{kind: path}`` of the side files there: ``components``, ``figures``, ``data``, ``fetch``); each None
    when not written (yet). A file that exists but cannot be read is a
    :class:`~lggseg.errors.DataError`: every write is atomic."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (written by lggseg reproduce or by the snapshot tool)")
    if is_snapshot(folder):
        return read_snapshot(folder)
    out: dict[str, Any] = {"layout": "reproduce", "snapshot": None}
    for kind in ("params", "environment", "metrics", "training", "slices", "patients"):
        path = folder / FILES[kind]
        if not path.is_file():
            out[kind] = None
            continue
        try:
            if kind == "params":
                out[kind] = read_params(path)
            elif path.suffix == ".json":
                out[kind] = json.loads(path.read_text())
            else:
                out[kind] = pd.read_csv(path, dtype={"patient_id": str} if kind == "patients" else None)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise DataError(f"{path}: not readable: {' '.join(str(exc).split())}") from None
    for kind in ("environment", "metrics"):
        if out[kind] is not None and not isinstance(out[kind], Mapping):
            raise DataError(f"{folder / FILES[kind]}: expected a JSON object")
    out["commit"] = (out["environment"] or {}).get("git_commit")
    out["files"] = {"components": folder / FILES["components"], "figures": folder / FILES["figures"],
                    "data": None, "fetch": None}
    out["files"] = {k: p if p is not None and p.is_file() else None for k, p in out["files"].items()}
    return out


def load_folder_figures(path: Path, variants: Sequence[str]) -> dict[str, Any]:
    """``{variant: FigureSlices}`` of the variants in ``figure_slices.npz`` among ``variants``."""
    if not path.is_file():
        raise DataError(f"{path}: figure slices not found (written by lggseg reproduce)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file: {exc}") from None
    missing = [k for k in ("ids", "image", "truth") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; has {sorted(arrays)}")
    return {v: check_figure_slices(arrays["ids"], arrays["image"], arrays["truth"], arrays[variant_key("prob", v)], path)
            for v in variants if variant_key("prob", v) in arrays}
