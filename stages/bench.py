"""Stage ``bench`` (outside the default targets): benchmark training, loss, data loading and inference.

Merges this device's block into ``metrics/bench.json`` (``lggseg.bench.run_benchmark``), so results
of a CPU run and a CUDA run sit side by side. Run with ``dvc repro bench/dvc.yaml:bench``.
"""

from __future__ import annotations

import argparse
import sys

from lggseg.bench import DEMO_TIME_FILE, bench_config, run_benchmark, summary_lines
from lggseg.errors import USER_ERRORS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="metrics/bench.json")
    ap.add_argument("--data", default=None, help="manifest store (default: a small synthetic one)")
    ap.add_argument("--demo-seconds", type=float, default=None, help="wall time of the demo's dvc repro")
    ap.add_argument("--demo-time-file", default=str(DEMO_TIME_FILE))
    args = ap.parse_args(argv)
    try:
        cfg = bench_config(args.params, args.data, args.demo_seconds, args.demo_time_file)
        entry = run_benchmark(cfg, args.out, cfg.common.device)
    except USER_ERRORS as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(entry)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
