"""Contract tests of ``lggseg.models`` (paper sections 3.1-3.3, Table 4): shapes, gradients,
attribute fusion, weights loading and the save/load round trip. Random weights, 64x64, batch 2."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from lggseg.config import ModelConfig
from lggseg.errors import ModelError
from lggseg.models import (
    META_FILE,
    TABLE4_ENCODERS,
    WEIGHTS_FILE,
    AttributeDeepLabV3Plus,
    AttributeEncoder,
    FusedStride16Encoder,
    build_model,
    feature_strides,
    load_model,
    save_model,
)

N_ATTR = 9
SIZE = 64
BATCH = 2


def _inputs(batch: int = BATCH, size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=g)
    attributes = (torch.rand(batch, N_ATTR, generator=g) > 0.5).float()
    return image, attributes


def _build(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(pretrained=False, **overrides), N_ATTR, SIZE)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny inputs gain nothing from threads, and on a busy 2-core machine OpenMP barriers make
    2 threads up to 10x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def regnet_attr() -> torch.nn.Module:
    return _build()


@pytest.fixture(scope="module")
def regnet_plain() -> torch.nn.Module:
    return _build(attributes=False)


@pytest.fixture
def regnet(request, regnet_attr, regnet_plain) -> torch.nn.Module:
    """The paper's model with (param True) or without (False) the attribute encoder."""
    return regnet_attr if request.param else regnet_plain


