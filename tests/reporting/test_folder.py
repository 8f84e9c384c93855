"""``lggseg.reporting.folder``, the one owner of the ``lggseg reproduce`` folder format: what
:class:`FolderWriter` writes, :func:`load_folder_figures` reads back (hand-made arrays, no training).

The end-to-end run (``lggseg reproduce`` then ``lggseg report DIR``) is in ``tests/test_reproduce.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from lggseg.errors import DataError
from lggseg.reporting.folder import (
    FILES,
    PER_VARIANT_FIGURE_KEYS,
    SHARED_FIGURE_KEYS,
    FolderWriter,
    load_folder_figures,
    read_folder,
    variant_key,
)

K, S = 2, 4  # figure slices, side


def _figures(p: float) -> dict[str, np.ndarray]:
    """The evaluate stage's figure arrays for K slices of S x S px; the variant's probabilities are all ``p``."""
    return {
        "ids": np.array(["TCGA_A_1_x_1", "TCGA_A_1_x_2"]), "rows": np.array([5, 9]),
        "image": np.full((K, S, S, 3), 7, np.uint8), "truth": np.eye(S, dtype=bool)[None].repeat(K, 0),
        "threshold": np.array(0.5), "min_area": np.array(49), "selection": np.array("paper"),
        "prob": np.full((K, S, S), p, np.float32), "prob_seed": np.full((1, K, S, S), p, np.float32),
    }


def _results(seed: int) -> list[dict]:
    return [{"seed": seed, "history": [{"epoch": 0, "val_dice": 0.25}, {"epoch": 1, "val_dice": 0.5}]}]


def _slices(dice: float) -> pd.DataFrame:
    return pd.DataFrame({"id": ["TCGA_A_1_x_1"], "dice": [dice]})


def _patients(dice: float) -> pd.DataFrame:
    """The evaluate stage's per-patient rows (raw and post-processed) of two patients."""
    return pd.DataFrame({"seed": 23, "postprocessed": [False, False, True, True], "patient_id": ["0001", "B"] * 2,
                         "dice_slice_mean": dice, "dice_3d": [dice, dice / 2] * 2})


@pytest.fixture()
def folder(tmp_path):
    out = tmp_path / "out"
    env = {"command": "lggseg reproduce", "variants": {"a": {"status": "pending"}, "b": {"status": "pending"}}}
    writer = FolderWriter(out, {"variants": {"a": {}, "b": {}}}, env)
    writer.add_variant("a", {"dice_slice_mean": 0.75}, _slices(0.75), _figures(0.25), _results(23), _patients(0.75))
    env["variants"]["a"]["status"] = "done"
    writer.add_variant("b", {"dice_slice_mean": 0.5}, _slices(0.5), _figures(0.75), _results(7), _patients(0.5))
    return out


def test_variant_key():
    assert variant_key("prob", "regnet_bce") == "prob__regnet_bce"
    assert variant_key("prob_seed", "a") == "prob_seed__a"


def test_writer_writes_the_files_of_the_format(folder):
    components = {"params", "metrics", "slices", "patients", "figures", "training", "environment"}  # not added here
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES[k] for k in components)
    assert yaml.safe_load((folder / FILES["params"]).read_text()) == {"variants": {"a": {}, "b": {}}}
    assert json.loads((folder / FILES["metrics"]).read_text()) == {"a": {"dice_slice_mean": 0.75},
                                                                   "b": {"dice_slice_mean": 0.5}}
    env = json.loads((folder / FILES["environment"]).read_text())
    assert env["variants"]["a"]["status"] == "done"  # the writer's dict, rewritten as the caller updates it
    slices = pd.read_csv(folder / FILES["slices"])
    assert slices.columns.tolist() == ["variant", "id", "dice"] and slices["variant"].tolist() == ["a", "b"]
    training = pd.read_csv(folder / FILES["training"])
    assert training[["variant", "seed", "epoch"]].values.tolist() == [["a", 23, 0], ["a", 23, 1], ["b", 7, 0], ["b", 7, 1]]
    with np.load(folder / FILES["figures"], allow_pickle=False) as z:
        names = set(z.files)
        assert z["prob__b"].max() == np.float32(0.75)
    # shared arrays once, per-variant arrays under their key
    assert names == {*SHARED_FIGURE_KEYS, *(variant_key(k, v) for k in PER_VARIANT_FIGURE_KEYS for v in "ab")}


