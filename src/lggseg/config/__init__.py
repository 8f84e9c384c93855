"""Typed, validated views of ``params.yaml``: the bottom layer with :mod:`lggseg.errors` and :mod:`lggseg.io`.

Every section of ``params.yaml`` loads into a frozen dataclass whose ``__post_init__`` rejects
nonsense (``ConfigError``) before any work starts: an even outlier window, i >= j, negative loss
weights, split fractions that do not sum to 1, an image size not divisible by 16, and so on. Stage
scripts never read raw dictionaries. The defaults of the dataclasses equal ``params.yaml``'s values
(tests/config/test_defaults.py checks it).

- :mod:`lggseg.config.sections`: the dataclasses, one per section, and :data:`DERIVED_FROM_I`.
- :mod:`lggseg.config.loading`: :func:`read_params`, :func:`load_section`, :func:`from_dict`, :func:`deep_merge`.
- :mod:`lggseg.config.variants`: :func:`resolve_variant` and the ``configure`` stage (:func:`write_configs`).

Everything is importable from ``lggseg.config`` itself.
"""

from lggseg.config.loading import deep_merge, from_dict, load_section, read_params
from lggseg.config.sections import (
    ARCHS,
    CLUSTER_COLUMNS,
    DATA_PATHS,
    DERIVED_FROM_I,
    KAGGLE_DATASET,
    LOSS_TERMS,
    LR_SCHEDULES,
    SECTIONS,
    AugmentConfig,
    CommonConfig,
    EvaluateConfig,
    FetchConfig,
    LossConfig,
    ManifestConfig,
    ModelConfig,
    PostprocessConfig,
    RunConfig,
    TrainConfig,
    is_int,
    is_number,
)
from lggseg.config.variants import (
    LOSS_TERM_FIELDS,
    UNUSED_LOSS,
    canonical,
    load_run_config,
    resolve_variant,
    run_config_from_dict,
    unused_loss_fields,
    validate_all,
    variant_names,
    write_configs,
)
from lggseg.errors import ConfigError

__all__ = [
    "ARCHS", "CLUSTER_COLUMNS", "DATA_PATHS", "DERIVED_FROM_I", "KAGGLE_DATASET", "LOSS_TERMS", "LOSS_TERM_FIELDS",
    "LR_SCHEDULES", "SECTIONS", "UNUSED_LOSS", "AugmentConfig", "CommonConfig", "ConfigError", "EvaluateConfig",
    "FetchConfig", "LossConfig", "ManifestConfig", "ModelConfig", "PostprocessConfig", "RunConfig", "TrainConfig",
    "canonical", "deep_merge", "from_dict", "is_int", "is_number", "load_run_config", "load_section", "read_params",
    "resolve_variant", "run_config_from_dict", "unused_loss_fields", "validate_all", "variant_names", "write_configs",
]
