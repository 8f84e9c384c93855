"""Result snapshots: a committed, self-describing copy of what a run measured (``results/<name>/``).

A workspace (``make demo``, ``make laptop``, a DVC experiment) keeps its metrics in git-ignored
folders; a number quoted in the README must live in a committed file instead. :func:`write_snapshot`
copies from a workspace, for each variant, the metrics JSON, the per-slice and per-patient rows, the
figure predictions (:mod:`lggseg.reporting.figure_predictions`: the model's half of the figure slices,
without the data) and the training record (``result.json``: per-epoch history, epochs done, why training
stopped), plus the workspace's merged ``params.yaml`` and ``dvc.lock``, the ground-truth component table of
its manifest (sizes and boxes, the report's dataset section), the wall time of the run when recorded, the
exact command, the project's git commit and the machine (:func:`lggseg.runtime.machine_record`); a
metrics file that names only its workspace's commit gets the project's (:func:`stamp_project`).
Nothing large is copied: no model weights, no data (no image or mask; ``lggseg report --manifest DIR``
takes them from the user's own copy to draw Figures 7-8). :func:`read_snapshot` reads a snapshot back in
the shape of :func:`lggseg.reporting.folder.read_folder`, so ``lggseg report`` takes snapshots and
``lggseg reproduce`` folders alike (:mod:`lggseg.reporting.merge`). :func:`add_side_files` gives a snapshot
taken before the figure predictions and the component table were kept those two, from the same
workspace, once its rows prove it is the same evaluation.

``python -m lggseg.reporting.snapshot --workspace laptop --variant laptop --dest results/laptop-2026-11-30
--command "make laptop DATA=..."``; ``--add-side-files`` (with ``--workspace`` and ``--dest``) for an
older snapshot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lggseg.config import ConfigError, read_params
from lggseg.errors import DataError, LggsegError
from lggseg.io import write_json, write_text
from lggseg.reporting.figure_predictions import check_same_data, write_figure_predictions

RECORD = "snapshot.json"
"""The snapshot's own record: command, variants, project and workspace commits, machine."""

# Files over this size are refused: a snapshot is for git, not for data or weights.
MAX_FILE_BYTES = 2_000_000

FIGURE_SLICES = "figure_slices.npz"  # the evaluate stage's, in data/eval/<variant>/ (holds data: never copied)
COMPONENTS = "data/manifest/components.csv"  # the manifest stage's ground-truth component table


def _copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise DataError(f"{src}: not found; has the workspace run this variant?")
    if src.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{src}: {src.stat().st_size} bytes is too large for a committed snapshot")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def write_snapshot(workspace: str | Path, variants: Sequence[str], dest: str | Path, command: str,
                   repo: str | Path = ".", note: str = "") -> Path:
    """Copy ``variants``' results from ``workspace`` into ``dest`` (see the module doc); returns ``dest``."""
    # torch comes with runtime; reading a snapshot needs neither
    from lggseg.runtime import git_commit, machine_record

    ws, dest = Path(workspace), Path(dest)
    if not variants:
        raise ConfigError("write_snapshot: name at least one variant")
    for v in variants:
        _copy(ws / "metrics" / f"{v}.json", dest / "metrics" / f"{v}.json")
        for name in ("slices.csv", "patients.csv"):
            _copy(ws / "data" / "eval" / v / name, dest / "rows" / v / name)
        for result in sorted((ws / "models" / v).glob("seed_*/result.json")):
            _copy(result, dest / "training" / v / result.parent.name / "result.json")
    _side_files(ws, variants, dest)
    _copy(ws / "params.yaml", dest / "params.yaml")
    for optional in ("dvc.lock", "metrics/run_time.json", "metrics/demo_time.json", "metrics/fetch.json",
                     "metrics/data.json", "metrics/tables.md"):
        if (ws / optional).is_file():
            _copy(ws / optional, dest / Path(optional).name)
    record: dict[str, Any] = {
        "command": command,
        "variants": list(variants),
        "project_commit": git_commit(Path(repo)),
        "workspace_commit": git_commit(ws),
        "machine": machine_record(),
    }
    write_json(dest / RECORD, record)
    stamp_project(dest)
    if note:
        write_text(dest / "NOTE.md", note if note.endswith("\n") else note + "\n")
    return dest


