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

from functools import partial

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.utils import is_torch_compiling
from torch import nn

from lggseg.errors import ModelError
from lggseg.models.encoders import ENCODER_DEPTH, deeplab_encoder, timm_name, unet_encoder
from lggseg.models.record import BuildRecord, RecordedNetwork

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
        """Args:
            attributes: ``(B, A)`` (cast to the MLP's dtype).
            size: ``(h, w)`` of the deep feature the map is joined to.

        Returns:
            ``(B, channels, h, w)``, resized bilinearly from ``grid`` when ``size`` differs.
        """
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


class AttributeDeepLabV3Plus(RecordedNetwork, smp.DeepLabV3Plus):
    """DeepLabv3+ whose ASPP also sees the attribute encoder's map (sections 3.1-3.3).

    Built from a :class:`~lggseg.models.record.BuildRecord` by ``smp.DeepLabV3Plus.__init__``
    itself: the encoder is lggseg's timm encoder from smp's registry
    (:func:`~lggseg.models.encoders.deeplab_encoder`), which joins the ``attribute_channels`` map to
    its deep feature and counts those channels in ``out_channels``, so smp's decoder sizes ASPP
    for image + attribute channels (531 for regnetz_040). Then smp's DeepLabv3+ decoder (atrous
    rates from the config, depthwise-separable ASPP and dropout 0.5 as smp's defaults) and a 1x1
    ``SegmentationHead`` upsampling the H/4 decoder output x4; the :class:`AttributeEncoder` is
    created last. Without ``model.attributes`` it is plain DeepLabv3+ and ignores ``attributes``.
    """

    def __init__(self, record: BuildRecord) -> None:
        cfg = record.config
        name = timm_name(cfg.encoder)
        n_attributes = record.used_attributes
        joined = cfg.attribute_channels if n_attributes > 0 else 0
        super().__init__(
            encoder_name=deeplab_encoder(cfg, name, record.image_size, joined_channels=joined),
            encoder_depth=ENCODER_DEPTH,
            encoder_weights=None,  # the encoder gets its pretrained weights itself (timm hub or weights_file)
            encoder_output_stride=cfg.output_stride,
            decoder_channels=cfg.decoder_channels,
            decoder_atrous_rates=tuple(cfg.atrous_rates),
            classes=1,
            upsampling=4,
        )
        self.build_record = record
        # created after smp's parts, as always, so a seed gives the same initial weights
        grid = (record.image_size // self.encoder.output_stride,) * 2
        self.attribute_encoder = (
            AttributeEncoder(n_attributes, cfg.attribute_hidden, cfg.attribute_channels, grid)
            if n_attributes > 0
            else None
        )
        self.name = f"deeplabv3plus-{name}" + ("-attributes" if n_attributes > 0 else "")

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``image``.

        Args:
            image: normalised images ``(B, 3, H, W)``, H and W divisible by the output stride.
            attributes: ``(B, A)`` attribute vectors, required with the attribute encoder (``A`` as built),
                ignored without it.

        Returns:
            logits ``(B, 1, H, W)``.
        """
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(image)
        join = None
        if self.attribute_encoder is not None:
            join = partial(self.attribute_encoder, _check_attributes(self, attributes, image))
        return self.segmentation_head(self.decoder(self.encoder(image, join)))


class UnetBaseline(RecordedNetwork, smp.Unet):
    """smp's U-Net (Table 4, first row) on lggseg's timm encoder; ``attributes`` is accepted and ignored."""

    def __init__(self, record: BuildRecord) -> None:
        cfg = record.config
        name = timm_name(cfg.encoder)
        if record.image_size % 32:
            raise ModelError(f"U-Net needs common.image_size divisible by 32, got {record.image_size}")
        super().__init__(
            encoder_name=unet_encoder(cfg, name, record.image_size),
            encoder_weights=None,  # the encoder gets its pretrained weights itself
            classes=1,
        )
        self.build_record = record
        self.name = f"u-tu-{name}"

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``image``.

        Args:
            image: normalised images ``(B, 3, H, W)``, H and W divisible by 32.
            attributes: ignored (any value, or ``None``).

        Returns:
            logits ``(B, 1, H, W)``.
        """
        return super().forward(image)