def test_reader_gives_back_what_the_writer_wrote(folder):
    figures = load_folder_figures(folder / FILES["figures"], ["b", "a", "absent"])
    assert sorted(figures) == ["a", "b"]  # a variant not in the file is left out
    a = figures["a"]
    assert a.ids == ["TCGA_A_1_x_1", "TCGA_A_1_x_2"]
    assert a.image.shape == (K, S, S, 3) and (a.image == 7).all()
    assert a.truth.dtype == bool and a.truth.sum() == K * S
    assert (a.prob == np.float32(0.25)).all() and (figures["b"].prob == np.float32(0.75)).all()


def test_reader_refuses_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="figure slices not found"):
        load_folder_figures(tmp_path / FILES["figures"], ["a"])


def test_stray_files_are_left_alone(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    FolderWriter(out, {}, {})
    assert (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" in caplog.text


def test_files_follow_the_params_order_not_the_finishing_order(tmp_path):
    """Variants trained at once finish in any order; metrics.json, slices.csv and training.csv list them
    as params.yaml does, so two runs of the same command write the same files."""
    out = tmp_path / "out"
    writer = FolderWriter(out, {"variants": {"a": {}, "b": {}}}, {})
    writer.add_variant("b", {"dice_slice_mean": 0.5}, _slices(0.5), _figures(0.75), _results(7))
    assert list(json.loads((out / FILES["metrics"]).read_text())) == ["b"]
    writer.add_variant("a", {"dice_slice_mean": 0.75}, _slices(0.75), _figures(0.25), _results(23))
    assert list(json.loads((out / FILES["metrics"]).read_text())) == ["a", "b"]
    assert list(pd.read_csv(out / FILES["slices"])["variant"]) == ["a", "b"]
    assert list(pd.read_csv(out / FILES["training"])["variant"]) == ["a", "a", "b", "b"]


def test_patients_csv_is_what_the_paired_comparisons_read(folder):
    """Each variant's per-patient rows, written as its evaluation ends, read back per variant by
    :func:`lggseg.reporting.paired.load_patients` (raw rows only; patient ids stay strings)."""
    from lggseg.reporting.paired import load_patients

    a = load_patients(folder / FILES["patients"], "a")
    assert a[["patient_id", "dice_3d"]].values.tolist() == [["0001", 0.75], ["B", 0.375]]
    assert load_patients(folder / FILES["patients"], "b")["dice_3d"].tolist() == [0.5, 0.25]
    rows = read_folder(folder)["patients"]
    assert rows.columns[0] == "variant" and list(rows["variant"]) == ["a"] * 4 + ["b"] * 4


def test_patients_csv_grows_with_each_variant(tmp_path):
    from lggseg.reporting.paired import load_patients

    writer = FolderWriter(tmp_path, {"variants": {"a": {}, "b": {}}}, {})
    writer.add_variant("b", {"dice_slice_mean": 0.5}, _slices(0.5), _figures(0.75), _results(7), _patients(0.5))
    assert set(read_folder(tmp_path)["patients"]["variant"]) == {"b"}
    with pytest.raises(DataError, match="no rows of variant a"):
        load_patients(tmp_path / FILES["patients"], "a")
    writer.add_variant("a", {"dice_slice_mean": 0.75}, _slices(0.75), _figures(0.25), _results(23), _patients(0.75))
    assert list(dict.fromkeys(read_folder(tmp_path)["patients"]["variant"])) == ["a", "b"]  # params order
