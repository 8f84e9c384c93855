"""The networks: build one from ``model`` params, save it, load it (layer: above :mod:`lggseg.data`, below training).

- :mod:`lggseg.models.registry`: :func:`build_model` and the ``model.arch`` -> network class registry.
- :mod:`lggseg.models.record`: :class:`BuildRecord`, what a network was built from (each network carries its own).
- :mod:`lggseg.models.deeplab`: the smp model subclasses (attribute DeepLabv3+, U-Net baseline).
- :mod:`lggseg.models.encoders`: timm encoders in smp's encoder registry, the Swin stride-16 adapter, weights.
- :mod:`lggseg.models.serialization`: ``model.safetensors`` + ``model.json`` (:func:`save_model`, :func:`load_model`).
"""

from lggseg.models.deeplab import AttributeDeepLabV3Plus, AttributeEncoder, UnetBaseline
from lggseg.models.encoders import (
    TABLE4_ENCODERS,
    FusedStride16Encoder,
    TimmEncoder,
    check_weights_file,
    feature_strides,
)
from lggseg.models.record import BuildRecord, RecordedNetwork
from lggseg.models.registry import ARCHITECTURES, build_model
from lggseg.models.serialization import (
    FORMAT,
    META_FILE,
    WEIGHTS_FILE,
    count_parameters,
    load_model,
    read_meta,
    save_model,
)

__all__ = [
    "ARCHITECTURES", "FORMAT", "META_FILE", "TABLE4_ENCODERS", "WEIGHTS_FILE", "AttributeDeepLabV3Plus", "AttributeEncoder",
    "BuildRecord", "FusedStride16Encoder", "RecordedNetwork", "TimmEncoder", "UnetBaseline", "build_model",
    "check_weights_file", "count_parameters", "feature_strides", "load_model", "read_meta", "save_model",
]
