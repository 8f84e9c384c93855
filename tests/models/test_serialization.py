"""``lggseg.models.serialization``: a model dir written before the build record moved into the network
classes (issue #12) still loads, and ``save_model`` reads the record the network carries.

``data/model_v1/`` holds what the pre-change code wrote for a tiny DeepLabv3+ (timm's
``test_efficientnet`` encoder, attributes): its ``model.json`` verbatim, and ``layout.json`` with the
state-dict layout (key, shape, dtype) and the logits that code computed with :func:`synthetic_state`'s
weights. A weights file cannot be committed (tests/test_repo_hygiene.py), so the test writes those
synthetic weights under the old keys and loads the directory with today's code.

Then broken model directories through ``lggseg predict`` (exit 2, a message naming the file, the
previous output untouched) and the weights format: safetensors, never a pickle.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_untouched, previous_output, run_predict
from lggseg.config import ModelConfig
from lggseg.errors import ModelError
from lggseg.models import (
    META_FILE,
    WEIGHTS_FILE,
    AttributeDeepLabV3Plus,
    BuildRecord,
    build_model,
    load_model,
    save_model,
)
from test_predict import save_tiny_model, tree_state

DATA = Path(__file__).parent / "data" / "model_v1"


def synthetic_state(layout: list[list]) -> dict[str, torch.Tensor]:
    """Deterministic weights for ``[key, shape, dtype]`` rows: small sines, running variances >= 1."""
    state = {}
    for i, (key, shape, dtype) in enumerate(layout):
        n = math.prod(shape)
        if dtype == "torch.int64":  # num_batches_tracked
            state[key] = torch.zeros(shape, dtype=torch.int64)
            continue
        wave = torch.sin(torch.arange(n, dtype=torch.float64) * 0.7 + i)
        values = 1.0 + 0.5 * wave**2 if key.endswith("running_var") else 0.2 * wave
        state[key] = values.reshape(shape).to(torch.float32)
    return state


def synthetic_inputs(n_attributes: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, image_size, image_size, generator=g), (torch.rand(2, n_attributes, generator=g) > 0.5).float()


def logits_summary(logits: torch.Tensor) -> dict:
    flat = logits.double().flatten()
    return {"shape": list(logits.shape), "sum": float(flat.sum()), "abs_sum": float(flat.abs().sum()), "first": flat[:4].tolist()}


def test_model_dir_written_before_the_change_loads(tmp_path) -> None:
    layout = json.loads((DATA / "layout.json").read_text())
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(DATA / META_FILE, model_dir / META_FILE)
    save_file(synthetic_state(layout["tensors"]), str(model_dir / WEIGHTS_FILE))

    model, meta = load_model(model_dir)  # strict: same keys and shapes as the old state dict
    assert [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()] == layout["tensors"]
    stored = json.loads((DATA / META_FILE).read_text())
    assert {k: v for k, v in meta.items() if k != "model_dir"} == stored
    with torch.no_grad():
        got = logits_summary(model(*synthetic_inputs(meta["n_attributes"], meta["image_size"])))
    want = layout["logits"]
    assert got["shape"] == want["shape"]
    assert got["sum"] == pytest.approx(want["sum"], rel=1e-4, abs=1e-3)
    assert got["abs_sum"] == pytest.approx(want["abs_sum"], rel=1e-4)
    assert got["first"] == pytest.approx(want["first"], rel=1e-4, abs=1e-5)

    # saved again, the record equals the old one field by field
    save_model(model, tmp_path / "again", {k: v for k, v in stored.items() if k not in ("model_dir",)})
    assert json.loads((tmp_path / "again" / META_FILE).read_text()) == stored


def test_the_record_comes_from_the_constructor_not_from_outside(tmp_path) -> None:
    cfg = ModelConfig(encoder="test_efficientnet", pretrained=False, decoder_channels=8, attribute_hidden=8)
    record = BuildRecord(cfg, n_attributes=4, image_size=64)
    direct = AttributeDeepLabV3Plus(record)  # no build_model: the network still knows what it was built from
    assert direct.build_record == record
    assert not hasattr(direct, "lggseg_build")
    built = build_model(cfg, 4, 64)
    assert built.build_record == record
    save_model(direct, tmp_path, {"attribute_names": list("abcd")})
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert {k: meta[k] for k in ("model_config", "n_attributes", "image_size")} == json.loads(json.dumps(record.to_json()))


def test_save_refuses_a_network_without_a_record(tmp_path) -> None:
    with pytest.raises(ModelError, match="build_model"):
        save_model(torch.nn.Conv2d(3, 1, 1), tmp_path, {})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- broken model directories (through lggseg predict)


class _Boom:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _break_model(kind: str, model: Path, tmp_path: Path) -> tuple[Path, str]:
    weights, meta = model / "model.safetensors", model / "model.json"
    if kind == "missing weights":
        weights.unlink()
        return weights, "model weights not found"
    if kind == "corrupt weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        return weights, "unreadable or corrupt weights"
    if kind == "mismatched weights":
        other = save_tiny_model(tmp_path / "other", ["attr:A=1", "attr:A=missing"], image_size=64)
        shutil.copy(other / "model.safetensors", weights)
        return weights, "does not match the model described by"
    if kind == "pickle instead of safetensors":
        with open(weights, "wb") as fh:
            pickle.dump({"x": _Boom(str(tmp_path / "PWNED"))}, fh)
        return weights, "unreadable or corrupt weights"
    if kind == "missing model.json":
        meta.unlink()
        return model, "not a model directory"
    if kind == "malformed model.json":
        meta.write_text("{not json")
        return meta, "unreadable model metadata"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "missing weights", "corrupt weights", "mismatched weights", "pickle instead of safetensors",
    "missing model.json", "malformed model.json",
])
def test_bad_model_dirs(capsys, raw, attr_model, tmp_path, kind):
    model = Path(shutil.copytree(attr_model, tmp_path / "model"))
    path, needle = _break_model(kind, model, tmp_path)
    out = previous_output(tmp_path / "out")
    before = tree_state(out)
    code, err = run_predict(capsys, model, raw, out)
    assert code == 2 and str(path) in err and needle in err, err
    assert_untouched(out, before)
    assert not (tmp_path / "PWNED").exists()



def test_model_weights_are_safetensors(attr_model):
    assert sorted(p.name for p in attr_model.iterdir()) == ["MODEL_CARD.md", "model.json", "model.safetensors"]
    load_file(str(attr_model / "model.safetensors"))  # a safetensors file, not a pickle


def test_the_same_weights_give_the_same_file_bytes(tmp_path):
    """A bit-identical model must be a byte-identical file, or DVC hashes a retrained but identical model
    as changed (seen: a clean-clone reproduction of unet_bce, issue 21, whose files differed only in the
    header's metadata key order)."""
    files = [save_tiny_model(tmp_path / f"m{i}", [], attributes=False) / WEIGHTS_FILE for i in range(6)]
    assert len({f.read_bytes() for f in files}) == 1


def test_load_model_never_unpickles(attr_model, tmp_path):
    model = Path(shutil.copytree(attr_model, tmp_path / "m"))
    torch.save({"x": _Boom(str(tmp_path / "PWNED"))}, model / "model.safetensors")
    with pytest.raises(ModelError, match="unreadable or corrupt weights"):
        load_model(model)
    assert not (tmp_path / "PWNED").exists()

