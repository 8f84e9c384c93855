"""What a network was built from: :class:`BuildRecord`, carried by every lggseg network.

``build_model(cfg, n_attributes, image_size)`` hands its arguments to the network class as one
:class:`BuildRecord`; the class keeps it as ``build_record`` (:class:`RecordedNetwork`), so
:func:`lggseg.models.save_model` reads it from the network it saves, and ``model.json``'s rebuild
fields (``model_config``, ``n_attributes``, ``image_size``) are :meth:`BuildRecord.to_json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lggseg.config import ModelConfig
from lggseg.errors import ModelError


@dataclass(frozen=True)
class BuildRecord:
    """The arguments of :func:`lggseg.models.build_model`, checked.

    ``n_attributes`` is the width of the data's attribute vector (stored even when
    ``config.attributes`` is false); ``image_size`` the side of the square inputs the network is
    built for. Raises :class:`TypeError` for a config that is not a ``ModelConfig`` and
    :class:`~lggseg.errors.ModelError` for an image size the output stride does not divide or
    attributes requested without any.
    """

    config: ModelConfig
    n_attributes: int
    image_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.config, ModelConfig):
            raise TypeError(f"build_model needs a lggseg.config.ModelConfig, got {type(self.config).__name__}")
        object.__setattr__(self, "n_attributes", int(self.n_attributes))
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.image_size % self.config.output_stride:
            raise ModelError(
                f"common.image_size {self.image_size} is not divisible by "
                f"model.output_stride {self.config.output_stride}"
            )
        if self.config.attributes and self.n_attributes < 1:
            raise ModelError(
                f"model.attributes is true but the data has {self.n_attributes} attributes (need at least 1)"
            )

    @property
    def used_attributes(self) -> int:
        """Attribute vector width the network reads: ``n_attributes``, or 0 without the attribute encoder."""
        return self.n_attributes if self.config.attributes else 0

    def to_json(self) -> dict[str, Any]:
        """``{"model_config": {...}, "n_attributes": int, "image_size": int}``, as ``model.json`` stores them."""
        return {
            "model_config": dataclasses.asdict(self.config),
            "n_attributes": self.n_attributes,
            "image_size": self.image_size,
        }


class RecordedNetwork:
    """Mixin of lggseg's networks: ``build_record`` is the :class:`BuildRecord` the constructor got.

    The network classes take the record as their one constructor argument and keep it, so a
    network saved by :func:`lggseg.models.save_model` describes itself however it was constructed
    (nothing is attached to the module from outside).
    """

    build_record: BuildRecord
