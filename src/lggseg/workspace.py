"""The demo workspace: run the whole pipeline on synthetic data without touching real results.

``make demo`` calls :func:`run_demo`. It mirrors the project's files into ``demo/`` (git-ignored),
merges ``params.demo.yaml`` over ``params.yaml`` there, makes that folder a git + DVC repository of
its own and runs ``dvc repro`` in it. The committed ``metrics/``, ``plots/`` and ``dvc.lock`` of the
real pipeline are never written. Inside ``demo/`` the usual DVC workflow works, e.g.::

    cd demo && dvc exp run -S loss.gamma=0.5 && dvc metrics diff && dvc exp show

Comparisons of several settings are queued experiments (docs/experiments.md).

A second ``make demo`` re-syncs changed project files and lets DVC skip what is up to date.
``--prepare-only`` builds the workspace without running it, for other profiles such as
``params.cpu.yaml`` where one runs chosen targets (``dvc repro evaluate@<variant>``).
``--set KEY=VALUE`` overrides one dotted key after the profile (e.g. ``fetch.source=/data/kaggle_3m``)
and ``--targets`` limits ``dvc repro`` to some stages: ``make laptop DATA=...`` is
``--dest laptop --overrides params.laptop.yaml --set fetch.source=DATA --targets evaluate@laptop``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lggseg.config import ConfigError, deep_merge, read_params, validate_all
from lggseg.errors import LggsegError
from lggseg.evaluation.metrics import HEADLINE_KEYS
from lggseg.io import ORIGIN_FILE, write_json, write_text

# Results of the real pipeline: never mirrored into the demo, which makes its own.
_NOT_MIRRORED = ("dvc.lock", "metrics/", "plots/", "params.yaml", "demo/", "results/")


def _project_files(repo: Path) -> list[str]:
    """Tracked plus untracked-but-not-ignored files (works on a fresh clone and with local edits)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo, check=True, capture_output=True,
    ).stdout.decode()
    files = [f for f in out.split("\0") if f and (repo / f).is_file()]
    return [f for f in files if not f.startswith(_NOT_MIRRORED)]


def origin_record(repo: Path) -> dict[str, Any]:
    """What :func:`lggseg.runtime.project_origin` reads back in the workspace: the project's commit and
    whether any mirrored file differed from it (results, which are not mirrored, do not count). The
    project is a git repository with a commit (the mirror lists its files with git)."""
    # plain git, not lggseg.runtime.git_commit: that module brings torch, ~2 s for one command here
    status = _git(repo, "status", "--porcelain", "--untracked-files=all").stdout.decode()
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in status.splitlines() if len(line) > 3]
    return {"commit": _git(repo, "rev-parse", "HEAD").stdout.decode().strip(),
            "uncommitted_changes": any(not p.startswith(_NOT_MIRRORED) for p in paths), "project": str(repo)}


