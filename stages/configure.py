"""Stage ``configure``: validate params.yaml and write one resolved ``configs/<variant>.yaml`` per variant.

``train@<variant>`` depends on its own file only, so a param change re-trains exactly the variants
whose resolved configuration changes. Loss settings of terms a variant does not use are written at
their defaults, so ``-S loss.gamma=0.5`` changes only the configs of variants with the outlier term
(eq. 13). Unchanged files are left untouched (same mtime); files of dropped variants are removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from lggseg.config import LossConfig, RunConfig, read_params, validate_all
from lggseg.errors import USER_ERRORS
from lggseg.io import write_text

# LossConfig fields read only by one term (lggseg.losses); smooth serves both dice and outlier.
_TERM_FIELDS = {
    "bce": ("alpha",),
    "dice": ("beta",),
    "outlier": ("gamma", "i", "j", "threshold_rounding", "counts", "outlier_mode", "reduction",
                "gamma_warmup_epochs", "gamma_ramp_epochs"),
}


def canonical(run: RunConfig) -> RunConfig:
    """``run`` with the loss settings of unused terms reset to their defaults."""
    default = LossConfig()
    unused = [f for term, names in _TERM_FIELDS.items() if term not in run.loss.terms for f in names]
    if "dice" not in run.loss.terms and "outlier" not in run.loss.terms:
        unused.append("smooth")
    loss = dataclasses.replace(run.loss, **{f: getattr(default, f) for f in unused})
    return dataclasses.replace(run, loss=loss)


def write_configs(params_path: Path, out: Path) -> dict[str, str]:
    """``{variant: "written" | "unchanged" | "removed"}`` after syncing ``out`` with params.yaml."""
    runs = validate_all(read_params(params_path))  # every section and variant, before any write
    status = {}
    for name, run in runs.items():
        dest = out / f"{name}.yaml"
        text = yaml.safe_dump(canonical(run).to_dict(), sort_keys=False)
        if dest.is_file() and dest.read_text() == text:
            status[name] = "unchanged"
        else:
            write_text(dest, text)
            status[name] = "written"
    for stale in sorted(out.glob("*.yaml")):
        if stale.stem not in runs:
            stale.unlink()
            status[stale.stem] = "removed"
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("configs"))
    args = ap.parse_args(argv)
    try:
        status = write_configs(args.params, args.out)
    except USER_ERRORS as exc:
        print(f"configure: {exc}", file=sys.stderr)
        return 2
    for name, what in status.items():
        print(f"{what:9s} {args.out / (name + '.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
