"""Stage ``train@<variant>``: train every seed of one variant (``lggseg.training.train_all_seeds``).

Runs as ``python stages/train.py ...`` or, on several GPUs, ``torchrun --nproc_per_node N stages/train.py ...``.
An interrupted run continues from its last epoch checkpoint; ``--no-resume`` starts over.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lggseg.config import ConfigError, load_run_config
from lggseg.errors import LggsegError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--config", type=Path, required=True, help="configs/<variant>.yaml written by the configure stage")
    ap.add_argument("--data", type=Path, required=True, help="manifest store (data/manifest)")
    ap.add_argument("--out", type=Path, required=True, help="models/<variant>")
    ap.add_argument("--no-resume", dest="resume", action="store_false")
    args = ap.parse_args(argv)
    # lggseg's notes (the device chosen, why a GPU is not used) on stderr; other libraries stay quiet
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("lggseg").setLevel(logging.INFO)
    try:
        run = load_run_config(args.config)
        if run.variant != args.variant:
            raise ConfigError(f"{args.config} is the config of variant {run.variant!r}, not {args.variant!r}")
        from lggseg.runtime import shutdown_distributed
        from lggseg.training import train_all_seeds

        try:
            summary = train_all_seeds(run, args.data, args.out, resume=args.resume)
        finally:
            shutdown_distributed()
    except LggsegError as exc:
        print(f"train {args.variant}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.variant}: best val Dice {summary['best_val_dice_mean']:.4f} over seeds {summary['seeds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
