"""Result snapshots: a committed, self-describing copy of what a run measured (``results/<name>/``).

A workspace (``make demo``, ``make laptop``, a DVC experiment) keeps its metrics in git-ignored
folders; a number quoted in the README must live in a committed file instead. :func:`write_snapshot`
copies from a workspace, for each variant, the metrics JSON, the per-slice and per-patient rows and
the training record (``result.json``: per-epoch history, epochs done, why training stopped), plus the
workspace's merged ``params.yaml`` and ``dvc.lock``, the wall time of the run when recorded, the
exact command, the project's git commit and the machine (:func:`lggseg.runtime.machine_record`).
Nothing large is copied: no model weights, no data.

``python -m lggseg.reporting.snapshot --workspace laptop --variant laptop --dest results/laptop-2026-11-30
--command "make laptop DATA=..."``
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lggseg.config import ConfigError
from lggseg.errors import DataError, LggsegError
from lggseg.io import write_json, write_text
from lggseg.runtime import git_commit, machine_record

# Files over this size are refused: a snapshot is for git, not for data or weights.
MAX_FILE_BYTES = 2_000_000


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
    ws, dest = Path(workspace), Path(dest)
    if not variants:
        raise ConfigError("write_snapshot: name at least one variant")
    for v in variants:
        _copy(ws / "metrics" / f"{v}.json", dest / "metrics" / f"{v}.json")
        for name in ("slices.csv", "patients.csv"):
            _copy(ws / "data" / "eval" / v / name, dest / "rows" / v / name)
        for result in sorted((ws / "models" / v).glob("seed_*/result.json")):
            _copy(result, dest / "training" / v / result.parent.name / "result.json")
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
    write_json(dest / "snapshot.json", record)
    if note:
        write_text(dest / "NOTE.md", note if note.endswith("\n") else note + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lggseg.reporting.snapshot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--variant", action="append", required=True, help="repeat for several")
    ap.add_argument("--dest", required=True, type=Path, help="results/<name>")
    ap.add_argument("--command", required=True, help="the exact command that produced the workspace's results")
    ap.add_argument("--repo", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    try:
        dest = write_snapshot(args.workspace, args.variant, args.dest, args.command, args.repo)
    except LggsegError as exc:
        print(f"lggseg snapshot: {exc}", file=sys.stderr)
        return 2
    print(f"lggseg snapshot: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
