"""Stage ``figure9``: the paper's Figure 9 (outlier-loss map of a synthetic image) and the blob study.

Reads the ``loss`` section of params.yaml (Figure 9 itself always uses i = 7, j = 21 as in the paper).
"""

from __future__ import annotations

import argparse
import sys

from lggseg.config import load_section
from lggseg.errors import LggsegError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--plot", required=True, help="PNG: Figure 9 input and outlier map")
    ap.add_argument("--study", default=None, help="JSON: Figure 9 numbers and blob-study results")
    ap.add_argument("--study-plot", default=None, help="PNG: blob-study curves and maps")
    args = ap.parse_args(argv)
    # imported after parsing: --help and usage errors stay fast
    from lggseg.reporting.outlier_study import run_figure9

    try:
        cfg = load_section("loss", args.params)
        run_figure9(cfg, args.plot, args.study, args.study_plot)
    except LggsegError as exc:
        print(f"figure9: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
