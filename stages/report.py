"""Report stage: paper Tables 2-4 (``metrics/tables.md``) and Figures 7, 8 and the dataset/Dice plots."""

from __future__ import annotations

import argparse
import sys

from lggseg.config import read_params
from lggseg.errors import LggsegError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics", help="folder holding <variant>.json, fetch.json, data.json")
    ap.add_argument("--eval", default="data/eval", help="folder holding <variant>/figure_slices.npz")
    ap.add_argument("--manifest", default="data/manifest", help="manifest store holding components.csv")
    ap.add_argument("--tables", default="metrics/tables.md")
    ap.add_argument("--plots", default="plots")
    args = ap.parse_args(argv)
    # imported after parsing: --help and usage errors stay fast
    from lggseg.reporting.report import build_report

    try:
        build_report(read_params(args.params), args.metrics, args.eval, args.manifest, args.tables, args.plots)
    except LggsegError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
