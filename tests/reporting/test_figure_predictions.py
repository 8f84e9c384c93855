"""The model's half of the figure slices, as a snapshot keeps it: PNG + JSON without the data, read back with
the evaluation's exact threshold decision, and completed from a manifest store of the same data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lggseg.data.store import load_store
from lggseg.errors import DataError
from lggseg.reporting.figure_predictions import (
    FILES,
    check_same_data,
    figure_slices_from_store,
    has_figure_predictions,
    read_figure_predictions,
    store_fingerprint,
    write_figure_predictions,
)


def _npz(path: Path, prob: np.ndarray, threshold: float = 0.5, ids=None, image=None, truth=None) -> Path:
    k = prob.shape[0]
    arrays = {"ids": np.array(ids if ids is not None else [f"TCGA_X_{i}" for i in range(k)]),
              "rows": np.arange(k, dtype=np.int64), "prob": prob.astype(np.float16),
              "threshold": np.float32(threshold), "prob_seed": np.int64(23), "min_area": np.int64(49),
              "selection": np.array("quantile")}
    if image is not None:
        arrays["image"], arrays["truth"] = image, truth
    np.savez(path, **arrays)
    return path


# (threshold, stored probability, above the threshold?) and whether rounding to 1/255 alone would flip it
EDGES = [
    (0.5, 0.5, False, True),  # round(127.5) = 128 -> 0.502: plain quantisation would call it tumour
    (0.5, 0.5004883, True, False),  # the float16 just above 0.5
    (0.5, 0.4997559, False, False),  # the float16 just below 0.5
    (0.4, 0.4005, True, True),  # round(102.13) = 102 -> 0.4, not above: plain quantisation would drop it
    (0.4, 0.4, False, False),
    (0.5, 0.0, False, False),
    (0.5, 1.0, True, False),
]


@pytest.mark.parametrize(("threshold", "p", "above", "plain_flips"), EDGES)
def test_the_threshold_decision_survives_quantisation(tmp_path, threshold, p, above, plain_flips):
    prob = np.full((2, 8, 16), 0.1, np.float32)
    prob[1, 3, 5] = p
    stored = float(np.float16(p))
    assert (stored > threshold) == above  # the case is what the table says
    assert (np.round(stored * 255) / 255 > threshold) != above if plain_flips else True
    write_figure_predictions(_npz(tmp_path / "f.npz", prob, threshold), tmp_path / "rows")
    back = read_figure_predictions(tmp_path / "rows")
    assert bool(back.prob[1, 3, 5] > threshold) == above
    np.testing.assert_array_equal(back.prob > threshold, prob.astype(np.float16).astype(np.float32) > threshold)
    assert np.abs(back.prob - prob.astype(np.float16)).max() <= 1 / 510 + 1e-6
    assert back.threshold == pytest.approx(threshold)


def test_no_data_is_written_and_the_record_says_what_the_files_hold(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.random((3, 32, 24)).astype(np.float32)
    image = rng.integers(0, 255, (3, 32, 24, 3), dtype=np.uint8)
    paths = write_figure_predictions(_npz(tmp_path / "f.npz", prob, image=image, truth=prob > 0.7), tmp_path / "rows")
    assert sorted(p.name for p in paths) == sorted(FILES) and has_figure_predictions(tmp_path / "rows")
    assert not list((tmp_path / "rows").glob("*.npz"))
    record = json.loads((tmp_path / "rows" / "figure_slices.json").read_text())
    assert (record["ids"], record["rows"], record["height"], record["width"]) == \
        ([f"TCGA_X_{i}" for i in range(3)], [0, 1, 2], 32, 24)
    assert (record["prob_seed"], record["min_area"], record["selection"]) == (23, 49, "quantile")
    assert "image" not in record and "truth" not in record
    back = read_figure_predictions(tmp_path / "rows")
    assert back.prob.shape == (3, 32, 24) and back.ids == record["ids"]


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: (d / "figure_slices.json").unlink(), "a snapshot taken before figure predictions"),
    (lambda d: (d / "figure_slices.json").write_text("{"), "not readable JSON"),
    (lambda d: (d / "figure_slices.json").write_text(json.dumps({"ids": ["a"], "rows": [0]})), "needs ids, rows"),
    (lambda d: (d / "figure_probability.png").write_bytes(b"not a png"), "not a readable PNG"),
    (lambda d: (d / "figure_slices.json").write_text(json.dumps(
        {**json.loads((d / "figure_slices.json").read_text()), "height": 9})), "16 x 16 pixels, figure_slices.json says 18 x 16"),
])
def test_broken_predictions_are_one_clear_error(tmp_path, edit, needle):
    write_figure_predictions(_npz(tmp_path / "f.npz", np.zeros((2, 8, 16), np.float32)), tmp_path / "rows")
    edit(tmp_path / "rows")
    with pytest.raises(DataError) as info:
        read_figure_predictions(tmp_path / "rows")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_figure_slices_are_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        write_figure_predictions(tmp_path / "none.npz", tmp_path / "rows")
    np.savez(tmp_path / "f.npz", ids=np.array(["a"]), prob=np.zeros((1, 4, 4)))
    with pytest.raises(DataError, match=r"missing array\(s\) \['rows', 'threshold'\]"):
        write_figure_predictions(tmp_path / "f.npz", tmp_path / "rows")
    _npz(tmp_path / "g.npz", np.full((1, 4, 4), 1.5, np.float32))
    with pytest.raises(DataError, match=r"probabilities in \[0, 1\]"):
        write_figure_predictions(tmp_path / "g.npz", tmp_path / "rows")


def test_images_and_truth_come_back_from_a_store_of_the_same_data(store_dir, tmp_path):
    store = load_store(store_dir)
    test = store.indices("test")[:2]
    ids = [f"{store.table.at[r, 'case_id']}_{int(store.table.at[r, 'slice_index'])}" for r in test]
    image = np.stack([np.asarray(store.images[r]) for r in test])
    truth = np.stack([np.asarray(store.masks[r]) > 0 for r in test])
    prob = np.where(truth, 0.9, 0.05).astype(np.float32)
    write_figure_predictions(_npz(tmp_path / "f.npz", prob, ids=ids, image=image, truth=truth), tmp_path / "rows")
    back = figure_slices_from_store(read_figure_predictions(tmp_path / "rows"), store, tmp_path / "rows")
    assert back.ids == ids
    np.testing.assert_array_equal(back.image, image)
    np.testing.assert_array_equal(back.truth, truth)
    np.testing.assert_array_equal(back.prob > 0.5, truth)

    write_figure_predictions(_npz(tmp_path / "o.npz", prob, ids=[ids[0], "TCGA_ELSEWHERE_7"]), tmp_path / "other")
    with pytest.raises(DataError, match=r"\['TCGA_ELSEWHERE_7'\] are not in the manifest"):
        figure_slices_from_store(read_figure_predictions(tmp_path / "other"), store, tmp_path / "other")
    write_figure_predictions(_npz(tmp_path / "s.npz", prob[:, :64, :64], ids=ids), tmp_path / "small")
    with pytest.raises(DataError, match=r"probability maps of \(64, 64\) px"):
        figure_slices_from_store(read_figure_predictions(tmp_path / "small"), store, tmp_path / "small")

    sha = store_fingerprint(store.meta)
    assert sha
    def metrics(sha):
        return {"provenance": {"data": {"fingerprint": {"sha256": sha}}}}

    check_same_data(store.meta, store.root, metrics(sha), "here")
    check_same_data(store.meta, store.root, {}, "here")  # not recorded: the ids alone decide
    with pytest.raises(DataError, match="is of other data"):
        check_same_data(store.meta, store.root, metrics("0" * 64), "results/x/metrics/v.json")