def _assert_trains(model: torch.nn.Module, image: torch.Tensor, attributes: torch.Tensor | None) -> None:
    """Forward in train mode, backward, and every parameter has a finite gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(image, attributes)
    assert logits.shape == (image.shape[0], 1, *image.shape[-2:])
    assert torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert bad == []


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("regnet", [True, False], indirect=True)
def test_output_shape_and_gradients(regnet: torch.nn.Module) -> None:
    image, attrs = _inputs()
    _assert_trains(regnet, image, attrs if regnet.attribute_encoder is not None else None)


def test_regnetz_040_features_match_section_3_2(regnet_attr: torch.nn.Module) -> None:
    image, _ = _inputs()
    features = regnet_attr.encoder.image_features(image)
    # section 3.2: 48 x H/4 (low level) and 528 x H/16 (deep)
    assert tuple(features[2].shape) == (BATCH, 48, SIZE // 4, SIZE // 4)
    assert tuple(features[-1].shape) == (BATCH, 528, SIZE // 16, SIZE // 16)
    assert feature_strides(regnet_attr.encoder)[2] == 4
    assert feature_strides(regnet_attr.encoder)[-1] == 16


@pytest.mark.parametrize(("regnet", "aspp_in"), [(True, 528 + 3), (False, 528)], indirect=["regnet"])
def test_aspp_input_channels_and_rates(regnet: torch.nn.Module, aspp_in: int) -> None:
    aspp = regnet.decoder.aspp[0]
    assert aspp.convs[0][0].in_channels == aspp_in  # the 1x1 branch
    assert aspp.convs[4][1].in_channels == aspp_in  # the pooling branch
    dilations = [branch[0][0].dilation[0] for branch in aspp.convs[1:4]]  # separable: depthwise conv first
    assert dilations == [6, 12, 18]


def test_aspp_receives_the_attribute_map(regnet_attr: torch.nn.Module) -> None:
    seen = {}

    def keep_input(module, args, output) -> None:
        seen["x"] = args[0]

    hook = regnet_attr.decoder.aspp.register_forward_hook(keep_input)
    try:
        image, attrs = _inputs()
        regnet_attr.eval()
        with torch.no_grad():
            regnet_attr(image, attrs)
            expected = regnet_attr.attribute_encoder(attrs, (SIZE // 16, SIZE // 16))
    finally:
        hook.remove()
    assert tuple(seen["x"].shape) == (BATCH, 531, SIZE // 16, SIZE // 16)
    torch.testing.assert_close(seen["x"][:, 528:], expected)


def test_attributes_change_the_output(regnet_attr: torch.nn.Module) -> None:
    image, attrs = _inputs()
    regnet_attr.eval()
    with torch.no_grad():
        a = regnet_attr(image, attrs)
        b = regnet_attr(image, 1.0 - attrs)
        c = regnet_attr(image, attrs.clone())
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c)


def test_plain_deeplab_ignores_attributes(regnet_plain: torch.nn.Module) -> None:
    model = regnet_plain.eval()
    assert model.attribute_encoder is None
    image, attrs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(image), model(image, attrs))


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        (None, "needs forward"),
        (torch.zeros(BATCH, N_ATTR - 1), "shape"),
        (torch.zeros(BATCH, N_ATTR + 1), "shape"),
        (torch.zeros(BATCH + 1, N_ATTR), "shape"),
        (torch.zeros(BATCH, N_ATTR, 1), "shape"),
    ],
)
def test_wrong_attributes_raise(regnet_attr: torch.nn.Module, attributes, message: str) -> None:
    image, _ = _inputs()
    with pytest.raises(ModelError, match=message):
        regnet_attr(image, attributes)


@pytest.mark.parametrize(("size", "grid"), [(64, (4, 4)), (128, (8, 8))])
def test_attribute_encoder_shape(size: int, grid: tuple[int, int]) -> None:
    enc = AttributeEncoder(N_ATTR, 16, 3, (size // 16, size // 16))
    assert enc.mlp[-1].out_features == 3 * grid[0] * grid[1]
    out = enc(torch.rand(5, N_ATTR), grid)
    assert tuple(out.shape) == (5, 3, *grid)


def test_other_input_size_resizes_the_attribute_map(regnet_attr: torch.nn.Module) -> None:
    image, attrs = _inputs(size=2 * SIZE)
    regnet_attr.eval()
    with torch.no_grad():
        assert regnet_attr(image, attrs).shape == (BATCH, 1, 2 * SIZE, 2 * SIZE)
        grid = regnet_attr.attribute_encoder(attrs, (2 * SIZE // 16,) * 2)
    assert tuple(grid.shape[-2:]) == (2 * SIZE // 16,) * 2


def test_unet_accepts_and_ignores_attributes() -> None:
    model = _build(arch="unet", encoder="resnet34", attributes=False).eval()
    image, attrs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(image), model(image, attrs))
    _assert_trains(model, image, attrs)


def test_build_errors() -> None:
    with pytest.raises(ModelError, match="not a timm model"):
        _build(encoder="no_such_net_123")
    with pytest.raises(ModelError, match="at least 1"):
        build_model(ModelConfig(pretrained=False), 0, SIZE)
    with pytest.raises(ModelError, match="pretrained is false"):
        _build(weights_file="/nonexistent/w.safetensors")
    with pytest.raises(ModelError, match="output_stride 16 only"):
        _build(encoder="swinv2_base_window8_256", attributes=False, output_stride=8)


# --------------------------------------------------------------------------- Table 4 encoders


@pytest.mark.slow
@pytest.mark.parametrize("encoder", TABLE4_ENCODERS)
def test_table4_encoder_builds_and_trains(encoder: str) -> None:
    model = _build(encoder=encoder, attributes=False)
    strides = feature_strides(model.encoder)
    assert strides[2] == 4 and strides[-1] == 16
    image, attrs = _inputs()
    features = model.encoder(image)
    assert [f.shape[1] for f in features] == list(model.encoder.out_channels)
    assert [f.shape[-1] for f in features[1:]] == [SIZE // s for s in strides[1:]]
    _assert_trains(model, image, attrs)


@pytest.mark.slow
def test_swin_adapter_fuses_stage3_and_stage4() -> None:
    model = _build(encoder="swinv2_base_window8_256", attributes=True)
    assert isinstance(model.encoder, FusedStride16Encoder)
    image, attrs = _inputs()
    assert model.encoder.image_features(image)[-1].shape[1] == 512 + 1024
    assert model.encoder.out_channels[-1] == 512 + 1024 + 3  # with the joined attribute map
    assert model.decoder.aspp[0].convs[0][0].in_channels == 512 + 1024 + 3
    _assert_trains(model, image, attrs)
    with pytest.raises(ModelError, match="built for 64x64"):
        model(*_inputs(size=2 * SIZE))


# --------------------------------------------------------------------------- pretrained weights


def test_pretrained_without_network_is_a_clear_error(monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants

    # no internet here: offline mode makes the hub fail at once instead of retrying for ~45 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # never a cached copy
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"regnetz_040.*weights_file.*pretrained: false"):
        build_model(ModelConfig(pretrained=True), N_ATTR, SIZE)
    assert time.perf_counter() - start < 30


SMALL = "resnet10t"  # a 5M-parameter timm net keeps the weight-file tests fast


def _timm_state(name: str = SMALL, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_is_loaded(tmp_path, suffix: str) -> None:
    state = _timm_state()
    path = tmp_path / f"{SMALL}{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = build_model(ModelConfig(encoder=SMALL, pretrained=True, weights_file=str(path)), N_ATTR, SIZE)
    loaded = model.encoder.model.state_dict()
    assert len(loaded) > 50
    for key, value in loaded.items():  # every encoder tensor, running statistics included
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_weights_file_without_classifier_is_accepted(tmp_path) -> None:
    state = {k: v for k, v in _timm_state().items() if not k.startswith("fc.")}
    path = tmp_path / "headless.safetensors"
    save_file(state, str(path))
    model = build_model(ModelConfig(encoder=SMALL, pretrained=True, weights_file=str(path)), N_ATTR, SIZE)
    torch.testing.assert_close(model.encoder.model.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


def test_weights_file_errors(tmp_path) -> None:
    cfg = ModelConfig(encoder=SMALL, pretrained=True)
    wrong = tmp_path / "mobilenet.safetensors"
    save_file(_timm_state("mobilenetv3_small_050"), str(wrong))
    with pytest.raises(ModelError, match=rf"not a timm state dict of '{SMALL}'.*missing.*unexpected"):
        build_model(dataclasses.replace(cfg, weights_file=str(wrong)), N_ATTR, SIZE)

    state = _timm_state()
    state["conv1.0.weight"] = torch.zeros(1, 3, 3, 3)
    reshaped = tmp_path / "reshaped.safetensors"
    save_file(state, str(reshaped))
    with pytest.raises(ModelError, match=r"wrong shape.*conv1\.0\.weight"):
        build_model(dataclasses.replace(cfg, weights_file=str(reshaped)), N_ATTR, SIZE)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ModelError, match="cannot read"):
        build_model(dataclasses.replace(cfg, weights_file=str(corrupt)), N_ATTR, SIZE)

    with pytest.raises(ModelError, match="no such file"):
        build_model(dataclasses.replace(cfg, weights_file=str(tmp_path / "absent.pth")), N_ATTR, SIZE)


def test_weights_file_refuses_pickled_objects(tmp_path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.0.weight": torch.zeros(1), "evil": pathlib.PurePosixPath("x")}, path)
    with pytest.raises(ModelError, match="cannot read"):
        build_model(ModelConfig(encoder=SMALL, pretrained=True, weights_file=str(path)), N_ATTR, SIZE)


# --------------------------------------------------------------------------- save / load


def _meta() -> dict:
    return {"run_config": {"variant": "t"}, "attribute_names": [f"a{i}" for i in range(N_ATTR)], "seed": 23}


@pytest.mark.parametrize(
    ("arch", "encoder", "attributes"), [("deeplabv3plus", "regnetz_040", True), ("unet", "resnet34", False)]
)
def test_save_load_round_trip(tmp_path, arch: str, encoder: str, attributes: bool) -> None:
    model = _build(seed=3, arch=arch, encoder=encoder, attributes=attributes)
    image, attrs = _inputs()
    model.train()
    model(image, attrs)  # move the BatchNorm running statistics away from their init
    model.eval()
    with torch.no_grad():
        expected = model(image, attrs)
    save_model(
        torch.compile(model) if arch == "unet" else model, tmp_path / "m", _meta()
    )  # compiled: unwrapped
    assert {p.name for p in (tmp_path / "m").iterdir()} == {WEIGHTS_FILE, META_FILE, "MODEL_CARD.md"}

    loaded, meta = load_model(tmp_path / "m")
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, attrs), expected, rtol=0, atol=0)
    assert meta["arch"] == arch and meta["encoder"] == encoder
    assert meta["n_attributes"] == N_ATTR and meta["image_size"] == SIZE
    assert meta["attribute_names"] == _meta()["attribute_names"] and meta["seed"] == 23
    assert meta["model_config"]["attributes"] is attributes
    assert meta["model_dir"] == str(tmp_path / "m")


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A small saved attribute model (resnet10t encoder) to damage in the error tests."""
    out = tmp_path_factory.mktemp("saved")
    save_model(_build(encoder=SMALL), out, _meta())
    return out


