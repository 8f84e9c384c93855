"""The synthetic demo dataset has the exact Kaggle layout, real value ranges, and is deterministic."""

from __future__ import annotations

import csv
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lggseg.data.fetch import fingerprint
from lggseg.data.synthetic import DATA_COLUMNS, _plan_cases, generate_demo

CASE_RE = re.compile(r"^TCGA_[A-Z]{2}_\d{4}_\d{8}$")


def _cases(root):
    return sorted(p for p in root.iterdir() if p.is_dir())


def _mask_areas(case):
    n = len(list(case.glob("*_mask.tif")))
    return [int((np.asarray(Image.open(case / f"{case.name}_{k}_mask.tif")) > 0).sum()) for k in range(1, n + 1)]


def test_layout_and_file_formats(demo_kaggle_dir):
    cases = _cases(demo_kaggle_dir)
    assert len(cases) == 6
    assert (demo_kaggle_dir / "README.txt").read_text().startswith("SYNTHETIC")
    for case in cases:
        assert CASE_RE.match(case.name), case.name
        names = sorted(p.name for p in case.iterdir())
        n = len(names) // 2
        assert 20 <= n <= 28
        expected = sorted([f"{case.name}_{k}.tif" for k in range(1, n + 1)] + [f"{case.name}_{k}_mask.tif" for k in range(1, n + 1)])
        assert names == expected
    img = Image.open(cases[0] / f"{cases[0].name}_1.tif")
    mask = Image.open(cases[0] / f"{cases[0].name}_1_mask.tif")
    assert (img.format, img.mode, img.size) == ("TIFF", "RGB", (256, 256))
    assert (mask.format, mask.mode, mask.size) == ("TIFF", "L", (256, 256))


def test_every_case_has_one_contiguous_smooth_lesion(demo_kaggle_dir):
    total = tumour = 0
    for case in _cases(demo_kaggle_dir):
        for k in range(1, 4):
            values = np.unique(np.asarray(Image.open(case / f"{case.name}_{k}_mask.tif")))
            assert set(values.tolist()) <= {0, 255}
        areas = np.array(_mask_areas(case))
        nz = np.flatnonzero(areas)
        assert nz.size >= 1, f"{case.name} has no tumour slice"
        assert np.array_equal(nz, np.arange(nz[0], nz[-1] + 1)), f"{case.name}: tumour slices not contiguous"
        # Grows then shrinks: one peak, no jumps back up.
        peak = int(np.argmax(areas))
        assert np.all(np.diff(areas[: peak + 1]) >= 0) and np.all(np.diff(areas[peak:]) <= 0)
        total += len(areas)
        tumour += nz.size
    assert tumour < total / 2, "most slices should have no lesion"


def test_lesion_is_bright_on_flair(demo_kaggle_dir):
    case = _cases(demo_kaggle_dir)[0]
    k = int(np.argmax(_mask_areas(case))) + 1
    img = np.asarray(Image.open(case / f"{case.name}_{k}.tif")).astype(float)
    mask = np.asarray(Image.open(case / f"{case.name}_{k}_mask.tif")) > 0
    head = img.sum(-1) > 60
    flair = img[..., 1]
    assert flair[mask].mean() > flair[head & ~mask].mean() + 40


def test_data_csv_columns_ranges_and_missing(demo_kaggle_dir):
    with open(demo_kaggle_dir / "data.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == DATA_COLUMNS
    table = pd.read_csv(demo_kaggle_dir / "data.csv")
    patients = {"_".join(c.name.split("_")[:3]) for c in _cases(demo_kaggle_dir)}
    assert set(table["Patient"]) == patients
    assert table["RNASeqCluster"].isna().any(), "the real data has missing RNASeqCluster cells"
    ranges = {"RNASeqCluster": (1, 4), "MethylationCluster": (1, 5), "COCCluster": (1, 3), "age_at_initial_pathologic": (20, 75), "death01": (0, 1)}
    for col, (lo, hi) in ranges.items():
        values = table[col].dropna()
        assert values.between(lo, hi).all() and (values == values.round()).all(), col


def test_deterministic_and_seed_dependent(tmp_path, demo_kaggle_dir):
    # Same seed, fewer cases: those cases are identical byte for byte (each case has its own stream).
    fewer = generate_demo(tmp_path / "a", n_cases=3, seed=0)
    for case in _cases(fewer):
        assert fingerprint(case, "x") == fingerprint(demo_kaggle_dir / case.name, "x")
    other = generate_demo(tmp_path / "b", n_cases=3, seed=1)
    assert {p.name for p in _cases(other)}.isdisjoint({p.name for p in _cases(demo_kaggle_dir)})


def test_lesion_size_follows_rnaseq_cluster(demo_kaggle_dir):
    plan = _plan_cases(200, seed=3)
    by_cluster = pd.DataFrame([(c.row["RNASeqCluster"], c.radius) for c in plan], columns=["cluster", "radius"])
    means = by_cluster[by_cluster["cluster"] != ""].groupby("cluster")["radius"].mean()
    assert list(means.index) == ["1", "2", "3", "4"] and means.is_monotonic_increasing
    # ... and the rendered masks follow the planned radius.
    radius = {c.name: c.radius for c in _plan_cases(6, seed=0)}
    cases = _cases(demo_kaggle_dir)
    peak = pd.Series([max(_mask_areas(c)) for c in cases])
    assert pd.Series([radius[c.name] for c in cases]).corr(peak, method="spearman") > 0.8


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_rejects_bad_case_count(tmp_path, bad):
    with pytest.raises(ValueError, match="n_cases"):
        generate_demo(tmp_path, n_cases=bad)
