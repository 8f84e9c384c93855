"""The ``lggseg reproduce`` folder format, its one owner: the file names (:data:`FILES`), the writer
(:class:`FolderWriter`, used by :mod:`lggseg.reproduce`) and the readers (:func:`load_folder_figures`,
:func:`build_folder_report`, ``lggseg report DIR``).

The folder holds the seven files of :data:`FILES`, whatever the number of variants, each written
atomically (files shared by several variants gain a ``variant`` column or key):

* ``params.yaml``: the merged parameters, ``variants`` reduced to those asked for;
* ``metrics.json``: ``{variant: metrics}``, each exactly the ``metrics/<variant>.json`` of the
  evaluate stage (with its ``provenance`` block);
* ``slices.csv``: the evaluate stage's per-slice rows of every variant (raw and post-processed);
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

``lggseg report DIR`` (:func:`build_folder_report`) reads the folder back and writes ``tables.md`` and
the figures through :func:`lggseg.reporting.report.write_report`, the function the report stage ends
in. Kept in reporting, below :mod:`lggseg.reproduce`, so reporting never imports the code that trains.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from lggseg.config import ConfigError, read_params, resolve_variant
from lggseg.errors import DataError, LggsegError
from lggseg.io import atomic_path, write_bytes, write_csv, write_json, write_yaml
from lggseg.reporting.results import check_figure_slices

log = logging.getLogger(__name__)

FILES: Final[dict[str, str]] = {
    "params": "params.yaml",
    "metrics": "metrics.json",
    "slices": "slices.csv",
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
                    figures: Mapping[str, np.ndarray], results: Sequence[dict[str, Any]]) -> None:
        """Add a variant's evaluation (``metrics``, per-slice rows, figure arrays) and its seeds'
        ``result.json`` contents (``results``), and rewrite every file."""
        self.metrics[variant] = metrics
        self.slices[variant] = slices.assign(variant=variant)[["variant", *slices.columns]]
        for r in results:  # the stored history is the record (an epoch seen live and replayed after a resume: once)
            self.training[(variant, int(r["seed"]))] = [dict(row) for row in r["history"]]
        for key in SHARED_FIGURE_KEYS:
            self.figures.setdefault(key, np.asarray(figures[key]))
        for key in PER_VARIANT_FIGURE_KEYS:
            self.figures[variant_key(key, variant)] = np.asarray(figures[key])
        done = sorted(self.metrics, key=self._rank)
        write_json(self.out / FILES["metrics"], {v: self.metrics[v] for v in done})
        write_csv(self.out / FILES["slices"], pd.concat([self.slices[v] for v in done], ignore_index=True))
        self._write_training()
        with atomic_path(self.out / FILES["figures"], suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **self.figures)
        self.write_environment()


def read_folder(folder: str | Path) -> dict[str, Any]:
    """What a (possibly unfinished or killed) folder holds: ``params``, ``environment``, ``metrics``
    (``{variant: metrics}``), ``training`` and ``slices`` (DataFrames), each None when not written yet.
    A file that exists but cannot be read is a :class:`~lggseg.errors.DataError`: every write is atomic."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (written by lggseg reproduce)")
    out: dict[str, Any] = {}
    for kind in ("params", "environment", "metrics", "training", "slices"):
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
                out[kind] = pd.read_csv(path)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise DataError(f"{path}: not readable: {' '.join(str(exc).split())}") from None
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


def build_folder_report(folder: str | Path, tables: str | Path | None = None, plots: str | Path | None = None) -> Path:
    """``tables.md`` (default ``folder/tables.md``) and the figures (default ``folder/plots/``) of a
    ``lggseg reproduce`` folder, by :func:`lggseg.reporting.report.write_report`; returns the tables' path."""
    from lggseg.reporting.report import DataSource, ReportSources, figure7_variants, figure8_variants
    from lggseg.reporting.results import Result, check_metrics, load_components

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (written by lggseg reproduce)")
    tables = Path(tables) if tables is not None else folder / "tables.md"
    plots = Path(plots) if plots is not None else folder / "plots"
    params = read_params(folder / FILES["params"])
    metrics_path, env_path = folder / FILES["metrics"], folder / FILES["environment"]
    for path in (metrics_path, env_path):
        if not path.is_file():
            raise DataError(f"{path}: not found (written by lggseg reproduce once a variant has finished)")
    try:
        metrics, env = json.loads(metrics_path.read_text()), json.loads(env_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{metrics_path} or {env_path}: not valid JSON: {exc}") from None
    if not isinstance(metrics, Mapping) or not metrics:
        raise DataError(f"{metrics_path}: holds no variant's metrics")
    results = [Result(v, resolve_variant(params, v), check_metrics(m, f"{metrics_path}[{v}]")) for v, m in metrics.items()]
    data = env.get("data") or {}
    fp = (data.get("fingerprint") or {}).get("sha256")
    source = DataSource(str(data.get("source") or "unknown"),
                        f"`{env_path.as_posix()}`: raw={data.get('raw')}, fingerprint={fp[:12] + '...' if fp else None}")
    components = load_components(folder / FILES["components"])
    slices = load_folder_figures(folder / FILES["figures"], [r.name for r in results])
    missing: dict[str, str] = {}
    figs: dict[str, Any] = {}
    for key, pick in (("figure7", figure7_variants), ("figure8", figure8_variants)):
        try:
            figs[key] = pick(results)
        except ConfigError as exc:
            figs[key], missing[key] = None, str(exc).removeprefix("report: ")
    where = ReportSources(folder / FILES["figures"], folder / FILES["components"], env_path, data.get("summary"),
                          figure9=False)
    from lggseg.reporting.report import write_report

    write_report(params, results, source, components, slices, tables, plots, where=where, fig7=figs["figure7"],
                 fig8=figs["figure8"], missing=missing)
    return tables


def main(argv: list[str] | None = None, prog: str = "lggseg report") -> int:
    """``lggseg report DIR``: tables.md and the figures of a ``lggseg reproduce`` folder
    (:func:`lggseg.reporting.folder.build_folder_report`); the pipeline's report is the ``report`` stage."""
    ap = argparse.ArgumentParser(prog=prog, description="Paper Tables 2-4 and figures from a `lggseg reproduce` folder.")
    ap.add_argument("folder", type=Path, help="the folder lggseg reproduce wrote")
    ap.add_argument("--tables", type=Path, help="markdown to write (default: FOLDER/tables.md)")
    ap.add_argument("--plots", type=Path, help="folder for the figures (default: FOLDER/plots)")
    args = ap.parse_args(argv)
    try:
        path = build_folder_report(args.folder, args.tables, args.plots)
    except LggsegError as exc:
        print(f"report: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0
