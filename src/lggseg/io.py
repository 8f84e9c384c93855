"""Atomic file output: a stage that dies mid-write never leaves a file that looks complete.

Every writer builds its output next to the destination (same filesystem) and renames it into
place with ``os.replace``, which is atomic on POSIX. Errors such as a full disk or an unwritable
directory surface as :class:`OutputError` naming the path.

It also names the file a workspace records its project commit in (:data:`ORIGIN_FILE`) and reads a
result's provenance for that commit (:func:`project_commit`): every layer, from the model card to the
tables, names the same commit the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from lggseg.errors import (
    OutputError as OutputError,  # re-exported; it lives in lggseg.errors (the one error root)
)

ORIGIN_FILE = "workspace-origin.json"
"""Written into a workspace (``make demo``, ``make laptop``, ``make cpu-tables``) by :mod:`lggseg.workspace`
and read by :func:`lggseg.runtime.project_origin`: the project commit the workspace's files were mirrored
from. A workspace is a git repository of its own, so its ``git rev-parse HEAD`` names a throwaway commit."""


def project_commit(provenance: Mapping[str, Any]) -> tuple[str | None, str]:
    """The commit a metrics file's code came from and how to name it: ``provenance.project`` (written
    by evaluation, or stamped by a snapshot) gives the project's commit (``+uncommitted`` when the
    workspace's files differed from it); without that block, ``git_commit`` is where the run was made,
    which in a workspace is the workspace's own commit (so a workspace run says so)."""
    project = provenance.get("project")
    if isinstance(project, Mapping) and project.get("commit"):
        dirty = "+uncommitted" if project.get("uncommitted_changes") else ""
        return str(project["commit"])[:10] + dirty, "commit"
    commit = provenance.get("git_commit")
    if not commit:
        return None, "commit"
    in_workspace = isinstance(project, Mapping) and project.get("workspace")
    return str(commit)[:10], "workspace commit" if in_workspace else "commit"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(dest: str | Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(dest)


def write_text(dest: str | Path, text: str) -> Path:
    return write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | Path, obj: Any) -> Path:
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_yaml(dest: str | Path, obj: Any) -> Path:
    return write_text(dest, yaml.safe_dump(obj, sort_keys=False))


def write_csv(dest: str | Path, frame: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(dest, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return Path(dest)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest``; on success it replaces ``dest`` whole."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old is not None:  # put the previous output back rather than lose it
                os.replace(old, dest)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
