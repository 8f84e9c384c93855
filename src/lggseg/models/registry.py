"""Architecture name (``model.arch``) -> builder, and :func:`build_model`, the one way to make a network.

Every builder has the signature of :data:`Builder` and is registered under its ``model.arch`` name
with :func:`register`; :data:`ARCHITECTURES` must cover :data:`lggseg.config.ARCHS` (a test checks it).
:func:`build_model` checks what all architectures share and records on the module what
:func:`lggseg.models.save_model` needs to rebuild it (``lggseg_build``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from lggseg.config import ModelConfig
from lggseg.errors import ModelError
from lggseg.models.deeplab import AttributeDeepLabV3Plus, UnetBaseline
from lggseg.models.encoders import _deeplab_encoder, _guarded_build, _timm_kwargs, _timm_name, _weights_kwargs

Builder = Callable[[ModelConfig, str, int, int], nn.Module]
"""``(cfg, timm encoder name, n_attributes, image_size) -> network``."""

ARCHITECTURES: dict[str, Builder] = {}
"""``model.arch`` -> its builder; filled by :func:`register`."""


def register(arch: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder`` the one for ``model.arch: <arch>``."""

    def add(builder: Builder) -> Builder:
        if arch in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} registered twice")
        ARCHITECTURES[arch] = builder
        return builder

    return add


@register("deeplabv3plus")
def _deeplabv3plus(cfg: ModelConfig, name: str, n_attributes: int, image_size: int) -> nn.Module:
    return AttributeDeepLabV3Plus(
        _deeplab_encoder(cfg, name, image_size),
        n_attributes=n_attributes if cfg.attributes else 0,
        attribute_hidden=cfg.attribute_hidden,
        attribute_channels=cfg.attribute_channels,
        image_size=image_size,
        decoder_channels=cfg.decoder_channels,
        atrous_rates=cfg.atrous_rates,
    )


@register("unet")
def _unet(cfg: ModelConfig, name: str, n_attributes: int, image_size: int) -> nn.Module:
    if image_size % 32:
        raise ModelError(f"U-Net needs common.image_size divisible by 32, got {image_size}")
    pretrained, weight_kwargs = _weights_kwargs(cfg, name, image_size)
    return _guarded_build(
        lambda: UnetBaseline(
            encoder_name=f"tu-{name}",
            encoder_weights=True if pretrained else None,
            classes=1,
            **_timm_kwargs(name, image_size),
            **weight_kwargs,
        ),
        cfg,
        name,
        pretrained,
    )


def build_model(cfg: ModelConfig, n_attributes: int, image_size: int = 256) -> nn.Module:
    """The network described by ``cfg`` for ``image_size`` x ``image_size`` inputs.

    ``n_attributes`` is the attribute vector width (used when ``cfg.attributes``). With
    ``cfg.pretrained`` the encoder gets timm's ImageNet weights, from ``cfg.weights_file`` if set
    (a timm-format state dict), else from timm's hub; failure raises :class:`ModelError`.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model needs a lggseg.config.ModelConfig, got {type(cfg).__name__}")
    if image_size % cfg.output_stride:
        raise ModelError(
            f"common.image_size {image_size} is not divisible by model.output_stride {cfg.output_stride}"
        )
    if cfg.attributes and n_attributes < 1:
        raise ModelError(
            f"model.attributes is true but the data has {n_attributes} attributes (need at least 1)"
        )
    builder = ARCHITECTURES.get(cfg.arch)
    if builder is None:
        raise ModelError(f"model.arch {cfg.arch!r} has no builder (known: {sorted(ARCHITECTURES)})")
    model = builder(cfg, _timm_name(cfg.encoder), n_attributes, image_size)
    # what load_model needs to rebuild exactly this network
    model.lggseg_build = {
        "model_config": dataclasses.asdict(cfg),
        "n_attributes": int(n_attributes),
        "image_size": int(image_size),
    }
    return model
