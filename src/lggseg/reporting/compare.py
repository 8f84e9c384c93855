"""``lggseg compare``: two evaluation results side by side, with the difference of every metric.

Written for the split-leakage study of issue #4 (paper section 4.1.3 splits by patient; a split by
slice puts adjacent slices of one patient in train and test): run the same variant, budget and seed
once with ``manifest.split_unit: patient`` and once with ``slice``, then::

    lggseg compare patient.json slice.json --labels "patient split" "slice split"
    lggseg compare results/cpu-patient-split-<date> results/cpu-slice-split-<date>

Either argument may be a metrics file or a result snapshot folder (:mod:`lggseg.reporting.snapshot`), whose
``metrics/<variant>.json`` is read (``--variant`` picks one when the folder holds several). Under the
table, one provenance line per side says what each result was made from.

prints a Markdown table of every scalar metric of ``metrics/<variant>.json`` (see
:mod:`lggseg.evaluation.metrics`) with B - A (percentage points for the Dice-like fractions) and the relative
change B / A - 1. Works for any two metrics files of the evaluate stage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lggseg.errors import DataError, LggsegError
from lggseg.reporting.results import FRACTION_KEYS, SCALAR_KEYS, load_metrics
from lggseg.reporting.tables import md_table, provenance_line

COUNT_KEYS = frozenset({"n_test_slices", "n_test_patients"})


def _cell(key: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    if key in FRACTION_KEYS:
        return f"{100 * v:.2f}"
    if key in COUNT_KEYS:
        return f"{int(v)}"
    return f"{v:.3f}"


def compare_rows(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[list[str]]:
    """One row per scalar metric: key, A, B, B - A, B / A - 1 (fractions shown in %, their difference in points).

    A difference is ``n/a`` where either value is missing (null), and the relative change also where
    A is 0.
    """
    rows = []
    for key in SCALAR_KEYS:
        va, vb = a.get(key), b.get(key)
        unit = " (%)" if key in FRACTION_KEYS else ""
        if va is None or vb is None:
            diff = rel = "n/a"
        else:
            scale = 100.0 if key in FRACTION_KEYS else 1.0
            d = (vb - va) * scale
            diff = f"{d:+.0f}" if key in COUNT_KEYS else f"{d:+.2f}" if key in FRACTION_KEYS else f"{d:+.3f}"
            rel = "n/a" if va == 0 else f"{100 * (vb / va - 1):+.1f} %"
        rows.append([key + unit, _cell(key, va), _cell(key, vb), diff, rel])
    return rows


def compare_markdown(a: Mapping[str, Any], b: Mapping[str, Any], labels: Sequence[str] = ("A", "B")) -> list[str]:
    if len(labels) != 2:
        raise ValueError(f"compare_markdown needs two labels, got {list(labels)!r}")
    la, lb = labels
    return md_table(["metric", la, lb, f"{lb} - {la}", "relative"], compare_rows(a, b))


def resolve_metrics(path: str | Path, variant: str | None = None) -> Path:
    """The metrics file behind ``path``: the file itself, or ``<folder>/metrics/<variant>.json`` of a
    snapshot (the only variant there when ``variant`` is None)."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / "metrics"
    if variant is not None:
        return folder / f"{variant}.json"
    found = sorted(p for p in folder.glob("*.json") if p.is_file())
    if len(found) != 1:
        names = ", ".join(p.stem for p in found) or "none"
        raise DataError(f"{path}: expected one metrics/<variant>.json in this folder, found {names}; "
                        "name one with --variant")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lggseg compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="metrics/<variant>.json of the reference run, or its result snapshot folder")
    ap.add_argument("b", help="metrics/<variant>.json of the run to compare with it, or its snapshot folder")
    ap.add_argument("--variant", help="the variant to read from snapshot folders that hold several")
    ap.add_argument("--labels", nargs=2, default=("A", "B"), metavar=("LABEL_A", "LABEL_B"))
    ap.add_argument("--postprocessed", action="store_true", help="compare the post-processed blocks instead")
    args = ap.parse_args(argv)
    try:
        a = load_metrics(resolve_metrics(args.a, args.variant))
        b = load_metrics(resolve_metrics(args.b, args.variant))
    except LggsegError as exc:
        print(f"lggseg compare: {exc}", file=sys.stderr)
        return 2
    if args.postprocessed:
        if "postprocessed" not in a or "postprocessed" not in b:
            print("lggseg compare: --postprocessed, but a file has no 'postprocessed' block", file=sys.stderr)
            return 2
        a, b = {**a["postprocessed"], "provenance": a.get("provenance")}, {**b["postprocessed"], "provenance": b.get("provenance")}
    lines = compare_markdown(a, b, args.labels)
    lines += ["", *(f"{label}: {provenance_line(m)}" for label, m in zip(args.labels, (a, b), strict=True))]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
