"""Per-epoch records: DVCLive when installed, else the same files (``dvclive/plots/metrics/*.tsv``,
``metrics.json``, ``params.yaml``) and ``dvclive/metrics.csv`` written by :class:`_FileLog`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from lggseg.io import write_json, write_text, write_yaml

log = logging.getLogger(__name__)


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
