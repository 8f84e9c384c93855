"""The paper's network (sections 3.1-3.3) and the U-Net baseline of Table 4, as smp model subclasses.

DeepLabv3+ (segmentation_models_pytorch, as in section 4.1.3) with a timm image encoder
(``regnetz_040``: 48 x H/4 low-level and 528 x H/16 deep features, section 3.2.1), an attribute
encoder (section 3.2.2: an MLP from the one-hot genomic clusters + slice position to a
``3 x H/16 x W/16`` map) concatenated with the deep feature before ASPP (section 3.2.3: 531 input
channels, atrous rates 6/12/18), and smp's DeepLabv3+ decoder (section 3.3).

* :class:`AttributeDeepLabV3Plus` extends ``smp.DeepLabV3Plus``; with ``model.attributes: false``
  it is plain DeepLabv3+ and ignores the attributes passed to it.
* :class:`UnetBaseline` is smp's U-Net (Table 4, first row); it accepts and ignores attributes.

Every model has ``forward(image (B,3,H,W), attributes (B,A) | None = None) -> logits (B,1,H,W)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
from segmentation_models_pytorch.base.utils import is_torch_compiling
from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
from segmentation_models_pytorch.encoders import TimmUniversalEncoder
from torch import nn

from lggseg.errors import ModelError
from lggseg.models.encoders import _ENCODER_DEPTH

# --------------------------------------------------------------------------- building blocks


class AttributeEncoder(nn.Module):
    """Section 3.2.2: MLP from the attribute vector ``(B, A)`` to a ``C x h x w`` map.

    The paper reshapes the MLP output to ``3 x H/16 x W/16``, so the last layer has
    ``channels * grid[0] * grid[1]`` outputs with ``grid`` the deep-feature size of the configured
    image size. If an input of another size arrives (e.g. prediction at a different resolution),
    the reshaped map is resized bilinearly to the deep feature's size instead of failing: the
    learned spatial layout is kept, only resampled.
    """

    def __init__(self, n_attributes: int, hidden: int, channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if n_attributes < 1:
            raise ModelError(
                f"the attribute encoder needs at least one attribute, got n_attributes={n_attributes}"
            )
        self.n_attributes = n_attributes
        self.channels = channels
        self.grid = (int(grid[0]), int(grid[1]))
        self.mlp = nn.Sequential(
            nn.Linear(n_attributes, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels * self.grid[0] * self.grid[1]),
        )

    def forward(self, attributes: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        x = self.mlp(attributes.to(self.mlp[0].weight.dtype))
        x = x.view(x.shape[0], self.channels, *self.grid)
        if tuple(size) != self.grid:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x


def _check_attributes(model: nn.Module, attributes: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
    n = model.attribute_encoder.n_attributes
    if attributes is None:
        raise ModelError(
            f"this model was built with the attribute encoder (model.attributes: true, {n} attributes) "
            "and needs forward(image, attributes); got no attributes"
        )
    if attributes.ndim != 2 or attributes.shape[1] != n or attributes.shape[0] != image.shape[0]:
        raise ModelError(
            f"attributes must have shape (batch={image.shape[0]}, {n}) for this model, got {tuple(attributes.shape)}"
        )
    return attributes


class AttributeDeepLabV3Plus(smp.DeepLabV3Plus):
    """DeepLabv3+ whose ASPP also sees the attribute encoder's map (sections 3.1-3.3).

    ``smp.DeepLabV3Plus.__init__`` creates its own encoder through ``get_encoder``, which hands
    ``output_stride`` to timm (Swin rejects it) and sizes ASPP for the image features alone. This
    subclass takes a ready encoder instead (so :func:`build_model` controls weights and the Swin
    adapter) and assembles the same smp parts: :class:`DeepLabV3PlusDecoder` with its ASPP input
    widened by ``attribute_channels``, and a 1x1 ``SegmentationHead`` upsampling x4 (x2 at output
    stride 8). ``decoder_aspp_separable`` keeps smp's DeepLabv3+ default (depthwise-separable
    atrous convolutions, as in the DeepLabv3+ paper); dropout 0.5 as smp.

    ``n_attributes=0`` gives plain DeepLabv3+; it accepts and ignores ``attributes``.
    """

    def __init__(
        self,
        encoder: TimmUniversalEncoder,
        *,
        n_attributes: int = 0,
        attribute_hidden: int = 128,
        attribute_channels: int = 3,
        image_size: int = 256,
        decoder_channels: int = 256,
        atrous_rates: Sequence[int] = (6, 12, 18),
        aspp_separable: bool = True,
        aspp_dropout: float = 0.5,
    ) -> None:
        # DeepLabV3Plus.__init__ would build a second encoder; only the base class is initialised
        SegmentationModel.__init__(self)
        stride = int(encoder.output_stride)
        if stride not in (8, 16):
            raise ModelError(f"encoder {encoder.name}: DeepLabv3+ needs output stride 8 or 16, got {stride}")
        self.encoder = encoder
        extra = attribute_channels if n_attributes > 0 else 0
        channels = [*encoder.out_channels[:-1], encoder.out_channels[-1] + extra]
        self.decoder = DeepLabV3PlusDecoder(
            encoder_channels=channels,
            encoder_depth=_ENCODER_DEPTH,
            out_channels=decoder_channels,
            atrous_rates=tuple(atrous_rates),
            output_stride=stride,
            aspp_separable=aspp_separable,
            aspp_dropout=aspp_dropout,
        )
        # the decoder returns H/4 features; the head restores H
        self.segmentation_head = SegmentationHead(decoder_channels, 1, kernel_size=1, upsampling=4)
        self.classification_head = None
        self.attribute_encoder = (
            AttributeEncoder(n_attributes, attribute_hidden, attribute_channels, (image_size // stride,) * 2)
            if n_attributes > 0
            else None
        )
        self.name = f"deeplabv3plus-{encoder.name}" + ("-attributes" if n_attributes > 0 else "")

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(image)
        features = self.encoder(image)
        if self.attribute_encoder is not None:
            attributes = _check_attributes(self, attributes, image)
            deep = features[-1]
            attr_map = self.attribute_encoder(attributes, deep.shape[-2:]).to(deep.dtype)
            features = [*features[:-1], torch.cat([deep, attr_map], dim=1)]
        return self.segmentation_head(self.decoder(features))


class UnetBaseline(smp.Unet):
    """smp's U-Net (Table 4, first row); takes ``attributes`` for a uniform interface and ignores them."""

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(image)


# --------------------------------------------------------------------------- encoders and weights


# --------------------------------------------------------------------------- public API

