"""Manifest store: counts checked independently with Pillow, patient-level split, attributes, validation."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lggseg.config import CommonConfig, ManifestConfig
from lggseg.data.manifest import (
    assign_splits,
    build_manifest,
    mask_components,
    read_clinical,
    small_component_counts,
)
from lggseg.data.store import load_store
from lggseg.data.synthetic import generate_demo
from lggseg.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SHARED_LGG = REPO.parent / "shared" / "lgg"


def pil_counts(raw: Path) -> tuple[int, int]:
    """(slices, tumour slices) counted straight from the mask TIFFs."""
    masks = sorted(raw.glob("*/*_mask.tif"))
    return len(masks), sum(bool(np.asarray(Image.open(m)).any()) for m in masks)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, demo_kaggle_dir):
    out = tmp_path_factory.mktemp("store") / "manifest"
    summary = build_manifest(demo_kaggle_dir, out, CommonConfig(), ManifestConfig())
    return summary, load_store(out)


# --------------------------------------------------------------------------- good data


def test_counts_match_an_independent_count(demo_kaggle_dir, demo_store):
    summary, store = demo_store
    n, tumour = pil_counts(demo_kaggle_dir)
    assert len(store) == summary["n_slices"] == n
    assert int(store.table["has_tumour"].sum()) == summary["n_tumour_slices"] == tumour
    assert sum(s["slices"] for s in summary["splits"].values()) == n
    assert sum(s["tumour_slices"] for s in summary["splits"].values()) == tumour


def test_table_order_paths_and_arrays(demo_kaggle_dir, demo_store):
    _, store = demo_store
    t = store.table
    assert list(t["row"]) == list(range(len(t)))
    assert list(zip(t["case_id"], t["slice_index"], strict=True)) == sorted(zip(t["case_id"], t["slice_index"], strict=True))
    assert store.images.shape == (len(t), 256, 256, 3) and store.masks.shape == (len(t), 256, 256)
    assert set(np.unique(store.masks[:]).tolist()) <= {0, 1}
    for row in (0, len(t) // 2, len(t) - 1):
        r = t.iloc[row]
        assert r["patient_id"] == "_".join(r["case_id"].split("_")[:3])
        img = np.asarray(Image.open(demo_kaggle_dir / r["image_path"]))
        mask = np.asarray(Image.open(demo_kaggle_dir / r["mask_path"]))
        assert np.array_equal(store.images[row], img)
        assert np.array_equal(store.masks[row], mask // 255)
        assert r["tumour_pixels"] == int((mask == 255).sum())
        assert r["position"] == pytest.approx((r["slice_index"] - 1) / (r["n_slices"] - 1))


def test_patient_split_has_no_leak_and_is_deterministic(tmp_path, demo_kaggle_dir, demo_store):
    _, store = demo_store
    splits_per_patient = store.table.groupby("patient_id")["split"].nunique()
    assert (splits_per_patient == 1).all()
    assert all(len(store.indices(s)) > 0 for s in ("train", "val", "test"))
    assert sorted(np.concatenate([store.indices(s) for s in ("train", "val", "test")]).tolist()) == list(range(len(store)))
    build_manifest(demo_kaggle_dir, tmp_path / "again", CommonConfig(), ManifestConfig())
    assert list(load_store(tmp_path / "again").table["split"]) == list(store.table["split"])


def test_slice_split_mixes_patients(tmp_path, demo_kaggle_dir):
    summary = build_manifest(demo_kaggle_dir, tmp_path / "m", CommonConfig(), ManifestConfig(split_unit="slice"))
    table = load_store(tmp_path / "m").table
    assert (table.groupby("patient_id")["split"].nunique() > 1).any()
    n = len(table)
    assert summary["splits"]["val"]["slices"] == int(np.floor(0.15 * n + 0.5))


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (94, (0.7, 0.15, 0.15), (66, 14, 14)),
        (110, (0.7, 0.15, 0.15), (76, 17, 17)),  # 16.5 rounds half up
        (6, (0.7, 0.15, 0.15), (4, 1, 1)),
        (3, (0.7, 0.15, 0.15), (1, 1, 1)),  # each split gets at least one unit
        (10, (0.5, 0.25, 0.25), (4, 3, 3)),  # 2.5 -> 3
        (20, (0.8, 0.1, 0.1), (16, 2, 2)),
    ],
)
def test_split_sizes(n, fractions, expected):
    labels = assign_splits(n, fractions, seed=23)
    assert tuple(int((labels == s).sum()) for s in ("train", "val", "test")) == expected
    assert list(labels) == list(assign_splits(n, fractions, seed=23))


def test_split_needs_three_units():
    with pytest.raises(DataError, match="at least 3"):
        assign_splits(2, (0.7, 0.15, 0.15), seed=0)


def test_attribute_vector(demo_kaggle_dir, demo_store):
    _, store = demo_store
    with open(demo_kaggle_dir / "data.csv", newline="") as fh:
        rows = {r["Patient"]: r for r in csv.DictReader(fh)}
    names = store.attribute_names
    assert names[-1] == "attr:position" and names == store.meta["attribute_names"]
    assert store.attributes.dtype == np.float32 and store.attributes.shape == (len(store), len(names))
    for col in CommonConfig().attribute_columns:
        block = [i for i, a in enumerate(names) if a.startswith(f"attr:{col}=")]
        cats = [names[i].split("=", 1)[1] for i in block]
        seen = sorted({int(r[col]) for r in rows.values() if r[col] != ""})
        assert cats == [str(v) for v in seen] + ["missing"]
        assert np.all(store.attributes[:, block].sum(axis=1) == 1)
        for i in range(0, len(store), 7):
            value = rows[store.table.at[i, "patient_id"]][col]
            hot = cats[int(np.argmax(store.attributes[i, block]))]
            assert hot == (value if value != "" else "missing")
    assert store.attributes[:, -1].tolist() == pytest.approx(store.table["position"].tolist())
    assert store.table["attr:RNASeqCluster=missing"].sum() > 0  # the demo always has a missing cell


def test_attribute_options(tmp_path, demo_kaggle_dir):
    common = CommonConfig(attribute_columns=("COCCluster",), use_position=False)
    build_manifest(demo_kaggle_dir, tmp_path / "m", common, ManifestConfig())
    store = load_store(tmp_path / "m")
    assert store.attribute_names[-1] == "attr:COCCluster=missing"
    assert all(a.startswith("attr:COCCluster=") for a in store.attribute_names)


def test_reader_accepts_semicolon_crlf(tmp_path):
    p = tmp_path / "data.csv"
    p.write_bytes(b"Patient;RNASeqCluster;COCCluster\r\nTCGA_A_1;2;\r\nTCGA_A_2;;3\r\n")
    table = read_clinical(p)
    assert list(table.index) == ["TCGA_A_1", "TCGA_A_2"]
    assert table.loc["TCGA_A_1", "RNASeqCluster"] == "2" and table.loc["TCGA_A_2", "RNASeqCluster"] == ""


def test_store_json(demo_store):
    _, store = demo_store
    meta = store.meta
    assert {"n_slices", "height", "width", "attribute_names", "attribute_columns", "fingerprint"} <= set(meta)
    assert meta["n_slices"] == len(store) and (meta["height"], meta["width"]) == (256, 256)
    assert meta["fingerprint"]["n_files"] == 2 * len(store) + 2  # TIFFs + data.csv + README.txt
    assert meta["source"] is None  # a raw folder the fetch stage did not write has no recorded source


def test_store_json_records_the_fetched_source(tmp_path):
    from lggseg.config import FetchConfig
    from lggseg.data.fetch import fetch

    fp = fetch(FetchConfig(source="demo", demo_cases=3), tmp_path / "raw")
    build_manifest(tmp_path / "raw" / "kaggle_3m", tmp_path / "store", CommonConfig(), ManifestConfig())
    meta = load_store(tmp_path / "store").meta
    assert meta["source"] == "demo" and meta["fingerprint"]["sha256"] == fp["sha256"]


def test_fingerprint_matches_fetch(demo_kaggle_dir, demo_store):
    from lggseg.data.fetch import fingerprint

    fp = fingerprint(demo_kaggle_dir, "x")
    assert demo_store[1].meta["fingerprint"]["sha256"] == fp["sha256"]


# --------------------------------------------------------------------------- components


def _mask(shape, *pixels):
    m = np.zeros(shape, dtype=bool)
    for y, x in pixels:
        m[y, x] = True
    return m


_SQUARE7 = np.pad(np.ones((7, 7), bool), 3)
_LINE = np.pad(np.ones((1, 10), bool), 2)
_L_SHAPE = _mask((8, 8), (0, 0), (1, 0), (2, 0), (2, 1), (2, 2))


@pytest.mark.parametrize(
    ("mask", "conn", "expected"),
    [
        (_mask((4, 4), (1, 1), (2, 2)), 4, [(1, 1, 1, 1, 1), (1, 2, 2, 1, 1)]),  # diagonal pair: two pieces
        (_mask((4, 4), (1, 1), (2, 2)), 8, [(2, 1, 1, 2, 2)]),  # ... one piece with 8-connectivity
        (_SQUARE7, 8, [(49, 3, 3, 7, 7)]),
        (_LINE, 4, [(10, 2, 2, 1, 10)]),
        (_L_SHAPE, 4, [(5, 0, 0, 3, 3)]),
        (np.zeros((5, 5), bool), 8, []),
    ],
    ids=["diag-4", "diag-8", "square7", "line", "L", "empty"],
)
def test_mask_components(mask, conn, expected):
    assert mask_components(mask, conn) == expected


def test_small_component_conventions():
    # area, height, width -> (area < 49, bbox <= 7x7, bbox < 7x7)
    comps = pd.DataFrame(
        [
            (0, 8, 49, 7, 7),  # full 7x7 square: only "bbox <= 7"
            (1, 8, 10, 1, 10),  # thin line: small area, box too long
            (2, 8, 36, 6, 6),  # 6x6: small by every convention
            (2, 8, 48, 7, 7),  # nearly full 7x7: small area, box <= 7 but not < 7
            (3, 4, 5, 3, 3),  # other connectivity
        ],
        columns=["row", "connectivity", "area", "height", "width"],
    )
    counts = small_component_counts(comps, side=7)
    assert counts["conn8"] == {
        "components": 4,
        "area_lt_side_sq": 3,
        "bbox_le_side": 3,
        "bbox_lt_side": 1,
        "slices_with_area_lt_side_sq": 2,
    }
    assert counts["conn4"]["components"] == 1 and counts["conn4"]["bbox_lt_side"] == 1


def test_components_csv(demo_store):
    _, store = demo_store
    comps = pd.read_csv(store.root / "components.csv")
    t = store.table
    for conn in (4, 8):
        sub = comps[comps["connectivity"] == conn]
        # Areas of a slice's components add up to its tumour pixels; every tumour slice has one.
        per_row = sub.groupby("row")["area"].sum()
        assert set(per_row.index) == set(t.index[t["has_tumour"] == 1])
        assert (per_row == t.loc[per_row.index, "tumour_pixels"]).all()


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def demo3(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("demo3"), n_cases=3, seed=11)


def _case(root):
    return sorted(p for p in root.iterdir() if p.is_dir())[0]


def _img(root, k=1):
    c = _case(root)
    return c / f"{c.name}_{k}.tif"


def _msk(root, k=1):
    c = _case(root)
    return c / f"{c.name}_{k}_mask.tif"


def _save(path, arr):
    Image.fromarray(arr).save(path)
    return path.name


def _edit_csv(root, fn):
    p = root / "data.csv"
    table = pd.read_csv(p, dtype=str, keep_default_na=False)
    fn(table, "_".join(_case(root).name.split("_")[:3]))
    table.to_csv(p, index=False)
    return "data.csv"


def _set_cell(value):
    def edit(table, patient):
        table.loc[table["Patient"] == patient, "RNASeqCluster"] = value

    return lambda root: _edit_csv(root, edit)


def _truncate(root):
    p = _img(root, 3)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p.name


def _garbage(root):
    _img(root, 2).write_bytes(b"II*\x00 this is no tiff")
    return _img(root, 2).name


def _gap(root):
    c = _case(root)
    n = len(list(c.glob("*_mask.tif")))
    _img(root, n).rename(c / f"{c.name}_{n + 2}.tif")
    _msk(root, n).rename(c / f"{c.name}_{n + 2}_mask.tif")
    return c.name


def _unlink(path_fn):
    def go(root):
        p = path_fn(root)
        p.unlink()
        return p.name

    return go


def _no_cases(root):
    for c in [p for p in root.iterdir() if p.is_dir()]:
        shutil.rmtree(c)
    return root.name


def _stray(root):
    (_case(root) / "notes.txt").write_text("x")
    return "notes.txt"


def _rename_case(root):
    _case(root).rename(root / "scan_1")
    return "scan_1"


def _mask_value(v):
    def go(root):
        arr = np.zeros((256, 256), np.uint8)
        arr[10, 10] = v
        return _save(_msk(root, 2), arr)

    return go


def _drop_patient(table, patient):
    table.drop(table.index[table["Patient"] == patient], inplace=True)


def _dup_patient(table, patient):
    table.loc[len(table)] = table[table["Patient"] == patient].iloc[0]


def _drop_column(table, patient):
    table.drop(columns=["RNASeqCluster"], inplace=True)


BAD_INPUTS = {
    "truncated-tif": (_truncate, "truncated"),
    "garbage-tif": (_garbage, "not a TIFF"),
    "grayscale-image": (lambda r: _save(_img(r), np.zeros((256, 256), np.uint8)), "single-channel"),
    "rgba-image": (lambda r: _save(_img(r), np.zeros((256, 256, 4), np.uint8)), "4 channels"),
    "small-image": (lambda r: _save(_img(r), np.zeros((128, 128, 3), np.uint8)), "128x128"),
    "uint16-mask": (lambda r: _save(_msk(r), np.zeros((256, 256), np.uint16)), "dtype uint16"),
    "rgb-mask": (lambda r: _save(_msk(r), np.zeros((256, 256, 3), np.uint8)), "shape (256, 256, 3)"),
    "mask-value-1": (_mask_value(1), "values [1]"),
    "mask-value-128": (_mask_value(128), "values [128]"),
    "image-without-mask": (_unlink(_msk), "image without mask"),
    "mask-without-image": (_unlink(_img), "mask without image"),
    "slice-gap": (_gap, "not contiguous"),
    "patient-not-in-csv": (lambda r: _edit_csv(r, _drop_patient), "no row for patient"),
    "duplicate-patient": (lambda r: _edit_csv(r, _dup_patient), "more than one row"),
    "missing-column": (lambda r: _edit_csv(r, _drop_column), "RNASeqCluster"),
    "non-numeric-cluster": (_set_cell("abc"), "not a number"),
    "negative-cluster": (_set_cell("-1"), "non-negative integer"),
    "fractional-cluster": (_set_cell("2.5"), "non-negative integer"),
    "no-case-folders": (_no_cases, "empty input folder"),
    "no-data-csv": (_unlink(lambda r: r / "data.csv"), "not found"),
    "stray-file": (_stray, "unexpected entry"),
    "bad-case-name": (_rename_case, "case id"),
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_data_error_naming_the_file(tmp_path, demo3, name):
    mutate, needle = BAD_INPUTS[name]
    raw = tmp_path / "kaggle_3m"
    shutil.copytree(demo3, raw)
    filename = mutate(raw)
    out = tmp_path / "manifest"
    out.mkdir()
    (out / "previous.txt").write_text("old store")
    with pytest.raises(DataError) as err:
        build_manifest(raw, out, CommonConfig(), ManifestConfig())
    msg = str(err.value)
    assert filename in msg and needle in msg, msg
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]  # old store untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle_3m", "manifest"]  # no temporary left


def test_missing_raw_dir(tmp_path):
    with pytest.raises(DataError, match="input folder not found"):
        build_manifest(tmp_path / "nothing", tmp_path / "m", CommonConfig(), ManifestConfig())


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: (d / "store.json").unlink(), "store.json: not found"),
        (lambda d: (d / "masks.npy").unlink(), "masks.npy: not found"),
        (lambda d: np.save(d / "images.npy", np.zeros((2, 256, 256, 3), np.uint8)), "images.npy: shape"),
        (lambda d: (d / "manifest.csv").write_text("row\n0\n"), "manifest.csv: expected"),
    ],
    ids=["no-store-json", "no-masks", "short-images", "short-table"],
)
def test_load_store_rejects_damaged_stores(tmp_path, demo_store, damage, needle):
    copy = tmp_path / "store"
    shutil.copytree(demo_store[1].root, copy)
    damage(copy)
    with pytest.raises(DataError, match=needle):
        load_store(copy)


# --------------------------------------------------------------------------- stage script


def _stage_main():
    spec = importlib.util.spec_from_file_location("stage_manifest", REPO / "stages" / "manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_stage_script(tmp_path, demo_kaggle_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("evaluate:\n  noise_side: 5\nmanifest:\n  split_seed: 3\n")
    main = _stage_main()
    args = ["--raw", str(demo_kaggle_dir), "--out", "data/manifest", "--summary", "metrics/data.json"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "metrics" / "data.json").read_text())
    assert summary["small_components"]["side"] == 5
    assert load_store(tmp_path / "data" / "manifest").meta["split_seed"] == 3
    capsys.readouterr()
    assert main(["--raw", str(tmp_path / "nope"), *args[2:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("manifest: ") and "nope" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_subset_counts(tmp_path, real_kaggle_dir):
    summary = build_manifest(real_kaggle_dir, tmp_path / "m", CommonConfig(), ManifestConfig())
    n, tumour = pil_counts(real_kaggle_dir)
    assert (summary["n_cases"], summary["n_slices"], summary["n_tumour_slices"]) == (5, n, tumour)
    store = load_store(tmp_path / "m")
    assert (store.table.groupby("patient_id")["split"].nunique() == 1).all()


@pytest.mark.slow
@pytest.mark.realdata
def test_real_full_dataset(tmp_path):
    if not (SHARED_LGG / "restore.py").is_file():
        pytest.skip("../shared/lgg (real LGG copy) is not available")
    subprocess.run([sys.executable, str(SHARED_LGG / "restore.py"), str(tmp_path)], check=True, capture_output=True)
    raw = tmp_path / "kaggle_3m"
    start = time.perf_counter()
    summary = build_manifest(raw, tmp_path / "m", CommonConfig(), ManifestConfig())
    seconds = time.perf_counter() - start
    n, tumour = pil_counts(raw)
    print(f"\nmanifest of {summary['n_cases']} real cases: {seconds:.1f} s")
    print("small components:", json.dumps(summary["small_components"]))
    print("splits:", json.dumps(summary["splits"]))
    assert summary["n_cases"] == 94 and summary["n_slices"] == 3364 == n
    assert summary["n_tumour_slices"] == tumour
    assert len(load_store(tmp_path / "m")) == 3364
