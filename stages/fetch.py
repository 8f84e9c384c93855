"""Stage ``fetch``: obtain the LGG dataset as ``<out>/kaggle_3m`` and record its fingerprint.

The fingerprint also goes to ``--fingerprint`` (``metrics/fetch.json``, git-tracked) so that a silently
changed dataset shows up in ``dvc metrics diff``. See :mod:`lggseg.data.fetch` for the sources.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lggseg.config import load_section
from lggseg.data.fetch import fetch
from lggseg.errors import LggsegError
from lggseg.io import write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("data/raw"))
    ap.add_argument("--fingerprint", type=Path, default=Path("metrics/fetch.json"))
    args = ap.parse_args(argv)
    try:
        fp = fetch(load_section("fetch", args.params), args.out)
        write_json(args.fingerprint, fp)
    except LggsegError as exc:
        print(f"fetch: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out / 'kaggle_3m'}: {fp['n_files']} files, {fp['total_bytes']} bytes, sha256 {fp['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
