"""lggseg predict: the shared inference step, attribute encoding, outputs by hand, and equality
with the evaluate stage's per-slice Dice on the same test slices.

Hand-checkable tests use tiny torch modules whose outputs are known exactly (``BrightModel``
predicts the pixels whose red channel is bright); the evaluate-equivalence test uses a real
DeepLabv3+ with the attribute encoder (timm's 0.1M-parameter ``test_efficientnet``) at 64 px.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import lggseg.models
from lggseg.config import CommonConfig, EvaluateConfig, ManifestConfig, ModelConfig, PostprocessConfig
from lggseg.data.dataset import SliceDataset
from lggseg.data.inputs import AttributeLookup
from lggseg.data.manifest import build_manifest, encode_attributes, read_clinical
from lggseg.data.store import load_store
from lggseg.errors import DataError, ModelError
from lggseg.models import build_model, save_model
from lggseg.predict import PredictOptions, infer_probabilities, main, preprocess, resolve_model_dir

SIZE = 256
TINY = {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 16, "attribute_hidden": 8}


# --------------------------------------------------------------------------- helpers shared with test_robustness


def attribute_names(raw: Path, position: bool = True) -> list[str]:
    """The attribute names the manifest would give a model trained on ``raw`` (a kaggle_3m folder)."""
    names, _ = encode_attributes(read_clinical(raw / "data.csv"), CommonConfig().attribute_columns, raw / "data.csv")
    return names + (["attr:position"] if position else [])


def save_tiny_model(out: Path, names: list[str], attributes: bool = True, image_size: int = 64, seed: int = 0) -> Path:
    """A randomly initialised tiny DeepLabv3+ saved like training does (``model.safetensors`` + ``model.json``)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(attributes=attributes, **TINY), len(names), image_size)
    meta = {"attribute_names": names, "n_attributes": len(names), "image_size": image_size, "run_config": {}}
    save_model(model, out, meta)
    return out


def copy_case(src: Path, dest_root: Path, n: int | None = None, masks: bool = True) -> Path:
    """Slices 1..n of case folder ``src`` (all by default) as a case folder of the same name under ``dest_root``."""
    dest = dest_root / src.name
    dest.mkdir(parents=True)
    total = len(list(src.glob("*_mask.tif")))
    for k in range(1, (n or total) + 1):
        shutil.copy(src / f"{src.name}_{k}.tif", dest)
        if masks:
            shutil.copy(src / f"{src.name}_{k}_mask.tif", dest)
    return dest


