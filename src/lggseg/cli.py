"""The ``lggseg`` console script: one entry point, one sub-command per user-facing tool.

Each sub-command is a module with ``main(argv: list[str] | None) -> int`` that parses its own
arguments; this file only routes ``lggseg <command> ...`` to it and imports nothing heavy until a
command is chosen, so ``lggseg --help`` is instant. A new tool plugs in with one line in
:data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("lggseg.predict", "segment slices, case folders or a kaggle_3m folder with a trained model"),
    "bench": ("lggseg.bench.run", "benchmark training, loss, data loading and inference on this device"),
    "preflight": ("lggseg.preflight", "build every training variant on this device and time a few steps of it"),
    "compare": ("lggseg.reporting.compare", "two metrics files side by side with the difference of every metric"),
    "demo": ("lggseg.workspace", "run the whole pipeline on synthetic data in its own workspace (demo/)"),
    "reproduce": ("lggseg.reproduce", "raw kaggle_3m -> manifest -> several variants trained at once -> test metrics"),
    "report": ("lggseg.reporting.merge", "tables.md and the figures of `lggseg reproduce` folders or snapshots, merged"),
}
"""Sub-command -> (module with ``main(argv) -> int``, one-line help)."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lggseg",
        description="Glioma MRI segmentation (Wan et al. 2023 reproduction). Pipeline stages run with `dvc repro`.",
        epilog="Run `lggseg COMMAND --help` for the options of a command.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Route ``argv`` (default ``sys.argv[1:]``) to a sub-command; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        ap.print_usage(sys.stderr)
        print(f"lggseg: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exc:  # a command's argparse exits on --help and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
