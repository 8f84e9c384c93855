"""A ``lggseg reproduce`` folder: its files (:data:`FILES`, the one place of that layout) and its report.

:mod:`lggseg.reproduce` writes the folder; ``lggseg report DIR`` (:func:`build_folder_report`) reads it
back and writes ``tables.md`` and the figures through :func:`lggseg.reporting.report.write_report`, the
function the report stage ends in. Kept here, below :mod:`lggseg.reproduce`, so reporting never
imports the code that trains.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lggseg.config import ConfigError, read_params, resolve_variant
from lggseg.errors import DataError, LggsegError
from lggseg.reporting.results import check_figure_slices

FILES = {
    "params": "params.yaml",
    "metrics": "metrics.json",
    "slices": "slices.csv",
    "figures": "figure_slices.npz",
    "training": "training.csv",
    "environment": "environment.json",
    "components": "components.csv",
}
"""What ``lggseg reproduce`` writes into its output folder (kind -> file name)."""


_SHARED_FIGURE_KEYS = ("ids", "rows", "image", "truth", "threshold", "min_area", "selection")


_PER_VARIANT = ("prob", "prob_seed")


_SEP = "__"  # prob__<variant>: variant names are identifiers


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
    return {v: check_figure_slices(arrays["ids"], arrays["image"], arrays["truth"], arrays[f"prob{_SEP}{v}"], path)
            for v in variants if f"prob{_SEP}{v}" in arrays}


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
