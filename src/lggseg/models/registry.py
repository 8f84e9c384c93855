"""Architecture name (``model.arch``) -> network class, and :func:`build_model`, the one way to make a network.

Every network class is built from one :class:`~lggseg.models.record.BuildRecord` (the
:data:`Builder` signature) and keeps it as ``build_record``; it is registered under its
``model.arch`` name with :func:`register`. :data:`ARCHITECTURES` must cover
:data:`lggseg.config.ARCHS` (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lggseg.config import ModelConfig
from lggseg.errors import ModelError
from lggseg.models.deeplab import AttributeDeepLabV3Plus, UnetBaseline
from lggseg.models.record import BuildRecord

Builder = Callable[[BuildRecord], nn.Module]
"""``BuildRecord -> network`` (a network class taking its record)."""

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


register("deeplabv3plus")(AttributeDeepLabV3Plus)
register("unet")(UnetBaseline)


def build_model(cfg: ModelConfig, n_attributes: int, image_size: int = 256) -> nn.Module:
    """The network described by ``cfg`` for ``image_size`` x ``image_size`` inputs.

    ``n_attributes`` is the attribute vector width (used when ``cfg.attributes``). With
    ``cfg.pretrained`` the encoder gets timm's ImageNet weights, from ``cfg.weights_file`` if set
    (a timm-format state dict), else from timm's hub; failure raises :class:`ModelError`.

    Returns:
        a network with ``forward(image (B,3,H,W), attributes (B,A) | None = None) -> logits (B,1,H,W)``
        and ``build_record`` (what :func:`lggseg.models.save_model` stores).
    """
    record = BuildRecord(cfg, n_attributes, image_size)
    builder = ARCHITECTURES.get(cfg.arch)
    if builder is None:
        raise ModelError(f"model.arch {cfg.arch!r} has no builder (known: {sorted(ARCHITECTURES)})")
    return builder(record)
