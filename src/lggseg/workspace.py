"""The demo workspace: run the whole pipeline on synthetic data without touching real results.

``make demo`` calls :func:`run_demo`. It mirrors the project's files into ``demo/`` (git-ignored),
merges ``params.demo.yaml`` over ``params.yaml`` there, makes that folder a git + DVC repository of
its own and runs ``dvc repro`` in it. The committed ``metrics/``, ``plots/`` and ``dvc.lock`` of the
real pipeline are never written. Inside ``demo/`` the usual DVC workflow works, e.g.::

    cd demo && dvc exp run -S loss.gamma=0.5 && dvc metrics diff && dvc exp show

A second ``make demo`` re-syncs changed project files and lets DVC skip what is up to date.
``--prepare-only`` builds the workspace without running it, for other profiles such as
``params.cpu.yaml`` where one runs chosen targets (``dvc repro evaluate@<variant>``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lggseg.config import deep_merge, read_params, validate_all
from lggseg.io import write_json, write_text

# Results of the real pipeline: never mirrored into the demo, which makes its own.
_NOT_MIRRORED = ("dvc.lock", "metrics/", "plots/", "params.yaml", "demo/")


def _project_files(repo: Path) -> list[str]:
    """Tracked plus untracked-but-not-ignored files (works on a fresh clone and with local edits)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo, check=True, capture_output=True,
    ).stdout.decode()
    files = [f for f in out.split("\0") if f and (repo / f).is_file()]
    return [f for f in files if not f.startswith(_NOT_MIRRORED)]


def _git(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "lggseg demo", "GIT_AUTHOR_EMAIL": "demo@localhost",
           "GIT_COMMITTER_NAME": "lggseg demo", "GIT_COMMITTER_EMAIL": "demo@localhost"}
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, env=env)


def prepare_demo_workspace(repo: Path, dest: Path, overrides: Path) -> Path:
    """Mirror ``repo`` into ``dest`` with ``overrides`` merged into its params.yaml; returns ``dest``."""
    repo, dest = repo.resolve(), dest.resolve()
    params = deep_merge(read_params(repo / "params.yaml"), read_params(overrides))
    validate_all(params)  # reject a broken demo profile before copying anything
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set(_project_files(repo))
    for rel in sorted(wanted):
        src, dst = repo / rel, dest / rel
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    header = "# DEMO workspace: params.yaml of the project with params.demo.yaml merged over it.\n"
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


def run_demo(repo: Path, dest: Path, overrides: Path) -> int:
    """Prepare the workspace, run ``dvc repro`` there, commit its results and say where they are."""
    t0 = time.perf_counter()
    ws = prepare_demo_workspace(repo, dest, overrides)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Spinning OpenMP workers make 2-thread CPU training several times slower whenever anything else
    # runs on the cores (measured by the benchmark); passive waiting costs nothing on a quiet machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"[demo] running `dvc repro` in {ws} (synthetic data, CPU profile of params.demo.yaml)", flush=True)
    rc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env).returncode
    if rc != 0:
        print(f"[demo] dvc repro failed (exit {rc}); see the output above", file=sys.stderr)
        return rc
    seconds = time.perf_counter() - t0
    # The benchmark (issue #6, figure 5) records the demo's wall time from this file.
    write_json(ws / "metrics" / "demo_time.json", {"seconds": round(seconds, 1), "command": "make demo"})
    _commit(ws, "demo: dvc repro results")
    minutes = seconds / 60
    print(
        f"\n[demo] done in {minutes:.1f} min. These are DEMO numbers on SYNTHETIC data, not results:\n"
        f"  tables:   {ws / 'metrics' / 'tables.md'}\n"
        f"  metrics:  {ws / 'metrics'}/<variant>.json\n"
        f"  figures:  {ws / 'plots'}/\n"
        f"  try:      cd {ws} && dvc exp run -S loss.gamma=0.5 && dvc metrics diff && dvc exp show"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the pipeline with a params profile (default: the demo) in its own workspace.")
    ap.add_argument("--repo", type=Path, default=Path.cwd())
    ap.add_argument("--dest", type=Path, default=Path("demo"))
    ap.add_argument("--overrides", type=Path, default=Path("params.demo.yaml"))
    ap.add_argument("--prepare-only", action="store_true", help="build the workspace, do not run dvc repro")
    args = ap.parse_args(argv)
    if args.prepare_only:
        ws = prepare_demo_workspace(args.repo, args.dest, args.overrides)
        print(f"[workspace] ready: {ws} (params: {args.overrides} merged over params.yaml)")
        return 0
    return run_demo(args.repo, args.dest, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
