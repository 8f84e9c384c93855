"""``lggseg.models.encoders``: the encoders live in smp's registry and smp's constructors build them."""

from __future__ import annotations

import pytest
import torch
from segmentation_models_pytorch.encoders import encoders as smp_registry
from segmentation_models_pytorch.encoders import get_encoder

from lggseg.config import ModelConfig
from lggseg.errors import ModelError
from lggseg.models import TimmEncoder, build_model
from lggseg.models.encoders import deeplab_encoder, unet_encoder

TINY = "test_efficientnet"  # timm's 80k-parameter test network


def test_registered_names_are_stable_and_built_by_smp() -> None:
    cfg = ModelConfig(encoder=TINY, pretrained=False)
    key = deeplab_encoder(cfg, TINY, 64, joined_channels=3)
    assert key == deeplab_encoder(cfg, TINY, 64, joined_channels=3)  # one entry per setting
    assert key != deeplab_encoder(cfg, TINY, 64, joined_channels=0)
    assert key != unet_encoder(cfg, TINY, 64)
    assert smp_registry[key]["encoder"] is TimmEncoder
    encoder = get_encoder(key, depth=5, output_stride=16)  # what smp's constructors call
    assert isinstance(encoder, TimmEncoder) and encoder.output_stride == 16
    assert encoder.out_channels[-1] == encoder.image_features(torch.zeros(1, 3, 64, 64))[-1].shape[1] + 3


def test_the_network_is_built_by_smps_constructor(monkeypatch) -> None:
    import segmentation_models_pytorch as smp

    calls = []
    original = smp.DeepLabV3Plus.__init__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(smp.DeepLabV3Plus, "__init__", spy)
    model = build_model(ModelConfig(encoder=TINY, pretrained=False, decoder_channels=8), 4, 64)
    assert len(calls) == 1 and calls[0]["encoder_name"] in smp_registry and calls[0]["encoder_weights"] is None
    assert model.decoder.aspp[0].convs[0][0].in_channels == model.encoder.out_channels[-1]


def test_joined_encoder_needs_the_map() -> None:
    model = build_model(ModelConfig(encoder=TINY, pretrained=False, decoder_channels=8), 4, 64)
    with pytest.raises(ModelError, match="joins a 3-channel map"):
        model.encoder(torch.zeros(1, 3, 64, 64))
    features = model.encoder(torch.zeros(1, 3, 64, 64), lambda size: torch.ones(1, 3, *size))
    assert [f.shape[1] for f in features] == model.encoder.out_channels
    assert torch.equal(features[-1][:, -3:], torch.ones(1, 3, 4, 4))


def test_smp_hooks_refuse_what_the_encoder_was_not_built_for() -> None:
    encoder = get_encoder(deeplab_encoder(ModelConfig(encoder=TINY, pretrained=False), TINY, 64), output_stride=16)
    with pytest.raises(ModelError, match="input channels"):
        encoder.set_in_channels(1)
    with pytest.raises(ModelError, match="strides"):
        encoder.make_dilated(8)