def _git(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "lggseg demo", "GIT_AUTHOR_EMAIL": "demo@localhost",
           "GIT_COMMITTER_NAME": "lggseg demo", "GIT_COMMITTER_EMAIL": "demo@localhost"}
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, env=env)


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["fetch.source=/x", "train.epochs=3"]`` -> a nested override mapping (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set expects KEY=VALUE with a dotted KEY (e.g. fetch.source=/data), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with another --set of {part!r}")
        node[parts[-1]] = value
    return out


def prepare_demo_workspace(repo: Path, dest: Path, overrides: Path, sets: Sequence[str] = ()) -> Path:
    """Mirror ``repo`` into ``dest`` with ``overrides`` (then ``sets``) merged into its params.yaml; returns ``dest``."""
    repo, dest = repo.resolve(), dest.resolve()
    params = deep_merge(deep_merge(read_params(repo / "params.yaml"), read_params(overrides)), parse_sets(sets))
    validate_all(params)  # reject a broken profile before copying anything
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set(_project_files(repo))
    for rel in sorted(wanted):
        src, dst = repo / rel, dest / rel
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    write_json(dest / ORIGIN_FILE, origin_record(repo))
    header = f"# Workspace: params.yaml of the project with {Path(overrides).name} merged over it.\n"
    write_text(dest / "params.yaml", header + yaml.safe_dump(params, sort_keys=False))
    if not (dest / ".git").exists():
        _git(dest, "init", "-q")
    if not (dest / ".dvc").exists():
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    _commit(dest, "demo: sync project files")
    return dest


def _commit(ws: Path, message: str) -> None:
    _git(ws, "add", "-A")
    if _git(ws, "status", "--porcelain").stdout.strip():
        _git(ws, "commit", "-q", "-m", message)


def run_demo(repo: Path, dest: Path, overrides: Path, sets: Sequence[str] = (), targets: Sequence[str] = ()) -> int:
    """Prepare the workspace, run ``dvc repro [targets]`` there, commit its results and say where they are."""
    t0 = time.perf_counter()
    ws = prepare_demo_workspace(repo, dest, overrides, sets)
    params = read_params(ws / "params.yaml")
    if params["fetch"]["source"] != "demo":
        return _run_profile(ws, t0, overrides, targets)
    rc = _repro(ws, targets, "demo", "synthetic data, CPU profile of params.demo.yaml")
    if rc != 0:
        return rc
    seconds = time.perf_counter() - t0
    # The benchmark (issue #6, figure 5) records the demo's wall time from this file.
    write_json(ws / "metrics" / "demo_time.json", {"seconds": round(seconds, 1), "command": "make demo"})
    _commit(ws, "demo: dvc repro results")
    minutes = seconds / 60
    print("\n" + "\n".join(demo_table_lines(ws)))
    print(
        f"\n[demo] done in {minutes:.1f} min. These are DEMO numbers on SYNTHETIC data, not results:\n"
        f"  tables:   {ws / 'metrics' / 'tables.md'}\n"
        f"  metrics:  {ws / 'metrics'}/<variant>.json\n"
        f"  figures:  {ws / 'plots'}/\n"
        f"  try:      cd {ws} && dvc exp run -S loss.gamma=0.5 && dvc metrics diff && dvc exp show"
    )
    return 0


_DEMO_COLUMNS = (("dice_slice_mean", "slice-mean"), ("dice_tumour_slices", "tumour slices"),
                 ("dice_patient_3d", "3D"), ("empty_fp_rate", "empty-slice FP"))


def demo_table_lines(ws: Path) -> list[str]:
    """The demo's closing table: per variant, epochs trained, best validation Dice and the test numbers
    (Dice on the test split; ``-`` where undefined), headed as SYNTHETIC so that nobody quotes it."""
    header = ["variant", "epochs", "val Dice", *(label for _, label in _DEMO_COLUMNS)]
    rows = []
    for path in sorted((ws / "metrics").glob("*.json")):
        metrics = json.loads(path.read_text())
        if "dice_slice_mean" not in metrics:
            continue
        runs = [t for t in ((metrics.get("provenance") or {}).get("training") or {}).values() if isinstance(t, dict)]
        epochs = ",".join(dict.fromkeys(str(t.get("epochs_done", "?")) for t in runs)) or "?"
        vals = [t["best_val_dice"] for t in runs if isinstance(t.get("best_val_dice"), (int, float))]
        cells = [path.stem, epochs, f"{sum(vals) / len(vals):.3f}" if vals else "-"]
        cells += [f"{metrics[k]:.3f}" if isinstance(metrics.get(k), (int, float)) else "-" for k, _ in _DEMO_COLUMNS]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    title = "[demo] SYNTHETIC DATA - demo numbers, not results (test split of the synthetic cases):"
    return [title, "  " + fmt(header), *("  " + fmt(r) for r in rows)]


def _repro(ws: Path, targets: Sequence[str], tag: str, what: str) -> int:
    """``dvc repro [targets]`` in ``ws``; returns its exit status (a failure is reported on stderr)."""
    command = " ".join(["dvc repro", *targets])
    print(f"[{tag}] running `{command}` in {ws} ({what})", flush=True)
    rc = subprocess.run([sys.executable, "-m", "dvc", "repro", *targets], cwd=ws, env=_env()).returncode
    if rc != 0:
        print(f"[{tag}] dvc repro failed (exit {rc}); see the output above", file=sys.stderr)
    return rc


def _run_profile(ws: Path, t0: float, overrides: Path, targets: Sequence[str]) -> int:
    """A profile on real data (e.g. the laptop recipe): ``dvc repro`` of ``targets`` and a short summary."""
    rc = _repro(ws, targets, "workspace", Path(overrides).name)
    if rc != 0:
        return rc
    seconds = time.perf_counter() - t0
    write_json(ws / "metrics" / "run_time.json",
               {"seconds": round(seconds, 1), "profile": Path(overrides).name, "targets": list(targets)})
    _commit(ws, f"{Path(overrides).name}: dvc repro results")
    print(f"\n[workspace] done in {seconds / 60:.1f} min (wall time of this command).")
    print("\n".join(summary_lines(ws)))
    return 0


def summary_lines(ws: Path) -> list[str]:
    """The closing lines of a real-data profile: each variant's test numbers (raw and post-processed),
    its metrics file and its model folder."""
    lines = []
    for path in sorted((ws / "metrics").glob("*.json")):
        metrics = json.loads(path.read_text())
        if "dice_slice_mean" not in metrics:
            continue
        variant = path.stem
        blocks = [("test", metrics)]
        if isinstance(metrics.get("postprocessed"), dict):
            blocks.append(("test, post-processed", metrics["postprocessed"]))
        for name, block in blocks:
            lines.append(f"  {variant} {name}: "
                         + ", ".join(f"{k} {block[k]:.4f}" for k in HEADLINE_KEYS if block.get(k) is not None))
        lines.append(f"    metrics {path}\n    model   {ws / 'models' / variant}   (lggseg predict --model ...)")
    return lines


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Spinning OpenMP workers make 2-thread CPU training several times slower whenever anything else
    # runs on the cores (earlier benchmark runs: `training.with_loader` in metrics/bench.json); passive
    # waiting costs nothing on a quiet machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the pipeline with a params profile (default: the demo) in its own workspace.")
    ap.add_argument("--repo", type=Path, default=Path.cwd())
    ap.add_argument("--dest", type=Path, default=Path("demo"))
    ap.add_argument("--overrides", type=Path, default=Path("params.demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one dotted params key after the profile, e.g. fetch.source=/data/kaggle_3m")
    ap.add_argument("--targets", nargs="*", default=[], help="stages for dvc repro (default: all)")
    ap.add_argument("--prepare-only", action="store_true", help="build the workspace, do not run dvc repro")
    args = ap.parse_args(argv)
    try:
        if args.prepare_only:
            ws = prepare_demo_workspace(args.repo, args.dest, args.overrides, args.set)
            print(f"[workspace] ready: {ws} (params: {args.overrides} merged over params.yaml)")
            return 0
        return run_demo(args.repo, args.dest, args.overrides, args.set, args.targets)
    except LggsegError as exc:
        print(f"lggseg workspace: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
