"""The sections of ``params.yaml`` as frozen, validated dataclasses (all re-exported by :mod:`lggseg.config`).

Each ``__post_init__`` rejects nonsense with a :class:`ConfigError` naming the key. The defaults equal
``params.yaml``'s values; keys derived from the paper's "7" (``loss.i``) are listed in :data:`DERIVED_FROM_I`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lggseg.errors import (
    ConfigError as ConfigError,  # re-exported; it lives in lggseg.errors (the one error root)
)

CLUSTER_COLUMNS = (
    "RNASeqCluster",
    "MethylationCluster",
    "miRNACluster",
    "CNCluster",
    "RPPACluster",
    "OncosignCluster",
    "COCCluster",
)
"""The seven genomic cluster columns of the dataset's ``data.csv`` (paper Table 1, section 3.2.2)."""

KAGGLE_DATASET = "mateuszbuda/lgg-mri-segmentation"
LOSS_TERMS = ("bce", "dice", "outlier")
ARCHS = ("deeplabv3plus", "unet")
LR_SCHEDULES = ("constant", "cosine")
DATA_PATHS = ("auto", "loader", "resident")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def is_int(x: Any) -> bool:
    """An int that is not a bool (YAML's true is not 1 here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite int or float that is not a bool."""
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(float(x))


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class CommonConfig:
    """Settings shared by every stage."""

    seed: int = 23
    image_size: int = 256
    attribute_columns: tuple[str, ...] = CLUSTER_COLUMNS
    use_position: bool = True
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _require(is_int(self.seed) and self.seed >= 0, f"common.seed must be a non-negative integer, got {self.seed!r}")
        _require(
            is_int(self.image_size) and self.image_size >= 32 and self.image_size % 16 == 0,
            f"common.image_size must be a positive multiple of 16 (>= 32), got {self.image_size!r}",
        )
        _require(len(set(self.attribute_columns)) == len(self.attribute_columns), "common.attribute_columns has duplicates")
        _require(self.device in ("auto", "cpu", "cuda"), f"common.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class FetchConfig:
    """Where the raw data comes from: ``kaggle``, ``demo``, or a local ``kaggle_3m/`` dir or zip."""

    source: str = "kaggle"
    kaggle_dataset: str = KAGGLE_DATASET
    demo_cases: int = 16
    demo_seed: int = 23

    def __post_init__(self) -> None:
        _require(isinstance(self.source, str) and self.source.strip() != "", "fetch.source must be 'kaggle', 'demo' or a path")
        _require("/" in self.kaggle_dataset, f"fetch.kaggle_dataset must be 'owner/name', got {self.kaggle_dataset!r}")
        _require(is_int(self.demo_cases) and self.demo_cases >= 3, "fetch.demo_cases must be an integer >= 3 (one per split)")
        _require(is_int(self.demo_seed) and self.demo_seed >= 0, "fetch.demo_seed must be a non-negative integer")

    @property
    def kind(self) -> str:
        """``kaggle``, ``demo`` or ``local``."""
        return self.source if self.source in ("kaggle", "demo") else "local"


@dataclass(frozen=True)
class ManifestConfig:
    """Per-slice manifest and the train/val/test split (paper section 4.1.3: 70/15/15, seed 23)."""

    split_unit: str = "patient"  # patient | slice (slice only to measure leakage)
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 23

    def __post_init__(self) -> None:
        _require(self.split_unit in ("patient", "slice"), f"manifest.split_unit must be patient or slice, got {self.split_unit!r}")
        fr = self.split_fractions
        _require(len(fr) == 3 and all(is_number(f) and f > 0 for f in fr), f"manifest.split_fractions must be 3 positive numbers, got {fr!r}")
        _require(abs(sum(fr) - 1.0) < 1e-6, f"manifest.split_fractions must sum to 1, got {sum(fr):.4f}")
        _require(is_int(self.split_seed) and self.split_seed >= 0, "manifest.split_seed must be a non-negative integer")


@dataclass(frozen=True)
class ModelConfig:
    """Segmentation network (paper section 3.1-3.3)."""

    arch: str = "deeplabv3plus"  # deeplabv3plus | unet
    encoder: str = "regnetz_040"  # a timm model name (used through smp's ``tu-`` prefix)
    attributes: bool = True  # attribute encoder of section 3.2.2
    attribute_hidden: int = 128
    attribute_channels: int = 3
    output_stride: int = 16
    atrous_rates: tuple[int, int, int] = (6, 12, 18)
    decoder_channels: int = 256
    pretrained: bool = True
    weights_file: str | None = None

    def __post_init__(self) -> None:
        _require(self.arch in ARCHS, f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        _require(isinstance(self.encoder, str) and self.encoder != "", "model.encoder must be a timm model name")
        _require(is_int(self.attribute_hidden) and self.attribute_hidden > 0, "model.attribute_hidden must be a positive integer")
        _require(is_int(self.attribute_channels) and self.attribute_channels > 0, "model.attribute_channels must be positive")
        _require(self.output_stride in (8, 16), f"model.output_stride must be 8 or 16, got {self.output_stride!r}")
        _require(
            len(self.atrous_rates) == 3 and all(is_int(r) and r > 0 for r in self.atrous_rates),
            f"model.atrous_rates must be three positive integers, got {self.atrous_rates!r}",
        )
        _require(is_int(self.decoder_channels) and self.decoder_channels > 0, "model.decoder_channels must be positive")
        _require(not (self.attributes and self.arch != "deeplabv3plus"), "model.attributes needs arch deeplabv3plus")


@dataclass(frozen=True)
class LossConfig:
    """Compound loss of eq. 13: alpha*BCE + beta*Dice + gamma*Outlier (see ``lggseg.losses``)."""

    terms: tuple[str, ...] = ("bce",)
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    i: int = 7
    j: int = 21
    smooth: float = 1.0
    threshold_rounding: str = "ceil"  # eq. 8: ceil -> 33 for i=7 (as printed; Fig. 5 corner case), floor -> 40 (the text's "round-down")
    counts: str = "soft"  # soft probabilities | hard Round(X) (no gradient through the density)
    outlier_mode: str = "paper"  # paper (eqs. 4-12 literally) | isolated_bce (our variant)
    reduction: str = "mean"  # mean | sum over pixels
    gamma_warmup_epochs: int = 5  # epochs with gamma = 0
    gamma_ramp_epochs: int = 10  # then a linear ramp up to gamma over this many epochs
    # When set, these replace the two counts above by fractions of the run's planned epochs (see
    # lggseg.losses.gamma_schedule), so that a short or time-budgeted run still reaches full gamma.
    gamma_warmup_fraction: float | None = None
    gamma_ramp_fraction: float | None = None

    def __post_init__(self) -> None:
        _require(len(self.terms) > 0, "loss.terms must name at least one of bce, dice, outlier")
        for t in self.terms:
            _require(t in LOSS_TERMS, f"loss.terms: unknown term {t!r} (choose from {LOSS_TERMS})")
        _require(len(set(self.terms)) == len(self.terms), "loss.terms has duplicates")
        for name in ("alpha", "beta", "gamma", "smooth"):
            v = getattr(self, name)
            _require(is_number(v) and v >= 0, f"loss.{name} must be a non-negative number, got {v!r}")
        _require(
            any(self.weight(t) > 0 for t in self.terms), "loss: every weight of the used terms is 0, so the loss is constant"
        )
        _require(is_int(self.i) and self.i > 0 and self.i % 2 == 1, f"loss.i must be a positive odd integer, got {self.i!r}")
        _require(is_int(self.j) and self.j > 0 and self.j % 2 == 1, f"loss.j must be a positive odd integer, got {self.j!r}")
        _require(self.i < self.j, f"loss.i must be smaller than loss.j, got i={self.i}, j={self.j}")
        _require(self.threshold_rounding in ("floor", "ceil"), "loss.threshold_rounding must be floor or ceil")
        _require(self.counts in ("soft", "hard"), "loss.counts must be soft or hard")
        _require(self.outlier_mode in ("paper", "isolated_bce"), "loss.outlier_mode must be paper or isolated_bce")
        _require(self.reduction in ("mean", "sum"), "loss.reduction must be mean or sum")
        if self.outlier_mode == "paper":
            # Otherwise every white pixel, even deep inside a large object, passes the mask of eq. 9. The one
            # check of this rule: lggseg.losses relies on it, also where the outlier maps are drawn without
            # the outlier term being trained (Figure 9, the outlier study).
            ring = self.j * self.j - self.i * self.i
            _require(
                ring > self.threshold,
                f"loss: the outlier ring j^2 - i^2 = {ring} (i={self.i}, j={self.j}) must exceed the eq. 8 "
                f"threshold {self.threshold}; choose a larger j",
            )
        for name in ("gamma_warmup_epochs", "gamma_ramp_epochs"):
            v = getattr(self, name)
            _require(is_int(v) and v >= 0, f"loss.{name} must be a non-negative integer, got {v!r}")
        fractions = [getattr(self, f"gamma_{k}_fraction") for k in ("warmup", "ramp")]
        for name, v in zip(("gamma_warmup_fraction", "gamma_ramp_fraction"), fractions, strict=True):
            _require(v is None or (is_number(v) and 0 <= v < 1), f"loss.{name} must be null or a number in [0, 1), got {v!r}")
        _require(sum(v or 0 for v in fractions) < 1,
                 f"loss.gamma_warmup_fraction + gamma_ramp_fraction must be below 1 (some epochs at full gamma), got {fractions}")

    def weight(self, term: str) -> float:
        return {"bce": self.alpha, "dice": self.beta, "outlier": self.gamma}[term]

    @property
    def threshold(self) -> int:
        """Eq. 8: i^2 - round(i/2)^2, rounding chosen by ``threshold_rounding``."""
        half = math.floor(self.i / 2) if self.threshold_rounding == "floor" else math.ceil(self.i / 2)
        return self.i * self.i - half * half


DERIVED_FROM_I: dict[tuple[str, str], Any] = {
    ("postprocess", "min_area"): lambda i: i * i,
    ("evaluate", "noise_side"): lambda i: i,
}
"""Keys whose value, when null or absent, is derived from ``loss.i``, the one place of the paper's "7".

Section 4.1.3 of the paper calls regions smaller than 7 x 7 segmentation noise, and its outlier loss
(eqs. 4-12) looks at an i x i window with i = 7. ``loss.i`` holds that 7; the smallest kept predicted
component (``postprocess.min_area`` = i*i = 49) and the side of the noise and small-component counts
(``evaluate.noise_side`` = i) are derived from it unless a params file sets them explicitly.
"""


def _derive_defaults(cfg: Any, section: str, i: int | None = None) -> None:
    """Fill the ``DERIVED_FROM_I`` fields of ``cfg`` left at None, from ``i`` (default: ``LossConfig().i``)."""
    for (sec, key), rule in DERIVED_FROM_I.items():
        if sec == section and getattr(cfg, key) is None:
            object.__setattr__(cfg, key, rule(LossConfig.i if i is None else i))


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (paper section 4.1.3: random channel dropout, brightness/contrast/saturation)."""

    channel_dropout_p: float = 0.2
    color_jitter_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    extra: bool = False  # flips and small affine transforms; not in the paper
    # Not in the paper: with this probability a slice is shown as if pre-contrast, post-contrast or both
    # had not been acquired, encoded the way the Kaggle data encodes a missing sequence (a copy of FLAIR;
    # 8 of the 94 cases in our copy). See lggseg.data.dataset.MISSING_SEQUENCE_PATTERNS.
    missing_sequence_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("channel_dropout_p", "color_jitter_p", "missing_sequence_p"):
            v = getattr(self, name)
            _require(is_number(v) and 0 <= v <= 1, f"train.augment.{name} must be a probability, got {v!r}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            _require(is_number(v) and 0 <= v < 1, f"train.augment.{name} must be in [0, 1), got {v!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (paper section 4.1.3: Adam, lr 1e-3, seed 23)."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_workers: int = 4
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX; env LGGSEG_CPU_BF16)
    channels_last: bool = True  # on CUDA; on CPU only with LGGSEG_CPU_CHANNELS_LAST=unsafe (see step_setup)
    compile: bool = False  # torch.compile on CUDA
    cpu_threads: int = 0  # 0: leave torch's default
    log_every: int = 20  # steps between host syncs for logging
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Not in the paper (constant lr 1e-3): a cosine decay to 0 over the planned steps, after a linear
    # warm-up of ``warmup_epochs`` (may be fractional). See lggseg.training.trainer.lr_factor.
    lr_schedule: str = "constant"  # constant | cosine
    warmup_epochs: float = 0.0
    # Wall-clock budget of training (validation included), checked at epoch boundaries: the run stops
    # before an epoch that would not fit. With a budget, the number of epochs is planned after the
    # first one (min(epochs, budget / first epoch's time)) and the cosine schedule spans that plan.
    max_minutes: float | None = None
    # Share of the tumour-free train slices drawn (afresh) each epoch; every tumour slice is always in.
    empty_slice_fraction: float = 1.0
    # At most this many train slices per epoch: a fresh random draw each epoch from the slices above
    # (null: all of them). For very short runs such as the demo, where the number of optimisation steps,
    # not the data, is what costs time; tumour and empty slices keep their proportion on average.
    epoch_slices: int | None = None
    # Where batches come from (lggseg.data.resident): ``loader`` = DataLoader workers + albumentations on the CPU;
    # ``resident`` = the split on the training device, augmented there; ``auto`` = resident on CUDA when the
    # split fits comfortably in free device memory, else the loader. The two draw different random streams.
    data_path: str = "auto"  # auto | loader | resident
    # The resumable checkpoint is written every N epochs (not after the run's last: the model is written then).
    checkpoint_every: int = 1
    # torch's fused Adam (one kernel over all parameters) instead of the default multi-tensor one: the
    # same update, rounded differently. On CPU at 64 px the update took 0.20 s with the default and 0.06 s
    # fused for tf_efficientnetv2_m, 0.40 s and 0.09 s for repvgg_b2 (results/demo-2026-11-30/choices.json).
    fused_adam: bool = False
    # Before each validation, recompute every BatchNorm layer's running mean and variance as the exact
    # average over this many train slices (un-augmented, batches of 16), instead of the momentum average
    # of the training steps ("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"). For
    # short runs: after one 28-step demo epoch, repvgg_b2 predicted nothing in eval mode (test tumour-slice
    # Dice 0.0) while its training Dice was 0.62; recomputed over 160 slices, 0.70. 0: off (the paper's way).
    bn_recalibration_slices: int = 0

    @property
    def subsamples_epochs(self) -> bool:
        """True when an epoch is a draw rather than every train slice (``empty_slice_fraction``, ``epoch_slices``)."""
        return self.empty_slice_fraction < 1 or self.epoch_slices is not None

    def __post_init__(self) -> None:
        _require(is_int(self.epochs) and self.epochs > 0, f"train.epochs must be a positive integer, got {self.epochs!r}")
        _require(is_int(self.batch_size) and self.batch_size > 0, f"train.batch_size must be positive, got {self.batch_size!r}")
        _require(is_number(self.lr) and self.lr > 0, f"train.lr must be positive, got {self.lr!r}")
        _require(is_number(self.weight_decay) and self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(is_int(self.num_workers) and self.num_workers >= 0, "train.num_workers must be >= 0")
        _require(is_int(self.cpu_threads) and self.cpu_threads >= 0, "train.cpu_threads must be >= 0")
        _require(is_int(self.log_every) and self.log_every > 0, "train.log_every must be positive")
        _require(self.lr_schedule in LR_SCHEDULES, f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        _require(is_number(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
                 f"train.warmup_epochs must be in [0, train.epochs), got {self.warmup_epochs!r}")
        _require(is_number(self.empty_slice_fraction) and 0 < self.empty_slice_fraction <= 1,
                 f"train.empty_slice_fraction must be in (0, 1], got {self.empty_slice_fraction!r}")
        _require(self.epoch_slices is None or (is_int(self.epoch_slices) and self.epoch_slices >= self.batch_size),
                 f"train.epoch_slices must be null or an integer >= train.batch_size ({self.batch_size}), "
                 f"got {self.epoch_slices!r}")
        _require(self.max_minutes is None or (is_number(self.max_minutes) and self.max_minutes > 0),
                 f"train.max_minutes must be null or a positive number of minutes, got {self.max_minutes!r}")
        _require(self.data_path in DATA_PATHS, f"train.data_path must be one of {DATA_PATHS}, got {self.data_path!r}")
        _require(is_int(self.checkpoint_every) and self.checkpoint_every > 0,
                 f"train.checkpoint_every must be a positive integer, got {self.checkpoint_every!r}")
        _require(isinstance(self.fused_adam, bool), f"train.fused_adam must be true or false, got {self.fused_adam!r}")
        _require(is_int(self.bn_recalibration_slices) and self.bn_recalibration_slices >= 0,
                 f"train.bn_recalibration_slices must be a non-negative integer, got {self.bn_recalibration_slices!r}")


@dataclass(frozen=True)
class PostprocessConfig:
    """Inference-time removal of predicted components smaller than ``min_area`` pixels (0 disables)."""

    min_area: int | None = None  # None: derived, loss.i squared (the paper's 7x7 = 49); see DERIVED_FROM_I
    connectivity: int = 8
    largest_3d: bool = False  # keep only each case's largest 3D region (not in the paper)

    def __post_init__(self) -> None:
        _derive_defaults(self, "postprocess")
        _require(is_int(self.min_area) and self.min_area >= 0, f"postprocess.min_area must be >= 0, got {self.min_area!r}")
        _require(self.connectivity in (4, 8), "postprocess.connectivity must be 4 or 8")
        _require(isinstance(self.largest_3d, bool), "postprocess.largest_3d must be true or false")


@dataclass(frozen=True)
class EvaluateConfig:
    """Test-split evaluation (paper section 4.1.2 and the conventions of issue #4)."""

    threshold: float = 0.5
    batch_size: int = 32
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 23
    noise_side: int | None = None  # None: loss.i (the paper's 7); components under noise_side^2 px touching no truth are noise
    connectivity: int = 8
    tta: bool = False  # average the identity, h-flip and v-flip probabilities (lggseg predict --tta)
    # the split the evaluate stage scores: `val` to compare recipes without the test split (docs/experiments.md)
    split: str = "test"

    def __post_init__(self) -> None:
        _derive_defaults(self, "evaluate")
        _require(is_number(self.threshold) and 0 < self.threshold < 1, "evaluate.threshold must be in (0, 1)")
        _require(is_int(self.batch_size) and self.batch_size > 0, "evaluate.batch_size must be positive")
        _require(is_int(self.bootstrap_samples) and self.bootstrap_samples >= 100, "evaluate.bootstrap_samples must be >= 100")
        _require(is_int(self.bootstrap_seed) and self.bootstrap_seed >= 0, "evaluate.bootstrap_seed must be >= 0")
        _require(is_int(self.noise_side) and self.noise_side > 0, "evaluate.noise_side must be positive")
        _require(self.connectivity in (4, 8), "evaluate.connectivity must be 4 or 8")
        _require(self.split in ("val", "test"), f"evaluate.split must be val or test, got {self.split!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training variant needs; what ``configs/<variant>.yaml`` holds."""

    variant: str
    common: CommonConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    seeds: tuple[int, ...] = (23,)
    tables: tuple[str, ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        _require(bool(_VARIANT_NAME.match(self.variant)), f"variant name {self.variant!r}: use letters, digits, _ . -")
        _require(len(self.seeds) > 0 and all(is_int(s) and s >= 0 for s in self.seeds), "seeds must be non-negative integers")
        _require(len(set(self.seeds)) == len(self.seeds), "seeds has duplicates")
        if self.model.arch == "unet":
            _require(self.common.image_size % 32 == 0, "U-Net needs common.image_size divisible by 32")

    def to_dict(self) -> dict[str, Any]:
        data = _to_plain(dataclasses.asdict(self))
        # Keys added after configs were first written appear only when set, so that the configs
        # (configs/<variant>.yaml) and run fingerprints of runs that do not use them stay as they were.
        for section, key in ADDED_WHEN_SET:
            if data[section].get(key) is None:
                data[section].pop(key, None)
        return data



ADDED_WHEN_SET = (("loss", "gamma_warmup_fraction"), ("loss", "gamma_ramp_fraction"))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj




SECTIONS: dict[str, type] = {
    "common": CommonConfig,
    "fetch": FetchConfig,
    "manifest": ManifestConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "postprocess": PostprocessConfig,
    "evaluate": EvaluateConfig,
}

