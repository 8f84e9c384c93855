"""Stage ``configure``: validate params.yaml and write one resolved ``configs/<variant>.yaml`` per variant.

``train@<variant>`` depends on its own file only, so a param change re-trains exactly the variants
whose resolved configuration changes. The rule (which loss fields each term reads, what unused ones are
written as) is :func:`lggseg.config.variants.canonical`; this script only calls
:func:`lggseg.config.write_configs`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lggseg.config import write_configs
from lggseg.errors import LggsegError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("configs"))
    args = ap.parse_args(argv)
    try:
        status = write_configs(args.params, args.out)
    except LggsegError as exc:
        print(f"configure: {exc}", file=sys.stderr)
        return 2
    for name, what in status.items():
        print(f"{what:9s} {args.out / (name + '.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
