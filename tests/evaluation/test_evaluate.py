"""lggseg.evaluation.evaluate: inference, rows, seed aggregation and outputs, on a hand-made store.

The store is an in-memory object with the ``lggseg.data.store.Store`` interface and the models
are tiny deterministic torch modules whose predictions are known exactly, so the expected
metrics can be written down by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lggseg.config import EvaluateConfig, PostprocessConfig
from lggseg.errors import DataError
from lggseg.evaluation.evaluate import (
    PAPER_FIGURE_IDS,
    evaluate_loaded,
    jsonable,
    select_figure_rows,
    write_evaluation,
)
from lggseg.evaluation.metrics import SUMMARY_KEYS

S = 32  # native slice size of the fake store


class FakeStore:
    """The ``lggseg.data.store.Store`` interface over in-memory arrays."""

    def __init__(self, table, images, masks, attributes, attribute_names):
        self.table, self.images, self.masks = table, images, masks
        self.attributes, self.attribute_names = attributes, attribute_names

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.table["split"].to_numpy() == split)


def _block(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((S, S), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# (case, slice, split, truth, bright region = what the model predicts)
SLICES = [
    ("TCGA_AA_0001_20000101", 1, "train", _block(4, 12, 4, 12), _block(4, 12, 4, 12)),
    ("TCGA_BB_0002_20000101", 1, "test", _block(8, 16, 8, 16), _block(8, 16, 8, 16)),  # perfect
    ("TCGA_BB_0002_20000101", 2, "test", _block(8, 16, 8, 16), _block(8, 16, 8, 16) | _block(26, 28, 26, 28)),  # + 2x2 noise
    ("TCGA_BB_0002_20000101", 3, "test", np.zeros((S, S), bool), np.zeros((S, S), bool)),  # empty / empty
    ("TCGA_CC_0003_20000101", 1, "test", _block(0, 8, 0, 16), _block(0, 8, 0, 8)),  # half found
    ("TCGA_CC_0003_20000101", 2, "test", np.zeros((S, S), bool), _block(20, 24, 20, 24)),  # false positive 4x4
]
# Expected per-slice Dice of the test slices (raw), by hand.
RAW_DICE = [1.0, 2 * 64 / (64 + 68), 1.0, 2 * 64 / (128 + 64), 0.0]


def make_store(slices=SLICES, attribute_names=("attr:a=1", "attr:b=2", "attr:position")) -> FakeStore:
    rows = []
    images = np.zeros((len(slices), S, S, 3), dtype=np.uint8)
    masks = np.zeros((len(slices), S, S), dtype=np.uint8)
    for k, (case, idx, split, truth, bright) in enumerate(slices):
        images[k, ..., 0] = np.where(bright, 255, 0)
        masks[k] = truth
        rows.append(
            {"row": k, "case_id": case, "patient_id": case[:12], "slice_index": idx, "tumour_pixels": int(truth.sum()),
             "has_tumour": bool(truth.any()), "split": split}
        )
    attrs = np.arange(len(slices) * len(attribute_names), dtype=np.float32).reshape(len(slices), -1)
    return FakeStore(pd.DataFrame(rows), images, masks, attrs, list(attribute_names))


class BrightModel(torch.nn.Module):
    """Logits = +/-20 from the normalized red channel: predicts exactly the bright pixels.

    ``shift`` moves the prediction right by that many pixels (a worse "seed"); every attribute
    vector it receives is recorded.
    """

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift
        self.scale = torch.nn.Parameter(torch.tensor(20.0))
        self.seen: list[torch.Tensor] = []

    def forward(self, image, attributes=None):
        if attributes is not None:
            self.seen.append(attributes.detach().cpu().float())
        logits = torch.where(image[:, :1] > 0, self.scale, -self.scale)
        return torch.roll(logits, self.shift, dims=-1) if self.shift else logits


def _meta(names=None, image_size=S, attributes=True):
    """Model metadata as ``lggseg.models.load_model`` returns it (the keys evaluate reads)."""
    names = list(names or [])
    return {"image_size": image_size, "attribute_names": names, "n_attributes": len(names), "model_config": {"attributes": attributes}}


CFG = EvaluateConfig(threshold=0.5, batch_size=2, bootstrap_samples=200, bootstrap_seed=0, noise_side=3, connectivity=8)
POST = PostprocessConfig(min_area=5, connectivity=8)


def test_single_seed_rows_and_metrics_by_hand():
    store = make_store()
    model = BrightModel()
    res = evaluate_loaded({23: (model, _meta(attributes=False))}, store, CFG, POST, "cpu")
    raw = res.slices[~res.slices["postprocessed"]]
    pp = res.slices[res.slices["postprocessed"]]
    assert list(raw["row"]) == [1, 2, 3, 4, 5] and list(pp["row"]) == [1, 2, 3, 4, 5]
    assert set(res.slices["seed"]) == {23}
    assert raw["dice"].to_numpy() == pytest.approx(RAW_DICE)
    # noise: a component < 3*3 px touching no truth -> only the 2x2 blob (the 4x4 FP has 16 px).
    assert list(raw["noise_components"]) == [0, 1, 0, 0, 0]
    # post-processing (min_area 5) removes the 2x2 blob only.
    assert pp["dice"].to_numpy() == pytest.approx([1.0, 1.0, 1.0, 2 * 64 / 192, 0.0])

    m = res.metrics
    assert list(m)[: len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
    assert m["dice_slice_mean"] == pytest.approx(np.mean(RAW_DICE))
    assert m["dice_tumour_slices"] == pytest.approx(np.mean([RAW_DICE[0], RAW_DICE[1], RAW_DICE[3]]))
    # patient BB: inter 128, truth 128, pred 132; CC: inter 64, truth 128, pred 80
    assert m["dice_patient_3d"] == pytest.approx(np.mean([256 / 260, 128 / 208]))
    assert m["dice_micro"] == pytest.approx(2 * 192 / (256 + 212))
    assert m["empty_fp_rate"] == pytest.approx(0.5)
    assert m["hd95_n_undefined"] == 0
    assert (m["n_test_slices"], m["n_test_patients"]) == (5, 2)
    assert m["postprocessed"]["min_area"] == 5
    assert m["postprocessed"]["noise_components_per_slice"] == 0.0
    assert m["postprocessed"]["dice_slice_mean"] == pytest.approx(np.mean([1, 1, 1, 2 * 64 / 192, 0]))
    assert m["seeds"] == [23] and "per_seed" not in m and "seed_std" not in m
    json.dumps(m, allow_nan=False)

    pats = res.patients[~res.patients["postprocessed"]].set_index("patient_id")
    assert pats.loc["TCGA_CC_0003", "dice_3d"] == pytest.approx(128 / 208)


FINGERPRINT = {"n_files": 12, "total_bytes": 3456, "sha256": "ab" * 32}
TRAINED = {  # what lggseg.training.trainer writes into model.json
    "seed": 23, "epochs": 50, "epochs_done": 3, "epochs_planned": 3, "max_minutes": 30.0,
    "stop_reason": "time budget: train.max_minutes=30 fits 3 of 50 epochs at 600 s for the first",
    "best_epoch": 3, "best_val_dice": 0.8, "best_epoch_gamma": 0.0, "selection_rule": "last epoch: ...",
    "gamma_max": 0.5, "gamma_reached_full": False,
    "wall_seconds": 1800.5, "train_seconds": 1500.0, "device": "cuda", "world_size": 1, "pretrained": True,
    "hardware": {"device": "cuda", "device_name": "NVIDIA H200", "bf16_autocast": True, "precision": "bf16 autocast"},
    "software": {"torch": "2.14.1", "timm": "1.0.31", "segmentation_models_pytorch": "0.6.0"}, "fingerprint": "f" * 16,
}


def test_provenance_block_by_hand():
    store = make_store()
    store.meta = {"source": "kaggle", "fingerprint": FINGERPRINT, "split_unit": "patient", "split_seed": 23}
    res = evaluate_loaded({23: (BrightModel(), {**_meta(attributes=False), **TRAINED})}, store, CFG, POST, "cpu")
    prov = res.metrics["provenance"]
    assert prov["data"] == {
        "source": "kaggle", "fingerprint": FINGERPRINT, "split_unit": "patient", "n_slices": 6,
        "splits": {"train": {"patients": 1, "cases": 1, "slices": 1}, "val": {"patients": 0, "cases": 0, "slices": 0},
                   "test": {"patients": 2, "cases": 2, "slices": 5}},
    }
    assert prov["image_size"] == S and prov["seeds"] == {"train": [23], "split": 23, "bootstrap": 0}
    train = prov["training"]["23"]
    assert train == {"image_size": S, **{k: TRAINED[k] for k in train if k != "image_size"}}
    assert set(train) >= {"epochs_planned", "epochs_done", "stop_reason", "pretrained", "hardware", "software",
                          "wall_seconds", "best_epoch_gamma", "selection_rule", "gamma_max", "gamma_reached_full"}
    assert prov["evaluation"]["device"] == "cpu" and prov["evaluation"]["software"]["torch"] == torch.__version__
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    assert prov["project"] == {"commit": prov["git_commit"], "uncommitted_changes": None, "workspace": False}
    json.dumps(res.metrics, allow_nan=False)


def test_provenance_of_a_model_saved_before_the_new_keys(tmp_path):
    """Older model dirs: model.json without the training facts, result.json with some; defaults fill the rest."""
    (tmp_path / "result.json").write_text(json.dumps({"device": "cpu", "epochs": 8, "wall_seconds": 1260.0}))
    meta = {**_meta(image_size=16, attributes=False), "epochs": 8, "run_config": {"model": {"pretrained": False}},
            "model_dir": str(tmp_path)}
    models = {1: (BrightModel(), meta), 2: (BrightModel(), _meta(image_size=32, attributes=False))}
    prov = evaluate_loaded(models, make_store(), CFG, POST, "cpu").metrics["provenance"]
    old = prov["training"]["1"]
    assert (old["device"], old["wall_seconds"], old["pretrained"]) == ("cpu", 1260.0, False)
    assert (old["epochs_planned"], old["epochs_done"], old["stop_reason"]) == (8, 8, "completed")
    assert old["hardware"] is None and old["selection_rule"] is None
    assert prov["training"]["2"]["stop_reason"] is None  # nothing known, nothing invented
    assert prov["image_size"] == [16, 32]  # two seeds at two sizes: both listed
    assert prov["data"]["source"] is None and prov["data"]["fingerprint"] is None  # a store without store.json facts
    assert "val_dice_by_epoch" not in old  # no history recorded: nothing invented


def test_provenance_keeps_the_validation_curve(tmp_path):
    history = [{"epoch": e, "train/loss": 1.0, "val/dice": d} for e, d in enumerate((0.61, 0.7, 0.75), start=1)]
    (tmp_path / "result.json").write_text(json.dumps({"history": history}))
    meta = {**_meta(attributes=False), **TRAINED, "model_dir": str(tmp_path)}
    prov = evaluate_loaded({23: (BrightModel(), meta)}, make_store(), CFG, POST, "cpu").metrics["provenance"]
    assert prov["training"]["23"]["val_dice_by_epoch"] == [0.61, 0.7, 0.75]


def test_no_postprocessing_block_when_disabled():
    res = evaluate_loaded({1: (BrightModel(), _meta(attributes=False))}, make_store(), CFG, PostprocessConfig(min_area=0), "cpu")
    assert "postprocessed" not in res.metrics
    assert not res.slices["postprocessed"].any()


def test_several_seeds_are_averaged():
    store = make_store()
    models = {1: (BrightModel(), _meta(attributes=False)), 2: (BrightModel(shift=4), _meta(attributes=False))}
    res = evaluate_loaded(models, store, CFG, POST, "cpu")
    m = res.metrics
    per = m["per_seed"]
    assert m["seeds"] == [1, 2] and set(per) == {"1", "2"}
    for key in ("dice_slice_mean", "dice_patient_3d", "dice_micro", "iou_slice_mean"):
        assert m[key] == pytest.approx((per["1"][key] + per["2"][key]) / 2)
        assert m["seed_std"][key] == pytest.approx(abs(per["1"][key] - per["2"][key]) / math.sqrt(2))
    assert per["1"]["dice_slice_mean"] > per["2"]["dice_slice_mean"]
    lo, hi = m["dice_slice_mean_ci95"]
    assert lo <= m["dice_slice_mean"] <= hi
    assert "seed_std" in m["postprocessed"] and "postprocessed" in per["2"]
    assert sorted(set(res.slices["seed"])) == [1, 2] and len(res.slices) == 2 * 2 * 5


def test_attributes_follow_the_model_order():
    store = make_store()
    model = BrightModel()
    order = ["attr:position", "attr:a=1"]  # a subset, in another order than the store's
    evaluate_loaded({1: (model, _meta(order))}, store, CFG, POST, "cpu")
    seen = torch.cat(model.seen).numpy()
    expected = np.asarray(store.attributes)[[1, 2, 3, 4, 5]][:, [2, 0]]
    assert np.array_equal(seen, expected)


def test_missing_attribute_is_a_data_error():
    with pytest.raises(DataError, match="attr:c=3"):
        evaluate_loaded({1: (BrightModel(), _meta(["attr:a=1", "attr:c=3"]))}, make_store(), CFG, POST, "cpu")


def test_attribute_count_mismatch_is_a_model_error():
    from lggseg.errors import ModelError

    meta = {**_meta(["attr:a=1"]), "n_attributes": 2}
    with pytest.raises(ModelError, match="1 attribute names for 2"):
        evaluate_loaded({1: (BrightModel(), meta)}, make_store(), CFG, POST, "cpu")


def test_model_at_lower_resolution_is_scored_at_native_resolution():
    store = make_store()
    res = evaluate_loaded({1: (BrightModel(), _meta(image_size=16, attributes=False))}, store, CFG, POST, "cpu")
    raw = res.slices[~res.slices["postprocessed"]]
    # 8-pixel blocks on even coordinates survive a 2x down/up-sampling up to their border.
    assert raw["truth_pixels"].tolist() == [64, 64, 0, 128, 0]
    assert raw["dice"].iloc[0] > 0.85
    assert res.figures["prob"].shape[1:] == (S, S)


# ----------------------------------------------------------------------------- figure slices


def _table(sizes, ids=None):
    rows = []
    for k, size in enumerate(sizes):
        case, idx = (ids[k].rsplit("_", 1) if ids and k < len(ids) else (f"TCGA_XX_{k:04d}_20000101", "1"))
        rows.append({"row": k, "case_id": case, "slice_index": int(idx), "tumour_pixels": size})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("sizes", "paper_ids", "expected_sizes", "how"),
    [
        # 10 tumour slices of sizes 1..10: interior quantile positions round(linspace(0, 9, 7)[1:-1])
        # = round([1.5, 3, 4.5, 6, 7.5]) = [2, 3, 4, 6, 8] (half to even) -> sizes 3, 4, 5, 7, 9.
        (list(range(1, 11)), [], [3, 4, 5, 7, 9], "quantile"),
        # Empty slices are never picked by the quantile rule while tumour slices remain.
        ([0, 0, 5, 0, 6, 7, 8, 9, 10, 11], [], [6, 7, 8, 9, 10], "quantile"),
        # Fewer tumour slices than needed: all of them, then other slices in store order.
        ([0, 3, 0, 4], [], [3, 4, 0, 0], "quantile"),
    ],
)
def test_select_figure_rows_quantile_rule(sizes, paper_ids, expected_sizes, how):
    table = _table(sizes)
    rows, got_how = select_figure_rows(table, np.arange(len(table)))
    assert table.loc[rows, "tumour_pixels"].tolist() == expected_sizes
    assert got_how == how and len(set(rows)) == len(rows)


def test_select_figure_rows_prefers_paper_ids_in_the_test_split():
    ids = [PAPER_FIGURE_IDS[2], PAPER_FIGURE_IDS[0], PAPER_FIGURE_IDS[1]]
    table = _table([50, 60, 70, 1, 2, 3, 4, 5, 6], ids)
    test_rows = np.array([0, 1, 3, 4, 5, 6, 7, 8])  # row 2 (paper id 1) is not a test slice
    rows, how = select_figure_rows(table, test_rows)
    assert rows[:2] == [1, 0]  # in the paper's order
    assert 2 not in rows and how == "paper+quantile" and len(rows) == 5


# ----------------------------------------------------------------------------- outputs


def test_write_evaluation_outputs_are_readable(tmp_path):
    from lggseg.reporting.results import load_figure_slices, load_metrics

    res = evaluate_loaded({1: (BrightModel(), _meta(attributes=False))}, make_store(), CFG, POST, "cpu")
    write_evaluation(res, tmp_path / "metrics" / "v.json", tmp_path / "eval" / "v")
    text = (tmp_path / "metrics" / "v.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    load_metrics(tmp_path / "metrics" / "v.json")
    slices = pd.read_csv(tmp_path / "eval" / "v" / "slices.csv")
    assert len(slices) == 10 and {"seed", "postprocessed", "dice", "hd95", "noise_components"} <= set(slices.columns)
    assert len(pd.read_csv(tmp_path / "eval" / "v" / "patients.csv")) == 4
    fig = load_figure_slices(tmp_path / "eval" / "v" / "figure_slices.npz")
    with np.load(tmp_path / "eval" / "v" / "figure_slices.npz") as z:
        assert z["prob"].dtype == np.float16 and z["image"].dtype == np.uint8
        assert str(z["selection"]) == "quantile"
    assert len(fig.ids) == 5 and fig.prob.shape == (5, S, S)
    # The probability saved for a figure slice is the one that was scored.
    k = fig.ids.index("TCGA_CC_0003_20000101_1")
    assert np.array_equal(fig.prob[k] > 0.5, SLICES[4][4])


def test_jsonable_replaces_nan():
    out = jsonable({"a": np.float32("nan"), "b": [np.int64(3), math.inf], "c": np.array([1.5, np.nan])})
    assert out == {"a": None, "b": [3, None], "c": [1.5, None]}


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_stage_on_a_demo_store_with_a_saved_model(tmp_path):
    """stages/evaluate.py on a 3-case demo store and a random-weight DeepLabv3+ saved by lggseg.models."""
    import importlib.util
    from pathlib import Path

    from lggseg.config import CommonConfig, ManifestConfig, ModelConfig
    from lggseg.data.manifest import build_manifest
    from lggseg.data.store import load_store
    from lggseg.data.synthetic import generate_demo
    from lggseg.models import build_model, save_model
    from lggseg.reporting.results import load_metrics

    raw = generate_demo(tmp_path / "raw", n_cases=3, seed=0)
    build_manifest(raw, tmp_path / "manifest", CommonConfig(image_size=64), ManifestConfig(split_fractions=(0.34, 0.33, 0.33)))
    store = load_store(tmp_path / "manifest")
    torch.manual_seed(0)
    for seed in (3, 4):
        model = build_model(ModelConfig(encoder="resnet18", pretrained=False), len(store.attribute_names), image_size=64)
        save_model(model, tmp_path / "models" / f"seed_{seed}", {"attribute_names": store.attribute_names, "seed": seed})
    (tmp_path / "params.yaml").write_text(
        "common: {device: cpu}\nevaluate: {batch_size: 8, bootstrap_samples: 100}\npostprocess: {min_area: 49}\n"
    )
    # Loaded under its own name: "evaluate" alone could clash with another installed package.
    spec = importlib.util.spec_from_file_location("stage_evaluate", Path(__file__).resolve().parents[2] / "stages" / "evaluate.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    rc = stage.main([
        "--params", str(tmp_path / "params.yaml"), "--variant", "v", "--models", str(tmp_path / "models"),
        "--data", str(tmp_path / "manifest"), "--metrics", str(tmp_path / "metrics" / "v.json"), "--rows", str(tmp_path / "eval"),
    ])
    assert rc == 0
    m = load_metrics(tmp_path / "metrics" / "v.json")
    n_test = len(store.indices("test"))
    assert m["seeds"] == [3, 4] and m["n_test_slices"] == n_test and set(m["per_seed"]) == {"3", "4"}
    for seed in (3, 4):  # each model's card now carries its own test numbers (lggseg.models.card)
        card = (tmp_path / "models" / f"seed_{seed}" / "MODEL_CARD.md").read_text()
        assert f"numbers of seed {seed}" in card and "Not evaluated yet" not in card
    slices = pd.read_csv(tmp_path / "eval" / "slices.csv")
    assert len(slices) == 2 * 2 * n_test
    with np.load(tmp_path / "eval" / "figure_slices.npz") as z:
        assert z["prob"].shape == (5, 256, 256) and z["truth"].shape == (5, 256, 256)

    # A missing manifest is a one-line user error with exit status 2.
    rc = stage.main([
        "--params", str(tmp_path / "params.yaml"), "--variant", "v", "--models", str(tmp_path / "models"),
        "--data", str(tmp_path / "nowhere"), "--metrics", str(tmp_path / "m2.json"), "--rows", str(tmp_path / "e2"),
    ])
    assert rc == 2 and not (tmp_path / "m2.json").exists()


def test_another_split_is_scored_on_request():
    res = evaluate_loaded({23: (BrightModel(), _meta(attributes=False))}, make_store(), CFG, POST, "cpu", split="train")
    assert list(res.slices[~res.slices["postprocessed"]]["row"]) == [0]
    assert res.metrics["dice_slice_mean"] == 1.0 and res.metrics["n_test_slices"] == 1
    assert res.metrics["split"] == "train"  # the keys keep their test names; this says which split it was


def test_an_unknown_or_empty_split_is_refused():
    from lggseg.config import ConfigError

    with pytest.raises(ConfigError, match="split"):
        evaluate_loaded({23: (BrightModel(), _meta(attributes=False))}, make_store(), CFG, POST, "cpu", split="holdout")
    with pytest.raises(DataError, match="no val slices"):
        evaluate_loaded({23: (BrightModel(), _meta(attributes=False))}, make_store(), CFG, POST, "cpu", split="val")


def test_tta_averages_the_flipped_views():
    import dataclasses

    store = make_store()
    tta = dataclasses.replace(CFG, tta=True)
    # a per-pixel model gives the same masks with and without flips
    same = evaluate_loaded({23: (BrightModel(), _meta(attributes=False))}, store, tta, POST, "cpu")
    assert same.metrics["tta"] is True
    assert same.slices["dice"].to_numpy() == pytest.approx(
        evaluate_loaded({23: (BrightModel(), _meta(attributes=False))}, store, CFG, POST, "cpu").slices["dice"].to_numpy())
    # A model that shifts its output down and right by 4: the flipped views shift it up/right and
    # down/left instead, so only pixels covered by two of the three shifted copies keep p >= 2/3.
    class Diagonal(BrightModel):
        def forward(self, image, attributes=None):
            return torch.roll(super().forward(image, attributes), (4, 4), dims=(-2, -1))

    plain = evaluate_loaded({23: (Diagonal(), _meta(attributes=False))}, store, CFG, POST, "cpu")
    flipped = evaluate_loaded({23: (Diagonal(), _meta(attributes=False))}, store, tta, POST, "cpu")
    assert plain.metrics["tta"] is False
    raw = ~flipped.slices["postprocessed"]
    assert (flipped.slices[raw]["pred_pixels"].to_numpy() < plain.slices[raw]["pred_pixels"].to_numpy()).any()


def test_largest_3d_postprocessing_by_hand():
    """Per case, only the largest 3D region stays: BB loses its 2x2 blob (slice 2), CC its 4x4 false
    positive (slice 2, 16 px, apart from the 64-px region of slice 1)."""
    post = PostprocessConfig(min_area=0, largest_3d=True)
    res = evaluate_loaded({23: (BrightModel(), _meta(attributes=False))}, make_store(), CFG, post, "cpu")
    pp = res.slices[res.slices["postprocessed"]]
    assert list(pp["row"]) == [1, 2, 3, 4, 5]
    assert pp["dice"].to_numpy() == pytest.approx([1.0, 1.0, 1.0, 2 * 64 / 192, 1.0])
    assert res.metrics["postprocessed"]["empty_fp_rate"] == 0.0
    assert res.metrics["postprocessed"]["largest_3d"] is True and res.metrics["postprocessed"]["min_area"] == 0
    raw = res.slices[~res.slices["postprocessed"]]
    assert raw["dice"].to_numpy() == pytest.approx(RAW_DICE)