def _side_files(ws: Path, variants: Sequence[str], dest: Path) -> list[str]:
    """The figure predictions of the variants whose evaluation wrote figure slices, and the component
    table when the workspace has one; returns the snapshot paths written."""
    written = []
    for v in variants:
        if (ws / "data" / "eval" / v / FIGURE_SLICES).is_file():
            paths = write_figure_predictions(ws / "data" / "eval" / v / FIGURE_SLICES, dest / "rows" / v)
            written += [p.relative_to(dest).as_posix() for p in paths]
    if (ws / COMPONENTS).is_file():
        _copy(ws / COMPONENTS, dest / "components.csv")
        written.append("components.csv")
    return written


def add_side_files(workspace: str | Path, dest: str | Path, repo: str | Path = ".") -> list[str]:
    """Add to the snapshot ``dest`` what snapshots taken before this function existed lack: each variant's
    figure predictions and the component table, from ``workspace``, the one the snapshot was taken from.
    Refused (:class:`DataError`) unless every variant's ``slices.csv`` and ``patients.csv`` in the workspace
    are byte for byte those of the snapshot (the same evaluation: otherwise the figures would show another
    model than the numbers) and the workspace's manifest is of the data the metrics name. The snapshot's
    record gains ``side_files`` (what was added, from which commits). Returns the paths written."""
    from lggseg.runtime import git_commit

    ws, dest = Path(workspace), Path(dest)
    record = _read(dest / RECORD, "json") if (dest / RECORD).is_file() else None
    if not isinstance(record, dict) or not record.get("variants"):
        raise DataError(f"{dest / RECORD}: not found or names no variants; is {dest} a snapshot?")
    variants = [str(v) for v in record["variants"]]
    for v in variants:
        for name in ("slices.csv", "patients.csv"):
            mine, theirs = dest / "rows" / v / name, ws / "data" / "eval" / v / name
            if not theirs.is_file() or not mine.is_file() or mine.read_bytes() != theirs.read_bytes():
                raise DataError(f"{theirs}: not the evaluation the snapshot {dest} holds ({mine} differs or is "
                                f"missing); figures from it would not be those of its numbers")
    manifest = ws / "data" / "manifest"
    if (manifest / "store.json").is_file():
        meta = _read(manifest / "store.json", "json")
        for v in variants:
            path = dest / "metrics" / f"{v}.json"
            check_same_data(meta, manifest, _read(path, "json"), path)
    written = _side_files(ws, variants, dest)
    if not written:
        raise DataError(f"{ws}: no figure slices (data/eval/<variant>/{FIGURE_SLICES}) and no {COMPONENTS} to add")
    record["side_files"] = {"files": written, "project_commit": git_commit(Path(repo)),
                            "workspace_commit": git_commit(ws)}
    write_json(dest / RECORD, record)
    return written


def stamp_project(folder: str | Path) -> list[str]:
    """Give each metrics file of the snapshot ``folder`` the project commit of its ``snapshot.json`` as
    ``provenance.project`` when the file has none (results evaluated before workspaces recorded their
    origin name only the workspace's own commit); nothing else in the file changes. Returns the
    variants stamped."""
    folder = Path(folder)
    if not (folder / RECORD).is_file():
        raise DataError(f"{folder / RECORD}: not found; is {folder} a snapshot?")
    record = _read(folder / RECORD, "json")
    commit = record.get("project_commit") if isinstance(record, Mapping) else None
    if not commit:
        raise DataError(f"{folder / RECORD}: no project_commit to stamp")
    stamped = []
    for path in sorted((folder / "metrics").glob("*.json")):
        metrics = _read(path, "json")
        prov = metrics.get("provenance") if isinstance(metrics, Mapping) else None
        if not isinstance(prov, dict) or (prov.get("project") or {}).get("commit"):
            continue
        prov["project"] = {"commit": commit, "uncommitted_changes": None, "workspace": True,
                           "from": f"{RECORD} (the repository the snapshot was taken from)"}
        write_json(path, metrics)
        stamped.append(path.stem)
    return stamped


def is_snapshot(folder: Path) -> bool:
    """Whether ``folder`` has a snapshot's layout (its record, or a ``metrics/`` folder of variant files)."""
    return (folder / RECORD).is_file() or (folder / "metrics").is_dir()