def tree_state(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) -> content: compares a folder before and after."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class BrightModel(torch.nn.Module):
    """Logits +20 where the normalised red channel is above the value of red 128, else -20.

    Records the attribute batches it receives and counts its forward calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.calls = 0
        self.cut = (128 / 255 - 0.485) / 0.229

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if attributes is not None:
            self.seen.append(attributes.detach().cpu())
        return torch.where(image[:, :1] > self.cut, 20.0, -20.0)


def fake_model_dir(tmp_path: Path, monkeypatch, model: torch.nn.Module, names: list[str] | None = None, image_size: int = 64) -> Path:
    """A model dir served by ``model`` (load_model/read_meta patched): exact, hand-checkable predictions."""
    d = tmp_path / "fake_model"
    d.mkdir()
    meta = {
        "model_config": {"attributes": bool(names)},
        "n_attributes": len(names or []),
        "attribute_names": list(names or []),
        "image_size": image_size,
    }
    (d / "model.json").write_text(json.dumps(meta))
    monkeypatch.setattr(lggseg.models, "read_meta", lambda _d: dict(meta))
    monkeypatch.setattr(lggseg.models, "load_model", lambda _d, device="cpu": (model.to(device).eval(), dict(meta)))
    return d


def square(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def write_case(root: Path, name: str, slices: list[tuple[np.ndarray, np.ndarray | None]]) -> Path:
    """A case folder of (bright region, truth mask or None) slices: red 255 in the bright region, 40 elsewhere."""
    case = root / name
    case.mkdir(parents=True)
    for k, (bright, truth) in enumerate(slices, start=1):
        image = np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)
        image[bright, 0] = 255
        Image.fromarray(image).save(case / f"{name}_{k}.tif")
        if truth is not None:
            Image.fromarray(truth.astype(np.uint8) * 255).save(case / f"{name}_{k}_mask.tif")
    return case


# --------------------------------------------------------------------------- infer_probabilities


class RampModel(torch.nn.Module):
    """Logits = column index - (W-1)/2 whatever the input: not flip-equivariant, so TTA changes it."""

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = image.shape
        ramp = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
        return ramp.expand(b, 1, h, w).clone()


def test_tta_averages_identity_and_flipped_views():
    image = torch.zeros(2, 3, 4, 6)
    ramp = torch.arange(6, dtype=torch.float32) - 2.5
    plain = infer_probabilities(RampModel(), image)
    tta = infer_probabilities(RampModel(), image, tta=True)
    assert plain.shape == tta.shape == (2, 4, 6)
    assert torch.allclose(plain, torch.sigmoid(ramp).expand(2, 4, 6))
    # identity: s(r); h-flip view flipped back: s(-r); v-flip view: s(r)  ->  (2 s(r) + 1 - s(r)) / 3
    assert torch.allclose(tta, ((1 + torch.sigmoid(ramp)) / 3).expand(2, 4, 6))


def test_tta_is_a_no_op_for_a_pointwise_model():
    image = torch.randn(3, 3, 8, 8)
    model = BrightModel()
    assert torch.equal(infer_probabilities(model, image), infer_probabilities(model, image, tta=True))
    assert model.calls == 1 + 3


@pytest.mark.parametrize(("size", "out_size"), [((8, 8), (16, 16)), ((8, 8), (8, 8)), ((16, 16), (256, 256))])
def test_probabilities_are_upsampled_to_the_native_size(size, out_size):
    class Const(torch.nn.Module):
        def forward(self, image, attributes=None):
            return torch.full((image.shape[0], 1, *image.shape[-2:]), 2.0)

    prob = infer_probabilities(Const(), torch.zeros(2, 3, *size), out_size=out_size)
    assert prob.shape == (2, *out_size) and prob.dtype == torch.float32
    assert torch.allclose(prob, torch.sigmoid(torch.tensor(2.0)))


def test_attributes_reach_the_model():
    model = BrightModel()
    attrs = torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, 0.75]])
    infer_probabilities(model, torch.zeros(2, 3, 8, 8), attrs)
    assert torch.equal(model.seen[0], attrs)


def test_preprocess_matches_the_dataset_in_evaluation_mode():
    class OneSlice:
        images = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
        masks = np.zeros((1, SIZE, SIZE), np.uint8)
        attributes = np.zeros((1, 2), np.float32)

    for size in (64, 96, 256):
        item = SliceDataset(OneSlice(), [0], size, augment=None)[0]["image"].numpy()
        assert np.array_equal(preprocess(OneSlice.images[0], size), item)


# --------------------------------------------------------------------------- attribute encoding

NAMES = ["attr:A=1", "attr:A=2", "attr:A=missing", "attr:B=1", "attr:B=missing", "attr:position"]
CSV = "Patient,A,B,C\nTCGA_AA_0001,2,1,x\nTCGA_AA_0002,,1,x\nTCGA_AA_0003,NA,,x\nTCGA_AA_0004,1.0,1,x\n"


@pytest.mark.parametrize(
    ("patient", "expected"),
    [
        ("TCGA_AA_0001", [0, 1, 0, 1, 0, 0]),
        ("TCGA_AA_0002", [0, 0, 1, 1, 0, 0]),  # empty cell -> missing
        ("TCGA_AA_0003", [0, 0, 1, 0, 1, 0]),  # NA and empty -> missing
        ("TCGA_AA_0004", [1, 0, 0, 1, 0, 0]),  # "1.0" is category 1
    ],
)
def test_attribute_vector_by_hand(tmp_path, patient, expected):
    (tmp_path / "data.csv").write_text(CSV)
    enc = AttributeLookup(NAMES, tmp_path / "data.csv", False, tmp_path)
    vec, found = enc.patient_vector(patient, patient + "_20000101")
    assert found and vec.tolist() == expected


def test_position_is_that_of_the_manifest(tmp_path):
    (tmp_path / "data.csv").write_text(CSV)
    enc = AttributeLookup(NAMES, tmp_path / "data.csv", False, tmp_path)
    from lggseg.data.inputs import SliceInput

    base, _ = enc.patient_vector("TCGA_AA_0001", "c")
    for k, n, pos in ((1, 5, 0.0), (3, 5, 0.5), (5, 5, 1.0), (1, 1, 0.0)):
        item = SliceInput("c", "TCGA_AA_0001", k, n, Path("x.tif"), None, "")
        assert enc.slice_vector(base, item)[-1] == pos
    lone = SliceInput("c", None, None, None, Path("x.png"), None, "")
    with pytest.raises(DataError, match="position"):
        enc.slice_vector(base, lone)
    assert AttributeLookup(NAMES, None, True, tmp_path).slice_vector(base, lone)[-1] == 0.5


def test_missing_patient_fails_or_uses_the_missing_category(tmp_path):
    (tmp_path / "data.csv").write_text(CSV)
    with pytest.raises(DataError, match=r"data.csv: no row for patient TCGA_ZZ_9999 .*--allow-missing-attributes"):
        AttributeLookup(NAMES, tmp_path / "data.csv", False, tmp_path).patient_vector("TCGA_ZZ_9999", "c")
    vec, found = AttributeLookup(NAMES, tmp_path / "data.csv", True, tmp_path).patient_vector("TCGA_ZZ_9999", "c")
    assert not found and vec.tolist() == [0, 0, 1, 0, 1, 0]
    with pytest.raises(DataError, match="--attributes"):
        AttributeLookup(NAMES, None, False, tmp_path).patient_vector("TCGA_AA_0001", "c")


@pytest.mark.parametrize(("value", "needle"), [("3", "never saw"), ("abc", "not a number"), ("-1", "non-negative"), ("1.5", "non-negative")])
def test_bad_or_unseen_cluster_values(tmp_path, value, needle):
    (tmp_path / "data.csv").write_text(CSV.replace("TCGA_AA_0001,2,1", f"TCGA_AA_0001,{value},1"))
    with pytest.raises(DataError, match=needle):
        AttributeLookup(NAMES, tmp_path / "data.csv", False, tmp_path).patient_vector("TCGA_AA_0001", "c")


# --------------------------------------------------------------------------- model directories


def test_model_dir_resolution(tmp_path):
    one = tmp_path / "one"
    (one / "seed_7").mkdir(parents=True)
    (one / "seed_7" / "model.json").write_text("{}")
    assert resolve_model_dir(one) == one / "seed_7"
    assert resolve_model_dir(one / "seed_7") == one / "seed_7"
    two = tmp_path / "two"
    for s in (1, 2):
        (two / f"seed_{s}").mkdir(parents=True)
        (two / f"seed_{s}" / "model.json").write_text("{}")
    with pytest.raises(ModelError, match=r"seeds \[1, 2\]; choose one with --seed"):
        resolve_model_dir(two)
    assert resolve_model_dir(two, 2) == two / "seed_2"
    with pytest.raises(ModelError, match="no model for seed 3"):
        resolve_model_dir(two, 3)
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_model_dir(tmp_path)


# --------------------------------------------------------------------------- outputs, by hand

CASE = "TCGA_AA_0001_20000101"
# (bright region = what BrightModel predicts, truth)
HAND = [
    (square(10, 30, 10, 30), square(10, 30, 10, 30)),  # perfect: 400 px
    (square(10, 30, 10, 30) | square(100, 102, 100, 102), square(10, 30, 10, 20)),  # 404 predicted, 200 truth inside
    (np.zeros((SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool)),  # empty / empty
]


def test_outputs_and_summary_by_hand(tmp_path, monkeypatch):
    case = write_case(tmp_path / "in", CASE, HAND)
    model_dir = fake_model_dir(tmp_path, monkeypatch, BrightModel(), image_size=SIZE)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--input", str(case), "--output", str(out), "--device", "cpu", "--batch-size", "2"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["slice_index"].tolist() == [1, 2, 3]
    assert summary["position"].tolist() == [0.0, 0.5, 1.0]
    assert summary["pred_pixels"].tolist() == [400, 404, 0]
    assert summary["truth_pixels"].tolist() == [400, 200, 0]
    assert summary["dice"].tolist() == pytest.approx([1.0, 2 * 200 / 604, 1.0])
    assert set(summary["case_volume_pixels"]) == {804}
    assert summary["case_dice_3d"].tolist() == pytest.approx([2 * 600 / 1404] * 3)
    cases = pd.read_csv(out / "cases.csv")
    assert cases.to_dict("records")[0] == {
        "case_id": CASE, "patient_id": "TCGA_AA_0001", "n_slices": 3, "volume_pixels": 804, "truth_volume_pixels": 600,
        "dice_3d": pytest.approx(2 * 600 / 1404), "dice_slice_mean": pytest.approx((2 + 400 / 604) / 3),
    }
    for k, (bright, _) in enumerate(HAND, start=1):
        stem = out / CASE / f"{CASE}_{k}"
        pred = np.asarray(Image.open(f"{stem}_pred.png"))
        assert pred.dtype == np.uint8 and np.array_equal(pred, bright.astype(np.uint8) * 255)
        prob = np.asarray(Image.open(f"{stem}_prob.png"))
        assert np.array_equal(prob, bright.astype(np.uint8) * 255)  # sigmoid(+-20) -> 255 / 0
        over = np.asarray(Image.open(f"{stem}_overlay.png"))
        assert over.shape == (SIZE, SIZE, 3)
    over = np.asarray(Image.open(out / CASE / f"{CASE}_2_overlay.png"))
    assert tuple(over[10, 25]) == (0, 255, 0)  # top edge of the prediction, not of the truth (cols 10-19)
    assert tuple(over[29, 15]) == (0, 255, 0)  # shared bottom edge: prediction drawn on top
    assert tuple(over[20, 19]) == (255, 0, 0)  # right edge of the truth, inside the prediction
    assert tuple(over[20, 25]) == (255, 40, 40)  # inside the prediction: the slice itself
    info = json.loads((out / "predict.json").read_text())
    assert info["n_slices"] == 3 and info["tta"] is False and info["uses_attributes"] is False


def test_postprocessing_removes_small_regions(tmp_path, monkeypatch):
    case = write_case(tmp_path / "in", CASE, HAND)
    model_dir = fake_model_dir(tmp_path, monkeypatch, BrightModel(), image_size=SIZE)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--input", str(case), "--output", str(out), "--postprocess-min-area", "5"]
    assert main(args) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["pred_pixels"].tolist() == [400, 400, 0]  # the 2x2 blob is gone
    assert summary["dice"].tolist() == pytest.approx([1.0, 2 * 200 / 600, 1.0])


def test_largest_3d_keeps_each_cases_main_region(tmp_path, monkeypatch):
    """Slices 1-2 hold the 20x20 region (one 3D region); slice 2's 2x2 blob and slice 3's 3x3 island
    (far away in-plane) are other regions and go, whatever their size relative to min_area."""
    slices = [*HAND[:2], (square(200, 203, 200, 203), np.zeros((SIZE, SIZE), bool))]
    case = write_case(tmp_path / "in", CASE, slices)
    model_dir = fake_model_dir(tmp_path, monkeypatch, BrightModel(), image_size=SIZE)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--input", str(case), "--output", str(out), "--largest-3d"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["pred_pixels"].tolist() == [400, 400, 0]
    assert summary["dice"].tolist() == pytest.approx([1.0, 2 * 200 / 600, 1.0])
    info = json.loads((out / "predict.json").read_text())
    assert info["postprocess_largest_3d"] is True and info["postprocess_min_area"] == 0


def test_case_without_masks_and_tta(tmp_path, monkeypatch):
    case = write_case(tmp_path / "in", CASE, [(b, None) for b, _ in HAND])
    model = BrightModel()
    model_dir = fake_model_dir(tmp_path, monkeypatch, model, image_size=SIZE)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--input", str(case), "--output", str(out), "--tta", "--batch-size", "8"]) == 0
    assert model.calls == 3  # one batch, three views
    summary = pd.read_csv(out / "summary.csv")
    assert summary["pred_pixels"].tolist() == [400, 404, 0]
    assert summary["dice"].isna().all() and summary["truth_pixels"].isna().all()
    assert pd.read_csv(out / "cases.csv")["dice_3d"].isna().all()
    over = np.asarray(Image.open(out / CASE / f"{CASE}_2_overlay.png"))
    assert not np.any(np.all(over == (255, 0, 0), axis=-1))  # no truth contour without a mask


def test_single_slices_and_folder_of_cases(tmp_path, monkeypatch):
    root = tmp_path / "kaggle_3m"
    write_case(root, CASE, HAND)
    write_case(root, "TCGA_BB_0002_20000101", HAND[:2])
    (root / "data.csv").write_text("Patient,A\nTCGA_AA_0001,1\nTCGA_BB_0002,2\n")
    names = ["attr:A=1", "attr:A=2", "attr:A=missing", "attr:position"]
    model = BrightModel()
    model_dir = fake_model_dir(tmp_path, monkeypatch, model, names=names, image_size=SIZE)

    # a folder of cases: attributes from its data.csv, in the model's order
    assert main(["--model", str(model_dir), "--input", str(root), "--output", str(tmp_path / "all")]) == 0
    summary = pd.read_csv(tmp_path / "all" / "summary.csv")
    assert summary["case_id"].tolist() == [CASE] * 3 + ["TCGA_BB_0002_20000101"] * 2
    seen = torch.cat(model.seen).tolist()
    assert seen == [[1, 0, 0, 0.0], [1, 0, 0, 0.5], [1, 0, 0, 1.0], [0, 1, 0, 0.0], [0, 1, 0, 1.0]]
    assert (tmp_path / "all" / "TCGA_BB_0002_20000101" / "TCGA_BB_0002_20000101_2_pred.png").is_file()

    # one slice of a case folder: position from the case, outputs at the top of DIR
    model.seen.clear()
    one = tmp_path / "one"
    assert main(["--model", str(model_dir), "--input", str(root / CASE / f"{CASE}_2.tif"), "--output", str(one)]) == 0
    assert sorted(p.name for p in one.iterdir()) == sorted(
        [f"{CASE}_2_pred.png", f"{CASE}_2_prob.png", f"{CASE}_2_overlay.png", "summary.csv", "cases.csv", "predict.json"]
    )
    assert torch.cat(model.seen).tolist() == [[1, 0, 0, 0.5]]
    assert pd.read_csv(one / "summary.csv")["dice"].tolist() == pytest.approx([400 / 604])

    # a lone PNG slice: position unknown -> refused, unless --allow-missing-attributes
    lone = tmp_path / "lone"
    lone.mkdir()
    Image.open(root / CASE / f"{CASE}_1.tif").save(lone / "scan.png")
    args = ["--model", str(model_dir), "--input", str(lone / "scan.png"), "--output", str(tmp_path / "o3")]
    assert main(args) == 2
    model.seen.clear()
    assert main([*args, "--allow-missing-attributes"]) == 0
    assert torch.cat(model.seen).tolist() == [[0, 0, 1, 0.5]]
    assert pd.read_csv(tmp_path / "o3" / "summary.csv")["dice"].isna().all()


def test_previous_output_is_replaced_and_foreign_folders_are_refused(tmp_path, monkeypatch, capsys):
    case = write_case(tmp_path / "in", CASE, HAND[:1])
    model_dir = fake_model_dir(tmp_path, monkeypatch, BrightModel(), image_size=SIZE)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--input", str(case), "--output", str(out)]
    assert main(args) == 0
    (out / "stale.txt").write_text("from an older run")
    assert main(args) == 0
    assert not (out / "stale.txt").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["--model", str(model_dir), "--input", str(case), "--output", str(foreign)]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_options_are_validated():
    for bad in ({"threshold": 1.0}, {"threshold": 0}, {"batch_size": 0}, {"min_area": -1}, {"device": "tpu"}):
        with pytest.raises(ValueError):
            PredictOptions(**bad)


# --------------------------------------------------------------------------- same numbers as the evaluate stage


@pytest.fixture(scope="module")
def store_and_model(demo_kaggle_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_eval")
    build_manifest(demo_kaggle_dir, root / "store", CommonConfig(image_size=64), ManifestConfig())
    store = load_store(root / "store")
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), len(store.attribute_names), 64).eval()
    # Random weights give a near-constant output; centre and stretch the logits so the threshold
    # cuts through the middle and the masks depend on the image (a real test of equality).
    test = SliceDataset(store, store.indices("test"), 64, None)
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    a = torch.stack([test[i]["attributes"] for i in range(len(test))])
    with torch.no_grad():
        median = model(x, a).median()
        conv = model.segmentation_head[0]
        conv.weight.mul_(100.0)
        conv.bias.sub_(median).mul_(100.0)
    meta = {"attribute_names": store.attribute_names, "n_attributes": len(store.attribute_names), "image_size": 64, "run_config": {}}
    save_model(model, root / "models" / "seed_23", meta)
    return store, root / "models"


@pytest.mark.slow
def test_predict_dice_equals_the_evaluate_stage(store_and_model, demo_kaggle_dir, tmp_path):
    from lggseg.evaluation.evaluate import evaluate_model

    store, models = store_and_model
    cfg = EvaluateConfig(batch_size=8, bootstrap_samples=100)
    post = PostprocessConfig(min_area=49)
    rows = evaluate_model(models, store, cfg, post, "cpu").slices
    test_cases = sorted(set(store.table.loc[store.indices("test"), "case_id"]))
    inp = tmp_path / "kaggle_3m"
    inp.mkdir()
    for c in test_cases:
        copy_case(demo_kaggle_dir / c, inp)
    shutil.copy(demo_kaggle_dir / "data.csv", inp)  # the attributes of the training data.csv

    rows_3d = evaluate_model(models, store, cfg, PostprocessConfig(min_area=49, largest_3d=True), "cpu").slices
    for min_area, done, largest in ((0, False, False), (49, True, False), (49, True, True)):
        out = tmp_path / f"pred{min_area}{largest}"
        args = ["--model", str(models), "--input", str(inp), "--output", str(out), "--batch-size", "8", "--device", "cpu"]
        assert main([*args, "--postprocess-min-area", str(min_area), *(["--largest-3d"] if largest else [])]) == 0
        pred = pd.read_csv(out / "summary.csv")
        table = rows_3d if largest else rows
        ev = table[table["postprocessed"] == done].sort_values(["case_id", "slice_index"])
        assert pred["case_id"].tolist() == ev["case_id"].tolist()
        assert pred["slice_index"].tolist() == ev["slice_index"].tolist()
        assert pred["pred_pixels"].tolist() == ev["pred_pixels"].tolist()
        assert pred["dice"].to_numpy() == pytest.approx(ev["dice"].to_numpy(), abs=1e-12)
        # the comparison means something: masks are neither empty nor full and vary by slice
        assert 0 < pred["pred_pixels"].median() < SIZE * SIZE and pred["pred_pixels"].nunique() > 3


@pytest.mark.realdata
def test_real_kaggle_case(real_kaggle_dir, tmp_path):
    """Real TIFFs and data.csv of the Kaggle download go through unchanged (first 6 slices of a case)."""
    src = sorted(p for p in real_kaggle_dir.iterdir() if p.is_dir())[0]
    inp = tmp_path / "kaggle_3m"
    case = copy_case(src, inp, 6)
    shutil.copy(real_kaggle_dir / "data.csv", inp)
    model = save_tiny_model(tmp_path / "model", attribute_names(real_kaggle_dir))
    assert main(["--model", str(model), "--input", str(case), "--output", str(tmp_path / "out"), "--batch-size", "6"]) == 0
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    truth = [int((np.asarray(Image.open(case / f"{case.name}_{k}_mask.tif")) == 255).sum()) for k in range(1, 7)]
    assert summary["truth_pixels"].tolist() == truth and summary["dice"].notna().all()
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["attributes"] == str(inp / "data.csv")