def test_load_forces_pretrained_off(tmp_path, saved_dir) -> None:
    d = _copy(saved_dir, tmp_path / "m")
    _edit_meta(d, ["model_config", "pretrained"], True)  # trained from ImageNet weights: no download on load
    _edit_meta(d, ["model_config", "weights_file"], "/nonexistent/encoder.safetensors")
    loaded, meta = load_model(d)
    assert isinstance(loaded, AttributeDeepLabV3Plus)
    assert meta["model_config"]["pretrained"] is True  # the record is returned as stored


def _copy(src, dst):
    dst.mkdir()
    for name in (WEIGHTS_FILE, META_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / WEIGHTS_FILE).unlink(), "model.safetensors: model weights not found"),
        (lambda d: (d / META_FILE).unlink(), "model.json: model metadata not found"),
        (
            lambda d: (d / WEIGHTS_FILE).write_bytes(b"garbage" * 10),
            "model.safetensors: unreadable or corrupt",
        ),
        (lambda d: (d / META_FILE).write_text("{not json"), "model.json: unreadable"),
        (lambda d: (d / META_FILE).write_text("{}"), "model.json: lacks"),
        (lambda d: _edit_meta(d, ["model_config", "attribute_hidden"], 64), "wrong shape.*attribute_encoder"),
        (lambda d: _edit_meta(d, ["model_config", "attributes"], False), "unexpected.*attribute_encoder"),
        (
            lambda d: _edit_meta(d, ["model_config", "encoder"], "resnet18"),
            "model.safetensors does not match.*model.json",
        ),
        (lambda d: _edit_meta(d, ["model_config", "arch"], "transformer"), "model.json: cannot rebuild"),
        (
            lambda d: _edit_meta(d, ["model_config", "encoder"], "no_such_net_123"),
            "model.json: cannot rebuild.*not a timm",
        ),
    ],
)
def test_load_errors_name_the_file(tmp_path, saved_dir, damage, message: str) -> None:
    d = _copy(saved_dir, tmp_path / "m")
    damage(d)
    with pytest.raises(ModelError, match=message):
        load_model(d)