def _read(path: Path, kind: str) -> Any:
    try:
        if kind == "json":
            return json.loads(path.read_text())
        if kind == "yaml":
            return read_params(path)
        return pd.read_csv(path, dtype={"patient_id": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not readable: {' '.join(str(exc).split())}") from None


def _rows(frames: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    if not frames:
        return None
    return pd.concat([f.assign(variant=v)[["variant", *f.columns]] for v, f in frames.items()], ignore_index=True)


def read_snapshot(folder: str | Path) -> dict[str, Any]:
    """A snapshot's content in the shape of :func:`lggseg.reporting.folder.read_folder` (``layout``
    ``snapshot``): metrics ``metrics/<variant>.json``, per-slice and per-patient rows of ``rows/<variant>/``
    and the training histories of ``training/<variant>/seed_<s>/result.json`` gathered into one table
    each with a ``variant`` column; ``snapshot`` is ``snapshot.json`` and ``commit`` its project commit.
    Variants in the order ``snapshot.json`` names them (else by file name)."""
    folder = Path(folder)
    record = _read(folder / RECORD, "json") if (folder / RECORD).is_file() else None
    if record is not None and not isinstance(record, Mapping):
        raise DataError(f"{folder / RECORD}: expected a JSON object")
    names = [str(v) for v in (record or {}).get("variants") or []]
    names += sorted(p.stem for p in (folder / "metrics").glob("*.json") if p.stem not in names)
    metrics = {}
    for v in names:
        path = folder / "metrics" / f"{v}.json"
        if not path.is_file():
            raise DataError(f"{path}: not found, yet {RECORD} lists {v}")
        metrics[v] = _read(path, "json")
    slices, patients, training = {}, {}, []
    for v in names:
        for name, into in (("slices.csv", slices), ("patients.csv", patients)):
            if (path := folder / "rows" / v / name).is_file():
                into[v] = _read(path, "csv")
        for path in sorted((folder / "training" / v).glob("seed_*/result.json")):
            result = _read(path, "json")
            history = result.get("history") if isinstance(result, Mapping) else None
            if not isinstance(history, list):
                raise DataError(f"{path}: no history list (a training result.json)")
            seed = result.get("seed", path.parent.name.removeprefix("seed_"))
            training += [{"variant": v, "seed": int(seed), **row} for row in history]
    # figures: a snapshot keeps figure predictions per variant in rows/<variant>/ instead (figure_predictions)
    side = {"components": folder / "components.csv", "data": folder / "data.json", "fetch": folder / "fetch.json"}
    return {
        "layout": "snapshot",
        "params": _read(folder / "params.yaml", "yaml") if (folder / "params.yaml").is_file() else None,
        "environment": None,
        "snapshot": record,
        "metrics": metrics or None,
        "training": pd.DataFrame(training) if training else None,
        "slices": _rows(slices),
        "patients": _rows(patients),
        "commit": (record or {}).get("project_commit"),
        "files": {"figures": None, **{k: p if p.is_file() else None for k, p in side.items()}},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lggseg.reporting.snapshot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--variant", action="append", help="repeat for several")
    ap.add_argument("--dest", required=True, type=Path, help="results/<name>")
    ap.add_argument("--command", help="the exact command that produced the workspace's results")
    ap.add_argument("--repo", type=Path, default=Path("."))
    ap.add_argument("--add-side-files", action="store_true",
                    help="only add the figure predictions and the component table to the existing snapshot DEST")
    args = ap.parse_args(argv)
    try:
        if args.add_side_files:
            if args.variant or args.command:
                raise ConfigError("--add-side-files takes the variants and command of DEST's snapshot.json: "
                                  "leave out --variant and --command")
            added = add_side_files(args.workspace, args.dest, args.repo)
            print(f"lggseg snapshot: {args.dest}: added {len(added)} file(s)")
            return 0
        if not args.variant or not args.command:
            raise ConfigError("a new snapshot needs --variant (one or more) and --command")
        dest = write_snapshot(args.workspace, args.variant, args.dest, args.command, args.repo)
    except LggsegError as exc:
        print(f"lggseg snapshot: {exc}", file=sys.stderr)
        return 2
    print(f"lggseg snapshot: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
