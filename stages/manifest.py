"""Stage ``manifest``: validate the raw Kaggle layout and build the slice store of ``lggseg.data.manifest``.

Reads ``common``, ``manifest`` and ``evaluate.noise_side`` (the side s of the "smaller than s x s"
component analysis of paper section 4.1.3); writes the store to ``--out`` and the summary to ``--summary``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lggseg.config import load_section, read_params
from lggseg.data.manifest import build_manifest
from lggseg.errors import LggsegError
from lggseg.io import write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw/kaggle_3m"))
    ap.add_argument("--out", type=Path, default=Path("data/manifest"))
    ap.add_argument("--summary", type=Path, default=Path("metrics/data.json"))
    args = ap.parse_args(argv)
    try:
        params = read_params(args.params)
        common, cfg = load_section("common", params), load_section("manifest", params)
        side = load_section("evaluate", params).noise_side
        summary = build_manifest(args.raw, args.out, common, cfg, small_side=side)
        write_json(args.summary, summary)
    except LggsegError as exc:
        print(f"manifest: {exc}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{k} {v['slices']}" for k, v in summary["splits"].items())
    print(f"{args.out}: {summary['n_slices']} slices of {summary['n_cases']} cases ({splits})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
