"""Measure the intensity distribution of the Kaggle LGG slices to choose ``lggseg.data.scans.WINDOWS``.

For every case of a ``kaggle_3m`` folder (TIFF slices stacked in slice order) and every channel
(pre-contrast, FLAIR, post-contrast) it takes the head voxels (value > 0; the data are not
skull-stripped, so these are scalp, skull and brain) and their percentiles. A channel that is a copy
of FLAIR (a sequence not acquired) is left out of its sequence's statistics.

The window maps a volume linearly, ``(x - min) * value / p_q`` with ``p_q`` the q-th percentile of its
non-zero voxels. For each q the target ``value`` is the median over cases of the dataset's own p_q,
and the window is scored by remapping every case with it (as if it came as floats) and measuring the
mean absolute difference to the stored uint8 values over the head voxels: the q with the smallest
median error reproduces the dataset's scaling best.

    python experiments/intensity_window.py /path/to/kaggle_3m   # e.g. restored by ../shared/lgg/restore.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("pre", "flair", "post")
QS = (95.0, 98.0, 99.0, 99.5, 100.0)


def load_case(case: Path) -> np.ndarray:
    n = len(list(case.glob("*_mask.tif")))
    return np.stack([np.asarray(Image.open(case / f"{case.name}_{k}.tif")) for k in range(1, n + 1)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kaggle_3m", type=Path)
    args = ap.parse_args(argv)
    cases = sorted(p for p in args.kaggle_3m.iterdir() if p.is_dir())
    stats: dict[str, list[dict[str, float]]] = {n: [] for n in NAMES}
    volumes: dict[str, list[np.ndarray]] = {n: [] for n in NAMES}
    for case in cases:
        vol = load_case(case)
        for c, name in enumerate(NAMES):
            if c != 1 and np.array_equal(vol[..., c], vol[..., 1]):
                continue  # not acquired: a copy of FLAIR
            v = vol[..., c]
            head = v[v > 0].astype(np.float64)
            row = {"zero": float((v == 0).mean()), "sat": float((head == 255).mean()), "max": float(head.max())}
            row.update({f"p{q:g}": float(np.percentile(head, q)) for q in (50.0, *QS)})
            stats[name].append(row)
            volumes[name].append(v)
    print(f"{len(cases)} cases from {args.kaggle_3m}\n")
    print("| sequence | cases | zero voxels | p50 | p95 | p99 | p99.5 | max | head voxels at 255 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in NAMES:
        rows = stats[name]
        med = {k: np.median([r[k] for r in rows]) for k in rows[0]}
        q1 = {k: np.percentile([r[k] for r in rows], 25) for k in rows[0]}
        q3 = {k: np.percentile([r[k] for r in rows], 75) for k in rows[0]}

        def cell(k: str, fmt: str = "{:.0f}", q1=q1, q3=q3, med=med) -> str:
            return f"{fmt.format(med[k])} ({fmt.format(q1[k])}-{fmt.format(q3[k])})"

        print(f"| {name} | {len(rows)} | {cell('zero', '{:.2f}')} | {cell('p50')} | {cell('p95')} | {cell('p99')} | "
              f"{cell('p99.5')} | {cell('max')} | {cell('sat', '{:.4f}')} |")
    print("\nmedian over cases in each cell, quartiles in brackets; head voxels = value > 0\n")
    print("| sequence | q | target value (median p_q) | remap error: median MAE over cases (quartiles) |")
    print("| --- | --- | --- | --- |")
    for name in NAMES:
        for q in QS:
            target = float(np.median([r[f"p{q:g}"] for r in stats[name]]))
            errs = []
            for v in volumes[name]:
                x = v.astype(np.float64)
                inside = x[x > 0]
                top = np.percentile(inside, q)
                out = np.clip(np.rint(x * target / top), 0, 255)
                errs.append(float(np.abs(out - x)[x > 0].mean()))
            print(f"| {name} | {q:g} | {target:.0f} | {np.median(errs):.2f} ({np.percentile(errs, 25):.2f}-"
                  f"{np.percentile(errs, 75):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
