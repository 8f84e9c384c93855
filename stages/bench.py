"""Stage ``bench`` (outside the default targets): benchmark training, loss, data loading and inference.

Merges this device's block into ``metrics/bench.json`` (``lggseg.bench.run.run_benchmark``), so results
of a CPU run and a CUDA run sit side by side. Run with ``dvc repro bench/dvc.yaml:bench``. Same
arguments as ``lggseg bench`` (``lggseg.bench.run.main``).
"""

from __future__ import annotations

import sys

from lggseg.bench.run import main as bench_main


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, prog="stages/bench.py")


if __name__ == "__main__":
    sys.exit(main())
