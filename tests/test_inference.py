"""``lggseg.inference``: the one inference step evaluation, ``lggseg predict``, the benchmark and preflight
share, and where a variant's models are found; on hand-computed cases.

(:func:`infer_probabilities`' TTA, upsampling and attribute cases are in ``test_predict.py``, next to the
equality of ``lggseg predict`` with the evaluate stage.)
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import case_dir, run_predict
from lggseg.errors import DataError, ModelError
from lggseg.inference import (
    attribute_order,
    find_model_dirs,
    infer_probabilities,
    predict_probabilities,
    preprocess,
    resolve_model_dir,
    uses_attributes,
)
from lggseg.models import META_FILE

# --------------------------------------------------------------------------- preprocess


# (RGB value of every pixel, the normalised value of each channel: (v / 255 - mean) / std, ImageNet's)
PIXELS = [
    ((255, 255, 255), (2.2489083, 2.4285714, 2.6400000)),  # (1 - 0.485) / 0.229, (1 - 0.456) / 0.224, ...
    ((0, 0, 0), (-2.1179039, -2.0357143, -1.8044444)),  # -0.485 / 0.229, ...
    ((255, 0, 51), (2.2489083, -2.0357143, -0.9155556)),  # blue: (0.2 - 0.406) / 0.225
]


@pytest.mark.parametrize(("rgb", "expected"), PIXELS)
@pytest.mark.parametrize("size", [64, 256])
def test_preprocess_normalises_a_constant_slice(rgb, expected, size):
    image = np.empty((256, 256, 3), np.uint8)
    image[...] = rgb
    x = preprocess(image, size)
    assert x.shape == (3, size, size) and x.dtype == np.float32
    for c in range(3):  # area averaging keeps a constant image constant
        assert np.allclose(x[c], expected[c], atol=1e-5), c


# --------------------------------------------------------------------------- infer_probabilities


class AttributeLogit(torch.nn.Module):
    """Logit of every pixel = the sample's first attribute (0 without attributes)."""

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = image.shape
        value = attributes[:, 0] if attributes is not None else torch.zeros(b)
        return value.view(b, 1, 1, 1).expand(b, 1, h, w).clone()


def test_infer_probabilities_is_sigmoid_of_the_logits_without_a_graph():
    image = torch.zeros(3, 3, 4, 4, requires_grad=True)
    attrs = torch.tensor([[-1.0], [0.0], [3.0]])
    prob = infer_probabilities(AttributeLogit(), image, attrs)
    # sigmoid(-1), sigmoid(0), sigmoid(3)
    expected = torch.tensor([0.2689414, 0.5, 0.9525741]).view(3, 1, 1).expand(3, 4, 4)
    assert prob.shape == (3, 4, 4) and prob.dtype == torch.float32
    assert torch.allclose(prob, expected, atol=1e-6)
    assert not prob.requires_grad


# --------------------------------------------------------------------------- predict_probabilities


def _store(n: int = 3, side: int = 16) -> SimpleNamespace:
    """A store of ``n`` black slices whose attribute rows are given by hand."""
    attributes = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5], [0.0, 0.0, 3.0]], np.float32)[:n]
    return SimpleNamespace(images=np.zeros((n, side, side, 3), np.uint8), masks=np.zeros((n, side, side), np.uint8),
                           attributes=attributes)


@pytest.mark.parametrize(("attribute_index", "expected"), [
    # store columns (2, 0) in the model's order: the model's first attribute is store column 2
    (np.array([2, 0]), {2: 0.9525741, 0: 0.2689414}),  # sigmoid(3), sigmoid(-1)
    (np.array([0, 1, 2]), {2: 0.5, 0: 0.5}),  # store column 0 of rows 2 and 0: sigmoid(0)
    (None, {2: 0.5, 0: 0.5}),  # a model without attributes gets none (AttributeLogit: logit 0)
])
def test_predict_probabilities_rows_order_attributes_and_native_size(attribute_index, expected):
    model = AttributeLogit().train()
    batches = list(predict_probabilities(model, _store(), np.array([2, 0]), image_size=8,
                                         attribute_index=attribute_index, batch_size=1, device=torch.device("cpu")))
    assert not model.training  # put in eval mode
    assert [rows.tolist() for rows, _ in batches] == [[2], [0]]  # in the order asked, one per batch
    for rows, prob in batches:
        assert prob.shape == (1, 16, 16) and prob.dtype == np.float32  # upsampled to the store's 16 px
        assert np.allclose(prob, expected[int(rows[0])], atol=1e-6)