def _edit_meta(d, keys, value):
    meta = json.loads((d / META_FILE).read_text())
    node = meta
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    (d / META_FILE).write_text(json.dumps(meta))


def test_save_rejects_inconsistent_meta(tmp_path, regnet_attr) -> None:
    with pytest.raises(ModelError, match="n_attributes"):
        save_model(regnet_attr, tmp_path, {**_meta(), "n_attributes": N_ATTR + 1})
    with pytest.raises(ModelError, match="image_size"):
        save_model(regnet_attr, tmp_path, {**_meta(), "image_size": 2 * SIZE})
    with pytest.raises(ModelError, match="attribute names"):
        save_model(regnet_attr, tmp_path, {**_meta(), "attribute_names": ["a"]})
    with pytest.raises(ModelError, match="JSON"):
        save_model(regnet_attr, tmp_path, {**_meta(), "score": float("nan")})
    with pytest.raises(ModelError, match="build_model"):
        save_model(torch.nn.Linear(2, 2), tmp_path, _meta())
    assert not (tmp_path / WEIGHTS_FILE).exists() and not (tmp_path / META_FILE).exists()


def test_every_arch_has_one_registered_builder():
    """model.arch -> builder through the registry (issue #12); config.ARCHS and the registry agree."""
    from lggseg.config import ARCHS
    from lggseg.models import ARCHITECTURES
    from lggseg.models.registry import register

    assert set(ARCHITECTURES) == set(ARCHS)
    with pytest.raises(ValueError, match="registered twice"):
        register("unet")(lambda *a: None)


def test_the_tested_smp_range_is_pinned():
    import re
    from importlib import metadata
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"segmentation-models-pytorch>=0.6,<0.7"' in text
    assert re.fullmatch(r"0\.6\.\d+", metadata.version("segmentation-models-pytorch"))