# --------------------------------------------------------------------------- model directories


def test_find_model_dirs(tmp_path):
    for name in ("seed_7", "seed_23", "other", "seed_x", "seed_3.bak"):
        (tmp_path / name).mkdir()
    (tmp_path / "seed_5").write_text("a file, not a model directory")
    assert find_model_dirs(tmp_path) == {7: tmp_path / "seed_7", 23: tmp_path / "seed_23"}
    assert list(find_model_dirs(tmp_path)) == [7, 23]  # sorted by seed, not by name
    with pytest.raises(ModelError, match="no seed_"):
        find_model_dirs(tmp_path / "other")
    with pytest.raises(ModelError, match="not found"):
        find_model_dirs(tmp_path / "missing")


@pytest.fixture()
def model_dirs(tmp_path):
    """``single/`` (a model directory), ``one/seed_7/``, ``two/seed_1/`` and ``two/seed_2/``, ``empty/``."""
    for d in ("single", "one/seed_7", "two/seed_1", "two/seed_2", "empty"):
        (tmp_path / d).mkdir(parents=True)
    for d in ("single", "one/seed_7", "two/seed_1", "two/seed_2"):
        (tmp_path / d / META_FILE).write_text("{}")
    return tmp_path


@pytest.mark.parametrize(("given", "seed", "expected"), [
    ("single", None, "single"),
    ("one", None, "one/seed_7"),  # the only seed
    ("one/seed_7", None, "one/seed_7"),
    ("two", 2, "two/seed_2"),
])
def test_resolve_model_dir(model_dirs, given, seed, expected):
    assert resolve_model_dir(model_dirs / given, seed) == model_dirs / expected


@pytest.mark.parametrize(("given", "seed", "error"), [
    ("two", None, "holds the models of seeds \\[1, 2\\]; choose one with --seed"),
    ("two", 3, r"no model for seed 3 \(seeds: \[1, 2\]\)"),
    ("single", 1, "--seed 1 given but this is a single model directory"),
    ("empty", None, "not a model directory"),
    ("missing", None, "model directory not found"),
])
def test_resolve_model_dir_refuses(model_dirs, given, seed, error):
    with pytest.raises(ModelError, match=error):
        resolve_model_dir(model_dirs / given, seed)


def test_several_seeds_need_a_choice(capsys, raw, attr_model, tmp_path):
    variant = tmp_path / "models" / "v"
    for s in (1, 2):
        shutil.copytree(attr_model, variant / f"seed_{s}")
    code, err = run_predict(capsys, variant, raw, tmp_path / "out")
    assert code == 2 and "choose one with --seed" in err
    code, err = run_predict(capsys, variant, raw, tmp_path / "out", "--seed", "5")
    assert code == 2 and "no model for seed 5" in err
    code, _ = run_predict(capsys, variant, case_dir(raw), tmp_path / "out", "--seed", "2")
    assert code == 0
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["model_dir"].endswith("seed_2")


# --------------------------------------------------------------------------- attributes


@pytest.mark.parametrize(("store", "model", "expected"), [
    (["a", "b", "c"], ["c", "a"], [2, 0]),
    (["a", "b", "c"], ["a", "b", "c"], [0, 1, 2]),
    (["a", "b"], [], []),
])
def test_attribute_order(store, model, expected):
    order = attribute_order(store, model, "here")
    assert order.dtype == np.int64 and order.tolist() == expected
    assert [store[k] for k in order] == model


def test_attribute_order_names_what_the_store_lacks():
    with pytest.raises(DataError, match=r"models/v: the model needs attribute\(s\) \['d'\]"):
        attribute_order(["a", "b"], ["a", "d"], "models/v")


@pytest.mark.parametrize(("meta", "expected"), [
    ({"model_config": {"attributes": True}, "n_attributes": 3}, True),
    ({"model_config": {"attributes": True}, "n_attributes": 0}, False),  # an encoder with nothing to encode
    ({"model_config": {"attributes": False}, "n_attributes": 3}, False),
    ({"n_attributes": 3}, False),
    ({}, False),
])
def test_uses_attributes(meta, expected):
    assert uses_attributes(meta) is expected
